"""AOTInductor packages of a sweep built one after another against side by side (``latency --build-jobs``).

    python benchmarks/pt2_builds.py [--preset tiny] [--fusion early,mid] [--jobs 2] [--device cpu] [--out profiles]

A ``.pt2`` build is a minute or more of compiling per model (on the CPU, one C++ compiler process; on a GPU, Triton
kernels), and a sweep's models are independent, so ``fusionprof latency`` builds them ``--build-jobs`` at a time
before it times anything. This times the build stage of such a sweep both ways, on the same random-init models,
each build into a fresh folder: one at a time (``--jobs 1``, what a sweep did before) and ``--jobs`` at a time, in the
order serial, side by side, side by side, serial (a slow stretch of the machine falls on both). Each way's wall
seconds are the median of its two runs. Writes ``profiles/<host>/pt2-builds-<preset>-<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.env import fingerprint, machine_name, utc_stamp
from fusionprof.latency import PackageBuild, SweepConfig, build_packages, load_artifacts
from fusionprof.models import fusion_names


def build_stage(cfg: SweepConfig, jobs: int) -> dict:
    """The packages of ``cfg.fusions``, built ``jobs`` at a time into a fresh folder: wall seconds, and whether each
    was built."""
    with tempfile.TemporaryDirectory(prefix="pt2-builds-") as work:
        builds: list[PackageBuild] = []
        for fusion in cfg.fusions:
            load_artifacts(cfg, fusion, Path(work), log=lambda _: None, later=builds)
        start = time.perf_counter()
        build_packages(builds, jobs, log=print)
        seconds = time.perf_counter() - start
        return {"jobs": jobs, "seconds": seconds, "built": {b.fusion: b.artifacts.pt2 is not None for b in builds},
                "failed": {b.fusion: b.artifacts.failed["pt2"] for b in builds if "pt2" in b.artifacts.failed}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="early,mid")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    fusions = fusion_names() if args.fusion == "all" else args.fusion.split(",")
    cfg = SweepConfig(preset=args.preset, fusions=fusions, backends=["aoti"], device=args.device,
                      precision=args.precision, models_dir="/nonexistent")
    env = fingerprint()
    runs = [build_stage(cfg, jobs) for jobs in (1, args.jobs, args.jobs, 1)]
    serial = statistics.median(r["seconds"] for r in runs if r["jobs"] == 1)
    side_by_side = statistics.median(r["seconds"] for r in runs if r["jobs"] == args.jobs)
    record = {"schema_version": SCHEMA_VERSION, "kind": "pt2-builds", "created": utc_stamp(),
              "args": vars(args), "runs": runs, "serial_seconds": serial, "side_by_side_seconds": side_by_side,
              "speedup": serial / side_by_side, "environment": env}
    path = Path(args.out) / env["host"] / f"pt2-builds-{args.preset}-{args.device.split(':')[0]}.json"
    write_json(path, record)
    each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    print(f"{machine_name(env, args.device)}, {env['cpu_logical_cores']} logical cores: {len(fusions)} {args.preset} "
          f"packages ({', '.join(fusions)}) on {args.device}: one at a time {serial:.1f} s, {args.jobs} at a time "
          f"{side_by_side:.1f} s ({serial / side_by_side:.2f}x); runs (1, {args.jobs}, {args.jobs}, 1 at a time) "
          f"{each} s; wrote {path}")


if __name__ == "__main__":
    main()
