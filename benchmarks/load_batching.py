"""What dynamic batching buys under load: the largest Server rate with p99 under a target, batching off vs on.

    python benchmarks/load_batching.py [--fusion mid] [--backend onnxruntime] [--reps 3] [--max-batch 16]
        [--batch-timeout-ms 20] [--p99-ms 50] [--contend 1]
    python benchmarks/load_batching.py --summarize profiles/vm/load-server-tiny-mid-onnxruntime-fp32-*.json

One ``fusionprof load --find-max-qps`` search per setting — no batching and batches up to ``--max-batch``, each with
onnxruntime's pool threads spinning and sleeping between calls — repeated ``--reps`` times, interleaved so that a
slow minute of a shared machine falls on every setting alike. A single search moves by ±25 % from one run to the
next on a 2-core VM (Poisson arrivals, 10 s runs, a 10 % bisection), so the medians decide, and the ratio of
medians is what is quoted. ``--summarize`` builds the same summary from Server records already on disk.

``--contend N`` runs N busy-looping processes beside every search (a noisy neighbour, each taking a core when it
can), the case that ``--no-spin-wait`` is for: spinning pool threads then compete with the neighbour for the cores.
The summary records N and its file name ends in ``-contended<N>``; every search's record says how many cores other
processes took during it (``contention``), and the summary lists that beside each search's rate.

Writes ``profiles/<host>/load-batching-<preset>-<fusion>-<backend>.json``: per setting every run's max QPS and its
record, the median, and the ratio of each batched median to the unbatched one with the same threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from datetime import datetime, timezone
from pathlib import Path

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.atomic import write_json
from fusionprof.env import fingerprint
from fusionprof.loadgen import LoadRecord


def setting(record: dict) -> str:
    threads = "spin" if record["config"].get("spin_wait", True) else "sleep"
    return f"{record['batching']}, threads {threads}"


IDENTITY = ("preset", "fusion", "backend", "precision", "device", "p99_target_ms")


def summarize(paths: list[Path]) -> dict:
    """The find-max Server searches among ``paths``, by setting; they must all search for one model and target
    (medians across fusions or targets would mean nothing)."""
    runs: dict[str, list[dict]] = {}
    identity, environment = None, None
    neighbour: dict[bool, Path] = {}  # busy or not → a record that was
    for path in paths:
        record = json.loads(path.read_text())
        if record.get("kind") != "load" or record.get("scenario") != "server" or not record["config"]["find_max_qps"]:
            continue
        this = {k: record[k] for k in IDENTITY}
        if identity not in (None, this):
            raise SystemExit(f"{path} searches for {this}, the others for {identity}: summarize one at a time")
        identity, environment = this, environment or record["environment"]
        load = LoadRecord.from_dict(record, path).contention
        others = load.get("other_processes_cores")  # None: written before searches were watched
        if others is not None:
            neighbour.setdefault(contention.busy(load), path)
            if len(neighbour) > 1:
                raise SystemExit(f"{neighbour[True]} ran beside a busy neighbour, {neighbour[False]} did not: "
                                 "summarize quiet and contended searches apart")
        runs.setdefault(setting(record), []).append({"max_qps": record["max_qps"], "record": str(path),
                                                     "other_processes_cores": others})
    if identity is None:
        raise SystemExit("no find-max Server search among the records given")
    medians = {name: statistics.median(r["max_qps"] or 0.0 for r in got) for name, got in runs.items()}
    ratios = {}
    for name, median in medians.items():
        if name.startswith("no batching"):
            continue
        threads = name.split(", ")[-1]
        base = medians.get(f"no batching, {threads}")
        if base:
            ratios[f"{name} / no batching, {threads}"] = round(median / base, 2)
    best_batched = max((m for n, m in medians.items() if not n.startswith("no batching")), default=None)
    best_single = max((m for n, m in medians.items() if n.startswith("no batching")), default=None)
    if best_batched and best_single:
        ratios["best batched / best unbatched"] = round(best_batched / best_single, 2)
    return {**identity, "environment": environment, "ratios": ratios,
            "settings": {name: {"runs": got, "median_max_qps": round(medians[name], 1)} for name, got in runs.items()}}


def _others(runs: list[dict]) -> str:
    """The other processes' CPU use during each search, where its record says (``contention``)."""
    cores = [r["other_processes_cores"] for r in runs if r.get("other_processes_cores") is not None]
    return f"  (other processes: {', '.join(f'{c:.2f}' for c in cores)} cores)" if cores else ""


def run_reps(args) -> list[Path]:
    from fusionprof.load import LoadConfig, load

    paths = []
    for rep in range(args.reps):
        for spin in (True, False):
            for max_batch, timeout in ((1, 0.0), (args.max_batch, args.batch_timeout_ms)):
                cfg = LoadConfig(fusion=args.fusion, backend=args.backend, scenario="server", find_max_qps=True,
                                 p99_ms=args.p99_ms, max_batch=max_batch, batch_timeout_ms=timeout, spin_wait=spin,
                                 preset=args.preset, profiles_dir=args.out)
                with contention.neighbours(args.contend):
                    record = load(cfg, progress=False, log=lambda line: None)
                print(f"rep {rep + 1}: batch≤{max_batch} wait≤{timeout:g}ms, threads {'spin' if spin else 'sleep'}: "
                      f"{record.max_qps} QPS ({record.path}); load average {os.getloadavg()[0]:.2f}")
                paths.append(Path(record.path))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=20.0)
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--contend", type=int, default=0, help="Busy-looping processes beside every search.")
    parser.add_argument("--summarize", nargs="+", type=Path, help="Server records on disk instead of new runs.")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    env = fingerprint()
    print(f"{env['cpu_model']}, {env['cpu_logical_cores']} logical cores; load average {os.getloadavg()[0]:.2f}")
    paths = args.summarize or run_reps(args)
    summary = summarize(sorted(paths))
    for name, got in summary["settings"].items():
        print(f"{name:<40} median {got['median_max_qps']:7.1f} QPS  runs "
              + ", ".join(f"{r['max_qps']:.1f}" if r["max_qps"] else "none VALID" for r in got["runs"])
              + _others(got["runs"]))
    for name, ratio in summary["ratios"].items():
        print(f"{name}: {ratio:.2f}×")
    contended = f"-contended{args.contend}" if args.contend else ""
    name = f"load-batching-{summary['preset']}-{summary['fusion']}-{summary['backend']}{contended}.json"
    path = Path(args.out) / summary["environment"]["host"] / name
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "load-batching",
                      "created": datetime.now(timezone.utc).isoformat(), "contending_processes": args.contend,
                      **summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
