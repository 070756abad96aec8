"""The LoadGen harness is not the bottleneck: a backend that does nothing, behind the batching SUT, in Server mode.

    python benchmarks/loadgen_harness.py [--qps 2000] [--p99-ms 2] [--min-duration 10] [--max-batch 1,8]
                                         [--find-max] [--floor-rates 50,200,1000]

Everything of ``fusionprof load`` runs except the model: the test split's samples are gathered and normalised per
batch exactly as for a real backend, queued, batched and completed through LoadGen; the backend returns zeros at
once. Target: LoadGen calls ≥ 2,000 QPS VALID with p99 ≤ 2 ms on 2 cores. Writes
``profiles/<host>/loadgen-harness-cpu.json`` (LoadGen's logs in the folder of the same name; with ``--find-max``
also the largest rate that stays VALID here) and prints the CPU model and the machine's load average, which
decides how much the other processes on it take.

The floor: the same no-op, unbatched, at a few lower rates (judged against p99 ≤ 50 ms, as the load runs are).
Whatever a request's latency is there is threads waking (LoadGen's issue thread, the batcher's worker), gathering its
inputs and handing over: the part of any Server figure at that load that is not the model. The batcher's own times
split it: queued (the worker waking) and served (the inputs gathered; the no-op itself takes nothing).
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.config import model_config
from fusionprof.env import fingerprint
from fusionprof.load import describe, test_library
from fusionprof.loadgen import SERVER_MIN_QUERIES, BatchingSUT, LoadSettings, find_max_qps, run_loadgen


def no_op(images, input_ids, attention_mask) -> np.ndarray:
    return np.zeros(len(images), np.float32)


FLOOR_P99_MS = 50.0  # the floor is judged as `fusionprof load`'s runs are (README), not by the harness's 2 ms target


def floor_runs(library, rates: list[float], min_duration_s: float, folder: Path) -> list[dict]:
    """The no-op backend, unbatched, at each Server rate: what threads waking and gathering one sample's inputs cost
    a request at that load."""
    floor = []
    for qps in rates:
        with BatchingSUT(no_op, library.inputs) as sut:
            settings = LoadSettings("server", target_qps=qps, p99_ms=FLOOR_P99_MS, min_duration_s=min_duration_s,
                                    min_query_count=SERVER_MIN_QUERIES)
            run = run_loadgen(sut, len(library), settings, folder / f"floor-{qps:g}qps")
        print(f"floor: no-op backend, no batching, {qps:g} QPS offered: {describe(run)}")
        floor.append({"target_qps": qps, **run.to_dict()})
    return floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qps", type=float, default=2000.0)
    parser.add_argument("--p99-ms", type=float, default=2.0)
    parser.add_argument("--min-duration", type=float, default=10.0)
    parser.add_argument("--max-batch", default="1,8", help="Comma-separated: one Server run per batching setting.")
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0)
    parser.add_argument("--find-max", action="store_true",
                        help="Also bisect for the largest VALID rate (largest --max-batch).")
    parser.add_argument("--floor-rates", default="50,200,1000",
                        help="Comma-separated Server rates for the floor: the no-op unbatched at each ('' skips).")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    env = fingerprint()
    load_before = os.getloadavg()
    print(f"{env['cpu_model']}, {env['cpu_logical_cores']} logical cores; load average {load_before[0]:.2f} "
          f"(1 min) before the runs")
    library, _ = test_library("tiny", model_config("tiny"), {}, progress=False)
    path = Path(args.out) / env["host"] / "loadgen-harness-cpu.json"
    runs = []
    for max_batch in (int(b) for b in args.max_batch.split(",")):
        with BatchingSUT(no_op, library.inputs, max_batch, args.batch_timeout_ms) as sut:
            settings = LoadSettings("server", target_qps=args.qps, p99_ms=args.p99_ms,
                                    min_duration_s=args.min_duration, min_query_count=SERVER_MIN_QUERIES)
            run = run_loadgen(sut, len(library), settings, path.with_suffix("") / f"max-batch-{max_batch}")
        print(f"no-op backend, max batch {max_batch}, {args.qps:g} QPS offered, p99 target {args.p99_ms:g} ms: "
              f"{describe(run)}")
        runs.append({"max_batch": max_batch, "batch_timeout_ms": args.batch_timeout_ms, **run.to_dict()})
    largest = None
    if args.find_max:
        max_batch = max(int(b) for b in args.max_batch.split(","))
        with BatchingSUT(no_op, library.inputs, max_batch, args.batch_timeout_ms) as sut:
            def trial(qps: float, min_queries: int | None = None):  # more queries: a rerun LoadGen asked for
                settings = LoadSettings("server", target_qps=qps, p99_ms=args.p99_ms,
                                        min_duration_s=args.min_duration,
                                        min_query_count=min_queries or SERVER_MIN_QUERIES)
                name = f"find-max-{qps:.6g}qps" + (f"-{min_queries}q" if min_queries else "")
                run = run_loadgen(sut, len(library), settings, path.with_suffix("") / name)
                print(f"  max batch {max_batch}, {qps:8.1f} QPS: {describe(run)}")
                return run
            best, trials = find_max_qps(trial, first_qps=args.qps, max_trials=6)
        largest = {"max_batch": max_batch, "max_valid_qps": best.settings["target_qps"] if best else None,
                   "trials": [t.to_dict() for t in trials]}
        print(f"largest VALID rate at p99 ≤ {args.p99_ms:g} ms: "
              f"{'none' if best is None else format(best.settings['target_qps'], '.1f')} QPS")
    floor = floor_runs(library, [float(q) for q in args.floor_rates.split(",") if q], args.min_duration,
                       path.with_suffix(""))
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.2f} (1 min) after the runs")
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "loadgen-harness",
                      "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                      "target": f"≥ {args.qps:g} QPS VALID with p99 ≤ {args.p99_ms:g} ms, no-op backend",
                      "passed": all(r["valid"] for r in runs), "load_average_1min": [load_before[0], load_after[0]],
                      "samples": len(library), "environment": env, "runs": runs, "find_max": largest,
                      "floor": floor})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
