"""The LoadGen harness is not the bottleneck: a backend that does nothing, behind the batching SUT, in Server mode.

    python benchmarks/loadgen_harness.py [--qps 2000] [--p99-ms 2] [--min-duration 10] [--max-batch 1,8]

Everything of ``fusionprof load`` runs except the model: the test split's samples are gathered and normalised per
batch exactly as for a real backend, queued, batched and completed through LoadGen; the backend returns zeros at
once. Target: LoadGen calls ≥ 2,000 QPS VALID with p99 ≤ 2 ms on 2 cores. Writes
``profiles/<host>/loadgen-harness-cpu.json`` (LoadGen's logs in the folder of the same name; with ``--find-max``
also the largest rate that stays VALID here) and prints the CPU model and the machine's load average, which
decides how much the other processes on it take.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qps", type=float, default=2000.0)
    parser.add_argument("--p99-ms", type=float, default=2.0)
    parser.add_argument("--min-duration", type=float, default=10.0)
    parser.add_argument("--max-batch", default="1,8", help="Comma-separated: one Server run per batching setting.")
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0)
    parser.add_argument("--find-max", action="store_true",
                        help="Also bisect for the largest VALID rate (largest --max-batch).")
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
            def trial(qps: float):
                settings = LoadSettings("server", target_qps=qps, p99_ms=args.p99_ms,
                                        min_duration_s=args.min_duration, min_query_count=SERVER_MIN_QUERIES)
                run = run_loadgen(sut, len(library), settings, path.with_suffix("") / f"find-max-{qps:.6g}qps")
                print(f"  max batch {max_batch}, {qps:8.1f} QPS: {describe(run)}")
                return run
            best, trials = find_max_qps(trial, first_qps=args.qps, max_trials=6)
        largest = {"max_batch": max_batch, "max_valid_qps": best.settings["target_qps"] if best else None,
                   "trials": [t.to_dict() for t in trials]}
        print(f"largest VALID rate at p99 ≤ {args.p99_ms:g} ms: "
              f"{'none' if best is None else format(best.settings['target_qps'], '.1f')} QPS")
    load_after = os.getloadavg()
    print(f"load average {load_after[0]:.2f} (1 min) after the runs")
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "loadgen-harness",
                      "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
                      "target": f"≥ {args.qps:g} QPS VALID with p99 ≤ {args.p99_ms:g} ms, no-op backend",
                      "passed": all(r["valid"] for r in runs), "load_average_1min": [load_before[0], load_after[0]],
                      "samples": len(library), "environment": env, "runs": runs, "find_max": largest})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
