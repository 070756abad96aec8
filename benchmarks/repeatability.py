"""How well a latency cell's p50 repeats from one sweep to the next, and whether the table's flags foretell it.

    python benchmarks/repeatability.py [--preset tiny] [--fusion all] [--backends torch,onnxruntime]
        [--batch-sizes 1,8,32] [--runs 4] [--rounds 1,3] [--threads N]

The same ``fusionprof latency`` sweep ``--runs`` times per ``--rounds`` setting (each a fresh process; the settings
alternate, so a slow quarter of an hour falls on both). Per setting, cell and run, how far its p50 lies from the
median of the other runs' p50s of that cell (``miss``: |p50 / median of the others - 1|): what a reader would be
wrong by, taking one sweep's figure for the machine's. ``relative_miss`` is the same after dividing each run's p50s
by that run's median miss ratio (its overall pace): what a comparison within one record is wrong by, which is what
interleaving (``--rounds`` above 1) is for. The misses are grouped by what the table said of that cell in that run:
nothing, ``!`` only (CV above 10 %: some slow calls) or ``~`` (its p50 moved by over 10 % between the first and the
second half of its calls: the pace changed while it was timed).

With ``--rounds`` above 1 it also checks the verdict an interleaved sweep prints (``fastest_fusions``: each fusion's
fastest cell against the fastest fusion's, told apart where every visit of one lay below every visit of the other, else
``≈``): per run, batch size and fusion, how often the other runs put the two fusions in the same order, for the pairs
told apart and for those that were not. With one round, the same count for the p50 order alone is the baseline.

Writes ``profiles/<host>/repeatability-<preset>-<created>.json``: the summary, and every sweep's rows (without their raw
samples, with their halves' p50s) and config.

    python benchmarks/repeatability.py --from RECORD [RECORD ...]

prints the verdicts' check for committed records (written before it was part of the summary) and writes it to
``profiles/<host>/verdicts-<preset>-<created>.json``.
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
from fusionprof.records import LatencyRecord, fastest_fusions

GROUPS = ("none", "! only", "~")


def sweep(args, rounds: int, run: int, work: Path) -> LatencyRecord:
    """One ``fusionprof latency`` in a child process; its record."""
    out = work / f"rounds{rounds}-run{run}"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "fusionprof", "latency", "--preset", args.preset, "--fusion", args.fusion,
               "--backends", args.backends, "--batch-sizes", args.batch_sizes, "--rounds", str(rounds),
               "--models", str(work / "none"), "--out", str(out), "--quiet",
               *(["--threads", str(args.threads)] if args.threads else [])]
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
                        "p50_ms": row.host.p50_ms, "halves_p50_ms": row.host.halves_p50_ms,
                        "rounds_p50_ms": row.host.rounds_p50_ms, "cv": row.host.cv, "group": group(row),
                        "others_median_p50_ms": others, "ratio": row.host.p50_ms / others})
    pace = {run: statistics.median(x["ratio"] for x in out if x["run"] == run) for run in range(len(records))}
    for x in out:
        x["run_pace"] = pace[x["run"]]
        x["miss"] = abs(x["ratio"] - 1)
    for x in out:  # the same against the other runs' p50s, each run's divided by its pace
        others = statistics.median(y["p50_ms"] / y["run_pace"] for y in out if y["run"] != x["run"] and
                                   (y["fusion"], y["backend"], y["batch_size"]) ==
                                   (x["fusion"], x["backend"], x["batch_size"]))
        x["relative_miss"] = abs(x["p50_ms"] / x["run_pace"] / others - 1)
    return out


def verdicts(records: list[LatencyRecord]) -> list[dict]:
    """Per run, batch size and fusion other than that run's fastest: whether the run told the two apart (None: one
    visit a cell) and in how many of the other runs the fastest's best p50 was again below the other's."""
    out = []
    ranked = [{batch: fastest_fusions(rec.rows, batch) for batch in sorted({r.batch_size for r in rec.rows if r.ok})}
              for rec in records]
    best = [{batch: {r.fusion: r.host.p50_ms for r, _ in order} for batch, order in run.items()} for run in ranked]
    for run, batches in enumerate(ranked):
        for batch, ((first, _), *rest) in batches.items():
            others = [b[batch] for i, b in enumerate(best) if i != run and batch in b]
            for row, apart in rest:
                agree = [o[first.fusion] < o[row.fusion] for o in others if first.fusion in o and row.fusion in o]
                out.append({"run": run, "batch_size": batch, "fastest": first.fusion, "other": row.fusion,
                            "told_apart": apart, "ratio": row.host.p50_ms / first.host.p50_ms,
                            "same_order": sum(agree), "other_runs": len(agree)})
    return out


def verdict_summary(found: list[dict]) -> dict:
    """Per verdict (told apart, ≈, or none: one visit a cell): pairs, their p50 ratio's range, and the share of the
    other runs that ordered them the same way."""
    out = {}
    for name, apart in (("told apart", True), ("≈", False), ("one visit", None)):
        pairs = [x for x in found if x["told_apart"] is apart]
        if pairs:
            runs = sum(x["other_runs"] for x in pairs)
            out[name] = {"pairs": len(pairs), "same_order": sum(x["same_order"] for x in pairs), "other_runs": runs,
                         "share": sum(x["same_order"] for x in pairs) / runs if runs else None,
                         "ratio": [min(x["ratio"] for x in pairs), max(x["ratio"] for x in pairs)]}
    return out


def describe_verdicts(v: dict) -> list[str]:
    return [f"  {name:>10}: {s['pairs']:2d} (run, batch, fusion)s at {s['ratio'][0]:.2f}-{s['ratio'][1]:.2f}x the "
            f"fastest; the other runs ordered them the same way {s['same_order']} of {s['other_runs']} times "
            f"({s['share']:.0%})" for name, s in v.items()]


def from_records(paths: list[str], out: str) -> None:
    """The verdicts' check of committed repeatability records, printed and written."""
    checked = {}
    for path in paths:
        raw = json.loads(Path(path).read_text())
        checked[path] = {}
        for rounds, result in raw["rounds"].items():
            recs = [LatencyRecord.from_dict({"schema_version": raw["schema_version"], "kind": LatencyRecord.kind,
                                             "environment": raw["environment"], **sweep,
                                             "rows": [{**row, "samples_ms": []} for row in sweep["rows"]]})
                    for sweep in result["sweeps"]]  # their rows kept every figure but the raw samples
            checked[path][rounds] = verdict_summary(verdicts(recs))
            print(f"{path}, rounds {rounds}:")
            print("\n".join(describe_verdicts(checked[path][rounds])))
    env = fingerprint()
    record = {"schema_version": SCHEMA_VERSION, "kind": "verdicts",
              "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "environment": env,
              "config": {"from": paths, "script": "benchmarks/repeatability.py --from"}, "checked": checked}
    preset = json.loads(Path(paths[0]).read_text())["config"]["preset"]
    path = Path(out) / env["host"] / f"verdicts-{preset}-{record['created']}.json"
    write_json(path, record)
    print(f"wrote {path}")


def spread(values: list[float]) -> dict:
    m = sorted(values)
    return {"n": len(m), "median": statistics.median(m) if m else None,
            "p90": m[min(len(m) - 1, int(0.9 * len(m)))] if m else None, "max": max(m, default=None)}


def summary(found: list[dict]) -> dict:
    """All (cell, run)s and per flag group: the median, p90 and largest miss and relative miss; each run's pace."""
    out = {"all": {k: spread([x[k] for x in found]) for k in ("miss", "relative_miss")},
           "run_pace": sorted({x["run"]: x["run_pace"] for x in found}.items())}
    for name in GROUPS:
        out[name] = {k: spread([x[k] for x in found if x["group"] == name]) for k in ("miss", "relative_miss")}
    return out


def describe(s: dict) -> str:
    return (f"{s['n']:3d} (cell, run)s, off the other runs' median by {s['median']:.1%} (median), {s['p90']:.1%} "
            f"(p90), {s['max']:.1%} (largest)") if s["n"] else "  0 (cell, run)s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="all")
    parser.add_argument("--backends", default="torch,onnxruntime")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", default="1", help="Comma-separated --rounds settings, alternated run by run.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="profiles")
    parser.add_argument("--from", dest="records", nargs="+", default=None,
                        help="Committed repeatability records: check their sweeps' verdicts, run nothing.")
    args = parser.parse_args()
    if args.records:
        return from_records(args.records, args.out)
    if args.runs < 3:
        raise SystemExit("--runs must be at least 3: a run's miss is against the median of the others")
    settings = [int(r) for r in args.rounds.split(",")]
    env = fingerprint()
    print(f"{machine_name(env)}, {env['cpu_logical_cores']} logical cores; {args.preset} {args.fusion}, "
          f"{args.backends}, batches {args.batch_sizes}; {args.runs} runs of rounds {args.rounds}", flush=True)
    records: dict[int, list[LatencyRecord]] = {r: [] for r in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for rounds in settings:
                records[rounds].append(sweep(args, rounds, run, Path(tmp)))
                print(f"run {run + 1}/{args.runs}, rounds {rounds}: {sum(r.ok for r in records[rounds][-1].rows)} "
                      "cells", flush=True)
    results = {}
    for rounds, recs in records.items():
        found = misses(recs)
        result = summary(found)
        result["verdicts"] = verdict_summary(verdicts(recs))
        results[rounds] = {"summary": result, "cells": found,
                           "sweeps": [{"created": r.created, "config": r.config,
                                       "reference_matmul": r.reference_matmul,
                                       "rows": [{k: v for k, v in row.to_dict().items() if k != "samples_ms"}
                                                for row in r.rows]} for r in recs]}
        print(f"rounds {rounds}: each run's pace (median p50 over the others' medians): "
              + ", ".join(f"{pace:.3f}" for _, pace in result["run_pace"]))
        for name in ("all", *GROUPS):
            print(f"  {name:>7}  p50: {describe(result[name]['miss'])}")
            print(f"  {'':>7}  relative to its run's pace: {describe(result[name]['relative_miss'])}")
        print("  each fusion against its run's fastest (each at its best backend), by the run's verdict:")
        print("\n".join(describe_verdicts(result["verdicts"])))
    record = {"schema_version": SCHEMA_VERSION, "kind": "repeatability",
              "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "environment": env,
              "config": vars(args), "rounds": {str(r): v for r, v in results.items()}}
    path = Path(args.out) / env["host"] / f"repeatability-{args.preset}-{record['created']}.json"
    write_json(path, record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
