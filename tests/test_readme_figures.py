"""Every figure in the README's result tables matches the committed record it cites.

Citation format (README.md):

* a line ``Record: `profiles/....json` `` (or ``Records:`` with several paths) as the first non-blank line under a
  table: the record(s) of every row; ``<fusion>`` in a path is replaced by the row's ``fusion`` cell;
* or a ``record`` column whose cell links the row's record: ``[bf16-96px](profiles/vm/....json)``.

Each column header names what its cells show (``COLUMNS`` below, per record ``kind``); every number in a cell is
compared with the record's value to the precision printed ("97.8 %" holds 0.978 to ±0.05 points, "406" holds
405.97 to ±0.5). A table that cites no record must be a descriptive one (``DESCRIPTIVE``). The test reads the JSON
files directly (no fusionprof import, no training).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# a number not glued to a word (bf16, fp32, ResNet-50 are not figures)
NUMBER = re.compile(r"(?<![A-Za-z\d.])\d+(?:\.\d+)?")
CITED = re.compile(r"`(profiles/[^`\s]+)`|\]\((profiles/[^)\s]+)\)")
DESCRIPTIVE = {("fusion", "what it does")}


def _tables(text: str) -> list[dict]:
    """Markdown tables: header, body rows (header → cell), the record paths cited beside them, line number."""
    lines = text.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if not (lines[i].lstrip().startswith("|") and i + 1 < len(lines)
                and re.fullmatch(r"\s*\|(\s*:?-+:?\s*\|)+\s*", lines[i + 1])):
            i += 1
            continue
        start = i
        rows = []
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
            i += 1
        header, body = rows[0], rows[2:]
        j = i
        while j < len(lines) and not lines[j].strip():
            j += 1
        cited = []
        if j < len(lines) and re.match(r"\s*Records?:", lines[j]):
            cited = [a or b for a, b in CITED.findall(lines[j])]
        tables.append({"line": start + 1, "header": header, "cited": cited,
                       "rows": [dict(zip(header, r, strict=True)) for r in body]})
    return tables


@cache
def _load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def _plain(cell: str) -> str:
    return cell.replace("`", "").replace("*", "").strip()


def _numbers(cell: str) -> list[str]:
    return NUMBER.findall(cell.replace("*", ""))


def _scope(row: dict) -> str:
    """The compile scope a row of a compile table shows: its first cell names it."""
    label = _plain(next(iter(row.values())))
    for scope in ("cudagraphs", "regions"):
        if scope in label:
            return scope
    return "model" if "--compile" in label else "off"


# ---- what each column shows, per record kind: (record, row) → the numbers the cell must hold, in order

def _p50(batch: int):
    def get(rec: dict, row: dict) -> list[float]:
        backend = re.search(r"\(([\w-]+)\)", row[f"p50 bs {batch}"]).group(1)
        cells = [r for r in rec["rows"] if r["fusion"] == _plain(row["fusion"]) and r["batch_size"] == batch
                 and r["status"] == "ok"]
        fastest = min(cells, key=lambda r: r["p50_ms"])
        assert fastest["backend"] == backend, f"the fastest backend is {fastest['backend']}, not {backend}"
        return [next(r["p50_ms"] for r in cells if r["backend"] == backend)]
    return get


def _backend_p50(batch: int, backend: str):
    """One backend's p50: on a GPU the device-resident one (CUDA events, inputs already on the GPU), on the CPU the
    host's."""
    def get(rec: dict, row: dict) -> list[float]:
        [cell] = [r for r in rec["rows"] if r["fusion"] == _plain(row["fusion"]) and r["backend"] == backend
                  and r["batch_size"] == batch and r["status"] == "ok"]
        return [(cell.get("device_resident") or cell)["p50_ms"]]
    return get


def _gpu_check(key: str, scale: float = 1.0):
    def get(rec: dict, row: dict) -> list[float]:
        value = rec["checks"][_plain(row["fusion"])][key]
        return [] if value is None else [value * scale]  # None (e.g. a CV of one sample): no figure to print
    return get


def _swept_p50(batch: int, backend: str):
    """A gpu_inference record's sweep cell (device-resident p50), read from the latency records it lists
    (``committed_sweeps``); no figure for a cell it did not sweep."""
    def get(rec: dict, row: dict) -> list[float]:
        cells = [r for path in rec["committed_sweeps"] for r in _load(path)["rows"]
                 if r["fusion"] == _plain(row["fusion"]) and r["backend"] == backend and r["batch_size"] == batch
                 and r["status"] == "ok"]
        assert len(cells) <= 1, f"{len(cells)} sweeps timed {backend} at batch {batch}"
        return [c["device_resident"]["p50_ms"] for c in cells]
    return get


def _key(loop: str, row: dict) -> str:
    scope = _scope(row)
    return loop if scope == "off" else f"{loop}+{scope}"


def _workers(row: dict) -> str:
    """The DataLoader workers a row names (records written since (a) and (b) run per worker count)."""
    return f"/w{_plain(row['workers'])}" if "workers" in row else ""


def _samples(loop: str):
    def get(rec: dict, row: dict) -> list[float]:
        key = _key(loop, row)
        key += _workers(row) if f"{key}{_workers(row)}" in rec["samples_per_s"] else ""
        rounds = rec["samples_per_s"][key]
        return [rec["median"][key]] + ([min(rounds), max(rounds)] if len(rounds) > 1 else [])
    return get


def _by_compile(rec: dict, row: dict) -> dict:
    return rec.get("by_compile", {}).get(_scope(row)) or rec


def _mfu(rec: dict, row: dict) -> dict:
    return rec.get("mfu_by_compile", {}).get(_scope(row)) or rec["mfu"]


def _per_round(top: str, num: str, den: str, scale: float = 1.0):
    def get(rec: dict, row: dict) -> list[float]:
        s = rec["samples_per_s"]
        return [rec[top] * scale] + [a / b * scale for a, b in zip(s[num], s[den], strict=True)]
    return get


def _ratio(name: str, scale: float = 1.0):
    """Median and [min–max] of the rounds' own ratios, for the row's worker count (records that keep them)."""
    def get(rec: dict, row: dict) -> list[float]:
        r = rec["by_compile"][_scope(row)][f"{name}{_workers(row)}"]
        return [v * scale for v in (r["median"], min(r["rounds"]), max(r["rounds"]))]
    return get


def _compiled_over_eager(rec: dict, row: dict) -> list[float]:
    scope = _scope(row)
    if scope == "off":
        return []
    out = [rec["by_compile"][scope]["shipped_over_eager"]]
    if f"ceiling+{scope}" in rec["median"]:
        out.append(rec["median"][f"ceiling+{scope}"] / rec["median"]["ceiling"])
    return out


def _cache_column(fusion: str):
    def get(rec: dict, row: dict) -> list[float]:
        r = rec["results"].get(fusion)
        return [] if r is None else [r["epoch_seconds"]["encoders"], r["epoch_seconds"]["cached"], r["ratio"]]
    return get


def _batching(setting: str):
    """A Server search summary's median max QPS for one batching setting and the row's threads, and its ratio to no
    batching with the same threads."""
    def get(rec: dict, row: dict) -> list[float]:
        threads = "spin" if _plain(row["threads"]).startswith("spinning") else "sleep"
        name = f"{setting}, threads {threads}"
        ratio = [] if setting == "no batching" else [rec["ratios"][f"{name} / no batching, threads {threads}"]]
        return [rec["settings"][name]["median_max_qps"], *ratio]
    return get


def _neighbour(setting: str):
    """A noisy-neighbour summary's median p50 of one setting, for the row's (backend, batch)."""
    return lambda rec, row: [rec["cells"][_plain(row["backend, batch"])][setting]["median_p50_ms"]]


def _neighbour_ratio(name: str):
    return lambda rec, row: [rec["cells"][_plain(row["backend, batch"])]["ratios"][name]]


COLUMNS = {
    "train": {
        "params (M)": lambda rec, row: [rec["parameters"]["total"] / 1e6],
        "GFLOP/sample": lambda rec, row: [rec["forward_flops_per_sample"]["total"] / 1e9],
        "train (s)": lambda rec, row: [rec["train_seconds"]],
        "train samples/s": lambda rec, row: [rec["train_samples_per_s"]],
        "test acc": lambda rec, row: [rec["test"]["accuracy"] * 100],
        "AUC": lambda rec, row: [rec["test"]["auc"]],
        "peak CUDA memory": lambda rec, row: [rec["peak_memory"]["cuda_max_allocated_mib"]],
        "profiled step": lambda rec, row: [rec["step_profile"]["step_ms"]],
        "GPU busy in it": lambda rec, row: [rec["step_profile"]["gpu_busy_ms"],
                                            rec["step_profile"]["gpu_busy_share"] * 100],
    },
    "latency": {**{f"p50 bs {b}": _p50(b) for b in (1, 2, 4, 8, 16, 32)},
                **{f"`{backend}` bs {b}": _backend_p50(b, backend)
                   for backend in ("torch", "torch-cudagraphs", "onnxruntime", "openvino") for b in (1, 8, 32, 128)}},
    "gpu_inference": {
        **{f"`{backend}` bs {b}": _swept_p50(b, backend)
           for backend in ("torch", "torch-cudagraphs", "torch-cudagraphs-inductor") for b in (1, 8, 32, 128)},
        "bare replay bs 1": lambda rec, row: [rec["bare_replay"][_plain(row["fusion"])]["1"]["p50_ms"]],
        "eager / best, bs 1": _gpu_check("eager_over_best_at_smallest"),
        "best / bare replay, bs 1": _gpu_check("best_over_bare_replay_at_smallest"),
        "best, bs 128 (TFLOP/s)": _gpu_check("best_tflops_at_largest"),
        "best's max CV": _gpu_check("best_cv_max", 100),
    },
    "train_throughput": {
        "(a) naive": _samples("naive"),
        "(b) shipped": _samples("shipped"),
        "(c) ceiling": _samples("ceiling"),
        "(b)/(a)": lambda rec, row: [_by_compile(rec, row)["shipped_over_naive"]],
        "(b)/(c)": lambda rec, row: [_by_compile(rec, row)["shipped_over_ceiling"] * 100],
        "(b)/(a) per round": _ratio("shipped_over_naive"),
        "(b)/(c) per round": _ratio("shipped_over_ceiling", 100),
        "(b)/(a) (rounds 1 / 2 / 3)": _per_round("shipped_over_naive", "shipped", "naive"),
        "(b)/(c) (rounds 1 / 2 / 3)": _per_round("shipped_over_ceiling", "shipped", "ceiling", 100),
        "compiled / eager": _compiled_over_eager,
        "first epoch": lambda rec, row: [_by_compile(rec, row)["first_epoch_extra_s"]],
        "(b) training FLOP/s": lambda rec, row: [rec["mfu"]["achieved_gflops"] / 1000,
                                                 rec["mfu"]["train_gflop_per_sample"]],
        "training FLOP/s (share of a 2048² bf16 matmul)": lambda rec, row: [
            _mfu(rec, row)["achieved_gflops"] / 1000, _mfu(rec, row)["share_of_matmul"] * 100],
        "MFU": lambda rec, row: [_mfu(rec, row)["mfu_datasheet"] * 100],
        "MFU of (b)": lambda rec, row: [_mfu(rec, row)["mfu_datasheet"] * 100],
    },
    "load-batching": {
        "no batching": _batching("no batching"),
        "batches ≤ 16, 10 ms timeout": _batching("batch≤16 wait≤10ms"),
        "batches ≤ 16, 20 ms timeout": _batching("batch≤16 wait≤20ms"),
    },
    "noisy-neighbour": {
        **{name: _neighbour(name) for name in ("1 thread, quiet", "2 threads, quiet", "1 thread, 1 busy",
                                               "2 threads, 1 busy")},
        "2 threads: busy / quiet": _neighbour_ratio("2 threads, 1 busy / quiet"),
        "beside it: 2 threads / 1": _neighbour_ratio("beside the neighbour: 2 threads / 1"),
    },
    "feature_cache": {
        **{f: _cache_column(f) for f in ("early", "late", "mid", "bottleneck")},
        "one-time encoding": lambda rec, row: [r["cache_build_seconds"] for r in rec["results"].values()
                                               if r["cache_built"]],
    },
}


# ---- label columns: what names the row, checked against the record where the record says it

def _label_jpeg(recs: list[dict], cell: str) -> None:
    assert [float(n) for n in _numbers(cell)] == [recs[0]["args"]["disk_size"]]


def _label_precision(recs: list[dict], cell: str) -> None:
    assert cell.split()[0] == recs[0]["precision"]


def _label_preset(recs: list[dict], cell: str) -> None:
    assert _plain(cell).split()[0] == recs[0]["args"]["preset"]


def _label_free(recs: list[dict], cell: str) -> None:
    pass


def _label_threads(recs: list[dict], cell: str) -> None:
    assert _plain(cell).split()[0] in ("spinning", "sleeping")


def _label_workers(recs: list[dict], cell: str) -> None:
    assert int(_plain(cell)) in recs[0]["workers"]


def _label_neighbour_cell(recs: list[dict], cell: str) -> None:
    assert _plain(cell) in recs[0]["cells"]


LABELS = {
    "fusion": _label_free,          # resolves <fusion> in the record paths and picks the latency cells
    "record": _label_free,          # the row's record itself
    "seed, bf16, H200": _label_free,  # the compile scope: a scope the record lacks fails its columns
    "JPEG files": _label_jpeg,
    "workers": _label_workers,
    "threads": _label_threads,
    "(b) precision": _label_precision,
    "preset": _label_preset,
    "backend, batch": _label_neighbour_cell,
}


def _matches(printed: str, value: float) -> bool:
    decimals = len(printed.partition(".")[2])
    return abs(float(printed) - value) <= 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-12


def _row_records(table: dict, row: dict) -> list[str]:
    paths = list(table["cited"])
    if "record" in row:
        paths += [a or b for a, b in CITED.findall(row["record"])]
    fusion = _plain(row.get("fusion", ""))
    return [p.replace("<fusion>", fusion) for p in paths]


def _check_table(table: dict) -> list[str]:
    errors = []
    for row in table["rows"]:
        where = f"README.md:{table['line']} row {next(iter(row.values()))!r}"
        paths = _row_records(table, row)
        missing = [p for p in paths if not (ROOT / p).is_file()]
        if missing or not paths:
            errors.append(f"{where}: record {missing or 'none'} not found")
            continue
        recs = [_load(p) for p in paths]
        for header, cell in row.items():
            if header in LABELS:
                try:
                    LABELS[header]([r for r in recs if r.get("kind") != "latency"] or recs, cell)
                except (AssertionError, KeyError, IndexError, AttributeError) as e:
                    errors.append(f"{where}, {header!r}: {cell!r} does not name the record's row ({e!r})")
                continue
            found = [(p, r, COLUMNS[r.get("kind")][header]) for p, r in zip(paths, recs, strict=True)
                     if header in COLUMNS.get(r.get("kind"), {})]
            if len(found) != 1:
                errors.append(f"{where}: column {header!r} is read from {len(found)} of the cited records "
                              f"{paths} (no rule, or an ambiguous one, in COLUMNS)")
                continue
            path, rec, get = found[0]
            try:
                expected = get(rec, row)
            except (AssertionError, KeyError, IndexError, AttributeError, StopIteration) as e:
                errors.append(f"{where}, {header!r}: {cell!r}: not in {path} ({e!r})")
                continue
            printed = _numbers(cell)
            if len(printed) != len(expected) or not all(map(_matches, printed, expected)):
                want = ", ".join(f"{v:.4g}" for v in expected) or "no number"
                errors.append(f"{where}, {header!r}: README says {cell!r}, {path} says {want}")
    return errors


TABLES = _tables(README.read_text())


def test_readme_has_cited_tables() -> None:
    cited = [t for t in TABLES if t["cited"] or "record" in t["header"]]
    assert len(cited) >= 6, "the README's result tables lost their record citations"


def test_every_results_table_cites_a_record() -> None:
    bare = [f"README.md:{t['line']} {t['header']}" for t in TABLES
            if not (t["cited"] or "record" in t["header"]) and tuple(t["header"]) not in DESCRIPTIVE]
    assert not bare, f"tables with figures but no `Record:` line or record column: {bare}"


@pytest.mark.parametrize("table", [t for t in TABLES if t["cited"] or "record" in t["header"]],
                         ids=lambda t: f"line{t['line']}")
def test_table_figures_match_their_records(table: dict) -> None:
    errors = _check_table(table)
    assert not errors, "\n".join(errors)


def _readme_paths() -> set[str]:
    """Concrete record paths the README names anywhere (tables and prose); <fusion> expanded."""
    paths = set()
    for a, b in CITED.findall(README.read_text()):
        p = (a or b).rstrip("/")
        if "*" in p or re.search(r"<(?!fusion>)", p):
            continue  # a pattern such as profiles/<host>/latency-*.json, not a record
        for f in ("early", "mid", "late", "bottleneck") if "<fusion>" in p else ("",):
            paths.add(p.replace("<fusion>", f))
    return paths


def test_cited_records_exist_and_are_committed() -> None:
    paths = sorted(_readme_paths())
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README names records that do not exist: {missing}"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot tell committed records from local ones")
    files = [p for p in paths if (ROOT / p).is_file()]
    out = subprocess.run(["git", "ls-files", "--", *files], cwd=ROOT, capture_output=True, text=True, check=True)
    untracked = sorted(set(files) - set(out.stdout.split()))
    assert not untracked, f"the README cites records that are not committed: {untracked}"
