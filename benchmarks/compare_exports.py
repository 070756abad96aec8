"""``compare``'s export stage with ``.pt2`` packages: each built by its own export in turn, against built side by side.

    python benchmarks/compare_exports.py [--fusion all] [--out profiles]

The export stage of ``fusionprof compare --backends onnxruntime,aoti`` (on a GPU ``aoti`` is in the study by default):
every fusion to ONNX and to an AOTInductor package, each held to its parity and accuracy gates. Before, each
``.pt2`` export built its own package when the stage loop reached it, one after another, fusion by fusion. Now
``compare.export_stages`` builds the packages side by side (``PackagesAhead``, one per usable core) from the start,
while the ONNX exports run, and each ``.pt2`` export takes its package when it reaches it.

Each fusion is trained briefly first (tiny, one epoch on 64 pairs of the embedded data: the weights do not change
how long a build takes). Both ways run on copies of those checkpoints in fresh folders, in the order before, ahead,
ahead, before (a slow stretch of the machine falls on both); each way's wall seconds are the median of its two runs.
Writes ``profiles/<host>/compare-exports-tiny-cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.compare import Stages, export_stages
from fusionprof.config import model_config, train_config
from fusionprof.env import fingerprint, machine_name, utc_stamp
from fusionprof.export import export, record_name
from fusionprof.models import fusion_names
from fusionprof.train import train

BACKENDS = ["onnxruntime", "aoti"]


def trained(fusions: list[str], folder: Path) -> dict[str, Path]:
    """A briefly trained tiny checkpoint of each fusion in ``folder``."""
    checkpoints = {}
    for fusion in fusions:
        cfg = train_config("tiny", epochs=1, limit_train=64, limit_eval=32, models_dir=str(folder / "m"),
                           profiles_dir=str(folder / "p"))
        checkpoints[fusion] = Path(train(cfg, model_config("tiny", fusion=fusion), progress=False,
                                         log=lambda _: None)["checkpoint"])
    return checkpoints


def copies(checkpoints: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Each run folder (checkpoint and tokenizer) copied into ``folder``: every export of a run is its own."""
    out = {}
    for fusion, checkpoint in checkpoints.items():
        run = folder / checkpoint.parent.name
        shutil.copytree(checkpoint.parent, run, ignore=shutil.ignore_patterns("*.onnx", "*.pt2", "export*.json"))
        out[fusion] = run / checkpoint.name
    return out


def one_after_another(checkpoints: dict[str, Path], log) -> None:
    """The export stage as ``compare`` ran it before: fusion by fusion, each export building its own artifact."""
    for checkpoint in checkpoints.values():
        for fmt in ("onnx", "pt2"):
            record = export(checkpoint, fmt, "fp32", progress=False, log=log)
            assert record["status"] == "ok", record["record_path"]


def side_by_side(checkpoints: dict[str, Path], log) -> None:
    """The export stage as ``compare`` runs it now."""
    with tempfile.TemporaryDirectory(prefix="stages-") as state:
        export_stages(Stages(Path(state) / "compare.json", log), "tiny", checkpoints, "cpu", BACKENDS, [], False, log)


def run(way, checkpoints: dict[str, Path]) -> dict:
    with tempfile.TemporaryDirectory(prefix="compare-exports-") as folder:
        mine = copies(checkpoints, Path(folder))
        said: list[str] = []
        start = time.perf_counter()
        way(mine, said.append)
        seconds = time.perf_counter() - start
        records = [json.loads((c.parent / record_name("pt2", "fp32")).read_text()) for c in mine.values()]
        print(f"{way.__name__}: {seconds:.1f} s")
        return {"way": way.__name__, "seconds": seconds, "packages_verified": all(r["status"] == "ok" for r in records),
                "log": [line for line in said if "AOTInductor" in line or "built" in line]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="all")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    fusions = fusion_names() if args.fusion == "all" else args.fusion.split(",")
    env = fingerprint()
    with tempfile.TemporaryDirectory(prefix="trained-") as folder:
        checkpoints = trained(fusions, Path(folder))
        runs = [run(way, checkpoints) for way in (one_after_another, side_by_side, side_by_side, one_after_another)]
    before = statistics.median(r["seconds"] for r in runs if r["way"] == "one_after_another")
    now = statistics.median(r["seconds"] for r in runs if r["way"] == "side_by_side")
    record = {"schema_version": SCHEMA_VERSION, "kind": "compare-exports", "created": utc_stamp(), "args": vars(args),
              "backends": BACKENDS, "fusions": fusions, "runs": runs, "one_after_another_seconds": before,
              "side_by_side_seconds": now, "speedup": before / now, "environment": env}
    path = Path(args.out) / env["host"] / "compare-exports-tiny-cpu.json"
    write_json(path, record)
    print(f"{machine_name(env, 'cpu')}, {env['cpu_logical_cores']} logical cores: the export stage of compare "
          f"--backends {','.join(BACKENDS)} over {len(fusions)} fusions ({', '.join(fusions)}): one after another "
          f"{before:.1f} s, packages built side by side {now:.1f} s ({before / now:.2f}x); runs "
          + ", ".join(f"{r['way']} {r['seconds']:.1f}" for r in runs) + f" s; every package verified: "
          f"{all(r['packages_verified'] for r in runs)}; wrote {path}")


if __name__ == "__main__":
    main()
