"""The house rules of ARCHITECTURE.md, held by a test: arrows only point down, and no function outgrows a reader."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fusionprof"
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
    return {".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"):
            ast.parse(f.read_text()) for f in PACKAGE.rglob("*.py")}


def imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that ``tree`` imports, inside functions too."""
    out = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        out |= {n for n in names if n in known}
    return out


def test_no_import_circle():
    trees = modules()
    graph = {m: imports(t, set(trees)) - {m} for m, t in trees.items()}
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}  # a package's __init__

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(d == target or (d not in seen and not seen.add(d) and reaches(d, target, seen))
                   for d in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules that import themselves through others: {circles}"


def test_only_the_cli_and_compare_import_the_training_loop():
    trees = modules()
    importers = {m for m, t in trees.items() if "fusionprof.train" in imports(t, set(trees))}
    assert importers == {"fusionprof.cli", "fusionprof.compare"}


def test_no_function_over_80_lines():
    long = [f"{m}.{node.name}: {node.end_lineno - node.lineno + 1}" for m, t in modules().items()
            for node in ast.walk(t) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long
