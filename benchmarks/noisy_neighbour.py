"""What a busy neighbour costs a latency figure, and how many threads to give a backend on a shared machine.

    python benchmarks/noisy_neighbour.py [--fusion mid] [--backends torch,onnxruntime] [--batch-sizes 1,8]
        [--rounds 3] [--contend 1] [--threads 1,2]

One ``fusionprof latency`` sweep (a fresh process each: the thread pools are made once per process) per setting:
each thread count (default 1 and every core) on a quiet machine and beside ``--contend`` processes that spin a core
each; the settings alternate for ``--rounds`` rounds so that a slow minute falls on all of them. Per (backend, batch)
the median p50 of the rounds, and the other processes' CPU use each sweep recorded (``contention``), which shows
the neighbour was there or not. The ratios: each thread count's p50 beside the neighbour over its p50 quiet (what
the neighbour costs), and beside the neighbour, the most threads' p50 over the fewest's (above 1: fewer threads
are faster there).

Writes ``profiles/<host>/noisy-neighbour-<preset>-<fusion>.json``: the summary, and every sweep's rows (without
their raw samples) and config.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.atomic import write_json
from fusionprof.env import fingerprint, machine_name


def sweep(args, threads: int, work: Path) -> dict:
    """One ``fusionprof latency`` in a child process; its record."""
    out = work / f"t{threads}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fusionprof", "latency", "--preset", args.preset, "--fusion", args.fusion,
               "--backends", args.backends, "--batch-sizes", args.batch_sizes, "--threads", str(threads),
               "--models", str(work / "no-checkpoints"), "--out", str(out), "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    [path] = out.glob("*/latency-*.json")
    return json.loads(path.read_text())


def kept(record: dict) -> dict:
    """What the summary keeps of a sweep's record (its own file is not kept: it would enter reports as a sweep of
    its own): its config, yardstick and rows, each row's summary without its raw samples."""
    return {"created": record["created"], "config": record["config"], "reference_matmul": record["reference_matmul"],
            "rows": [{k: v for k, v in row.items() if k != "samples_ms"} for row in record["rows"]]}


def setting_name(threads: int, busy: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}, " + (f"{busy} busy" if busy else "quiet")


def summarize(runs: dict[str, list[dict]], thread_counts: list[int], contend: int) -> dict:
    """Per (backend, batch): each setting's median p50 and its sweeps' other-process load; the ratios."""
    cells: dict[str, dict] = {}
    for name, records in runs.items():
        for record in records:
            for row in record["rows"]:
                if row["status"] != "ok":
                    continue
                cell = cells.setdefault(f"{row['backend']} batch {row['batch_size']}", {})
                got = cell.setdefault(name, {"p50_ms": [], "other_processes_cores": []})
                got["p50_ms"].append(row["p50_ms"])
                got["other_processes_cores"].append(row["contention"]["other_processes_cores"])
    for cell in cells.values():
        for got in cell.values():
            got["median_p50_ms"] = round(statistics.median(got["p50_ms"]), 3)
        ratios = {}
        for t in thread_counts:
            quiet, busy = cell.get(setting_name(t, 0)), cell.get(setting_name(t, contend))
            if quiet and busy:
                ratios[f"{setting_name(t, contend)} / quiet"] = round(busy["median_p50_ms"] / quiet["median_p50_ms"], 2)
        most, fewest = cell.get(setting_name(max(thread_counts), contend)), cell.get(setting_name(min(thread_counts),
                                                                                                    contend))
        if most and fewest and len(thread_counts) > 1:
            ratios[f"beside the neighbour: {max(thread_counts)} threads / {min(thread_counts)}"] = round(
                most["median_p50_ms"] / fewest["median_p50_ms"], 2)
        cell["ratios"] = ratios
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contend", type=int, default=1, help="Processes spinning a core each beside a sweep.")
    parser.add_argument("--threads", default=f"1,{os.cpu_count()}", help="Thread counts to compare.")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    thread_counts = sorted({int(t) for t in args.threads.split(",")})
    env = fingerprint()
    print(f"{machine_name(env)}, {env['cpu_logical_cores']} logical cores; {args.preset}/{args.fusion}, "
          f"{args.backends}, batches {args.batch_sizes}; {args.rounds} rounds")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="noisy-neighbour-") as tmp:
        for round_ in range(1, args.rounds + 1):
            for busy in (0, args.contend):
                for threads in thread_counts:
                    with contention.neighbours(busy):
                        record = sweep(args, threads, Path(tmp))
                    name = setting_name(threads, busy)
                    runs.setdefault(name, []).append(record)
                    others = [r["contention"]["other_processes_cores"] for r in record["rows"] if r.get("contention")]
                    print(f"round {round_}, {name}: "
                          + ", ".join(f"{r['backend']} bs{r['batch_size']} {r['p50_ms']:.2f} ms"
                                      for r in record["rows"] if r["status"] == "ok")
                          + f"  (other processes {min(others):.2f}–{max(others):.2f} cores)")
    cells = summarize(runs, thread_counts, args.contend)
    for cell, got in cells.items():
        print(f"{cell}: " + "; ".join(f"{name} {got[name]['median_p50_ms']:.2f} ms" for name in runs if name in got))
        for ratio, value in got["ratios"].items():
            print(f"    {ratio}: {value:.2f}×")
    path = Path(args.out) / env["host"] / f"noisy-neighbour-{args.preset}-{args.fusion}.json"
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "noisy-neighbour",
                      "created": datetime.now(timezone.utc).isoformat(), "args": vars(args),
                      "cells": cells, "sweeps": {name: [kept(r) for r in rs] for name, rs in runs.items()},
                      "environment": env})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
