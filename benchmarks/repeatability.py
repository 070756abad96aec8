"""How well a latency cell's p50 repeats from one sweep to the next, and whether the table's flags foretell it.

    python benchmarks/repeatability.py [--preset tiny] [--fusion all] [--backends torch,onnxruntime]
        [--batch-sizes 1,8,32] [--runs 4] [--threads N]

The same ``fusionprof latency`` sweep ``--runs`` times, each in a fresh process, one after another. Per cell and run,
how far its p50 lies from the median of the other runs' p50s of that cell (``miss``: |p50 / median of the others
- 1|): what a reader would be wrong by, taking one sweep's figure for the machine's. The misses are grouped by what
the table said of that cell in that run: nothing, ``!`` only (CV above 10 %: some slow calls) or ``~`` (its p50
moved by over 10 % between the first and the second half of its calls: the pace changed while it was timed). If
the flags mean what they say, ``~`` cells miss more than unflagged ones, and ``!`` alone says little about the p50.

Writes ``profiles/<host>/repeatability-<preset>.json``: the summary, and every sweep's rows (without their raw
samples, with their halves' p50s) and config.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.env import fingerprint, machine_name
from fusionprof.records import LatencyRecord

GROUPS = ("none", "! only", "~")


def sweep(args, run: int, work: Path) -> LatencyRecord:
    """One ``fusionprof latency`` in a child process; its record."""
    out = work / f"run{run}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fusionprof", "latency", "--preset", args.preset, "--fusion", args.fusion,
               "--backends", args.backends, "--batch-sizes", args.batch_sizes, "--models", str(work / "none"),
               "--out", str(out), "--quiet", *(["--threads", str(args.threads)] if args.threads else [])]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    [path] = out.glob("*/latency-*.json")
    return LatencyRecord.from_dict(json.loads(path.read_text()), path)


def group(row) -> str:
    return "~" if row.host.drift_warning else "! only" if row.host.cv_warning else "none"


def misses(records: list[LatencyRecord]) -> list[dict]:
    """Per cell and run: its p50, the flag group, and how far it lies from the median of the other runs' p50s."""
    cells: dict[tuple, list] = {}
    for run, record in enumerate(records):
        for row in record.rows:
            if row.ok:
                cells.setdefault((row.fusion, row.backend, row.batch_size), []).append((run, row))
    out = []
    for (fusion, backend, batch), runs in sorted(cells.items()):
        for run, row in runs:
            others = statistics.median(r.host.p50_ms for i, r in runs if i != run)
            out.append({"fusion": fusion, "backend": backend, "batch_size": batch, "run": run,
                        "p50_ms": row.host.p50_ms, "halves_p50_ms": row.host.halves_p50_ms, "cv": row.host.cv,
                        "group": group(row), "others_median_p50_ms": others,
                        "miss": abs(row.host.p50_ms / others - 1)})
    return out


def summary(found: list[dict]) -> dict:
    """Per flag group: how many (cell, run)s, and the median, p90 and largest miss."""
    out = {}
    for name in GROUPS:
        m = sorted(x["miss"] for x in found if x["group"] == name)
        out[name] = {"n": len(m), "median_miss": statistics.median(m) if m else None,
                     "p90_miss": m[min(len(m) - 1, int(0.9 * len(m)))] if m else None, "max_miss": max(m, default=None)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="all")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3: a run's miss is against the median of the others")
    env = fingerprint()
    print(f"{machine_name(env)}, {env['cpu_logical_cores']} logical cores; {args.preset} {args.fusion}, "
          f"{args.backends}, batches {args.batch_sizes}; {args.runs} runs", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for run in range(args.runs):
            records.append(sweep(args, run, Path(tmp)))
            print(f"run {run + 1}/{args.runs}: {sum(r.ok for r in records[-1].rows)} cells", flush=True)
    found = misses(records)
    result = summary(found)
    for name, s in result.items():
        if s["n"]:
            print(f"{name:>7}: {s['n']:3d} (cell, run)s, p50 off the other runs' median by {s['median_miss']:.1%} "
                  f"(median), {s['p90_miss']:.1%} (p90), {s['max_miss']:.1%} (largest)")
        else:
            print(f"{name:>7}:   0 (cell, run)s")
    record = {"schema_version": SCHEMA_VERSION, "kind": "repeatability",
              "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "environment": env,
              "config": vars(args), "summary": result, "cells": found,
              "sweeps": [{"created": r.created, "config": r.config, "reference_matmul": r.reference_matmul,
                          "rows": [{k: v for k, v in row.to_dict().items() if k != "samples_ms"} for row in r.rows]}
                         for r in records]}
    path = Path(args.out) / env["host"] / f"repeatability-{args.preset}.json"
    write_json(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
