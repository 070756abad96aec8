"""An int8 export with the checkpoint's verified fp32 ONNX beside it (quantized as it is) and without (exported again).

    python benchmarks/int8_export.py --checkpoint models/tiny-mid/checkpoint.pt [--rounds 2] [--out profiles]

Copies the checkpoint and its run's tokenizer into two folders. In ``reused``, ``fusionprof export`` writes the fp32
ONNX first, untimed (``compare``, and anyone who exports fp32 before int8, has it already); in ``fresh`` there is
none. Then ``fusionprof export --precision int8`` runs in each, alternating, each a new process timed from the host,
so both pay the same start-up. Writes the wall times, each export record's status, accuracy and what it quantized,
and the environment to ``<out>/<host>/int8-export-reuse-<preset>-<fusion>-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from fusionprof.atomic import write_json
from fusionprof.checkpoint import load_checkpoint
from fusionprof.env import fingerprint


def export(checkpoint: Path, *args: str) -> float:
    """``fusionprof export`` in a process of its own; its wall time in seconds. A failed export stops the run."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fusionprof", "export", "--checkpoint", str(checkpoint), *args,
                           "--quiet"], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"fusionprof export {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint.pt (its folder's "
                        "tokenizer is copied with it)")
    parser.add_argument("--rounds", type=int, default=2, help="int8 exports per folder, alternated")
    parser.add_argument("--out", type=Path, default=Path("profiles"), help="the record goes to OUT/<host>/")
    args = parser.parse_args()
    run = args.checkpoint.parent
    seconds: dict[str, list[float]] = {"fresh": [], "reused": []}
    records: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints = {}
        for name in seconds:
            folder = Path(tmp) / name
            folder.mkdir()
            shutil.copy2(args.checkpoint, folder / "checkpoint.pt")
            if (run / "tokenizer").is_dir():
                shutil.copytree(run / "tokenizer", folder / "tokenizer")
            checkpoints[name] = folder / "checkpoint.pt"
        fp32_seconds = export(checkpoints["reused"])  # untimed for the comparison: the export being reused
        for _ in range(args.rounds):
            for name, checkpoint in checkpoints.items():
                seconds[name].append(export(checkpoint, "--precision", "int8"))
                record = json.loads((checkpoint.parent / "export.onnx.int8.json").read_text())
                records[name] = {"status": record["status"], "accuracy": record["accuracy"]["exported_accuracy"],
                                 "quantized_from": {k: v for k, v in record["onnx"]["quantized_from"].items()
                                                    if k != "parity"}}
                print(f"{name:<6} int8 export {seconds[name][-1]:6.1f} s  {record['status']}  test accuracy "
                      f"{record['accuracy']['exported_accuracy']:.4f}", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"median: fresh {median['fresh']:.1f} s, reused {median['reused']:.1f} s "
          f"({median['fresh'] / median['reused']:.2f}×); the fp32 export that is reused took {fp32_seconds:.1f} s")
    env = fingerprint()
    ckpt = load_checkpoint(args.checkpoint)
    config = {"preset": ckpt["train_config"]["preset"], "fusion": ckpt["model_config"]["fusion"]}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = args.out / env["host"] / f"int8-export-reuse-{config['preset']}-{config['fusion']}-{stamp}.json"
    write_json(path, {"kind": "benchmark", "benchmark": "int8_export", "checkpoint": str(args.checkpoint), **config,
                      "rounds": args.rounds, "order": list(seconds), "seconds": seconds, "median_seconds": median,
                      "fp32_export_seconds": fp32_seconds, "records": records, "environment": env})
    print(f"→ {path}")


if __name__ == "__main__":
    main()
