"""GPU inference at the hardware's pace: eager vs CUDA graphs vs AOTInductor, beside a bare CUDA-graph replay.

    PYTHONPATH=. python3 benchmarks/gpu_inference.py [--preset seed] [--precision bf16] [--batch-sizes 1,8,32,128]
        [--backends torch,torch-cudagraphs] [--more-backends aoti,torch-cudagraphs-inductor] [--more-fusions mid]
        [--aoti-fusions early,mid,late,bottleneck]
        [--compile-modes max-autotune] [--compile-batch-sizes 1] [--resume]

One process, so every figure shares the GPU's clocks and the same models, in this order (the record is rewritten
after each stage, so a run cut at its time limit keeps what it measured; ``stages`` lists those done, and
``--resume`` on the same machine with the same settings runs only the rest, in a second process: a lease split over
two calls, the second with inductor's caches warm):
1. the latency sweep (``fusionprof.latency.sweep``, random init: latency does not depend on the weights) over
   ``--backends`` for every fusion;
2. the reference: each fusion's model cast to the precision's dtype, captured once per batch size with a bare
   ``torch.cuda.CUDAGraph`` and replayed (the eager kernels), timed with CUDA events like the sweep's
   device-resident p50; and, for ``--compile-fusion``, that cast model run eagerly (the ``torch`` backend autocasts
   over fp32 weights instead);
3. ``--more-backends`` for ``--more-fusions`` only (each takes minutes to compile a seed model), in the order
   given: ``aoti`` (for ``--aoti-fusions``, if given), whose packages are built side by side before step 1 (one
   child process each, nothing timed meanwhile) and whose package call is also timed without the CUDA graph the
   backend replays it in; and inductor's kernels replayed (``torch-cudagraphs-inductor``);
4. with ``--compile-modes``, ``torch.compile(mode=...)`` of ``--compile-fusion``'s model at
   ``--compile-batch-sizes``: beside the kernels ``torch-cudagraphs-inductor`` replays (inductor's, default mode).
Then issue 14's checks, computed from those numbers: the best backend at the smallest batch against eager and
against the bare replay, its TFLOP/s at the largest batch, its CV, and aoti against torch-cudagraphs. The record
goes to ``profiles/<host>/gpu-inference-<preset>-<precision>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.config import model_config
from fusionprof.env import fingerprint, machine_name, utc_stamp
from fusionprof.latency import (
    MACHINE_KEYS,
    PackageBuild,
    SweepConfig,
    build_packages,
    load_artifacts,
    not_runnable,
    random_init_model,
    sweep,
)
from fusionprof.measure import Protocol, sample_cuda_events, summarize
from fusionprof.models import forward_flops, fusion_names
from fusionprof.models.model import example_inputs
from fusionprof.records import LatencyRow
from fusionprof.runtime import DTYPES, resolve_device


def timed_on_device(call, device, protocol: Protocol) -> dict:
    return summarize(sample_cuda_events(call, device, protocol))


def on_device(model, batch: int, seq_len: int, dtype, device) -> list[torch.Tensor]:
    """Example inputs on the GPU, images in the precision's dtype (the model's weights are cast to it)."""
    images, ids, mask = (t.to(device) for t in example_inputs(model.cfg, batch, seq_len))
    return [images.to(dtype), ids, mask]


def bare_replay(model, batch: int, seq_len: int, dtype, device, protocol: Protocol) -> dict:
    """The model's own kernels captured once and replayed: what launch-free inference of this model costs."""
    inputs = on_device(model, batch, seq_len, dtype, device)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.inference_mode():
        for _ in range(3):
            model(*inputs)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.inference_mode():
        model(*inputs)
    return timed_on_device(graph.replay, device, protocol)


def compiled_mode(model, mode: str, batch: int, seq_len: int, dtype, device, protocol: Protocol) -> dict:
    inputs = on_device(model, batch, seq_len, dtype, device)
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=mode)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(*inputs)
        torch.cuda.synchronize(device)
        compile_s = time.perf_counter() - start

        def call():
            torch.compiler.cudagraph_mark_step_begin()
            compiled(*inputs)
        return {**timed_on_device(call, device, protocol), "compile_seconds": compile_s}


def _max_cv(rows: list[dict]) -> float | None:
    """The largest device-resident CV of ``rows``; None when one of them has none (a single sample: its spread is
    unknown, and an unknown spread passes no CV bar)."""
    cvs = [r["device_resident"]["cv"] for r in rows]
    return None if None in cvs else max(cvs)


def checks(rows: list[dict], reference: dict, batch_sizes: list[int]) -> dict:
    """Issue 14's targets, from the device-resident p50s of the record."""
    # Rows that failed parity are timed all the same: they enter the ratios, and "parity" says which passed; the
    # best backend is one that passed
    ok = [r for r in rows if r.get("device_resident")]
    passed = {(r["fusion"], r["backend"]): r["status"] == "ok" for r in ok}
    p50 = {(r["fusion"], r["backend"], r["batch_size"]): r["device_resident"]["p50_ms"] for r in ok}
    smallest, largest = min(batch_sizes), max(batch_sizes)
    out = {}
    for fusion in sorted({r["fusion"] for r in ok}):
        at = {b: {k[1]: v for k, v in p50.items() if k[0] == fusion and k[2] == b} for b in batch_sizes}
        candidates = [(p, b) for b, p in at[smallest].items() if b != "torch" and passed[(fusion, b)]]
        if not candidates:
            continue
        best = min(candidates)[1]
        row_large = next((r for r in ok if (r["fusion"], r["backend"], r["batch_size"]) == (fusion, best, largest)),
                         None)
        out[fusion] = {
            "best_backend": best,
            "eager_over_best_at_smallest": at[smallest].get("torch", float("nan")) / at[smallest][best],
            "best_over_bare_replay_at_smallest": at[smallest][best] / reference[fusion][smallest]["p50_ms"],
            "best_tflops_at_largest": row_large and row_large["device_resident_gflops"] / 1e3,
            "parity": {b: v for (f, b), v in passed.items() if f == fusion},
            "best_cv_max": _max_cv([r for r in ok if (r["fusion"], r["backend"]) == (fusion, best)]),
            "aoti_over_cudagraphs": {b: at[b]["aoti"] / at[b]["torch-cudagraphs"] for b in batch_sizes
                                     if "aoti" in at[b] and "torch-cudagraphs" in at[b]},
        }
    return out


def eager_cast(model, batch: int, seq_len: int, dtype, device, protocol: Protocol) -> dict:
    """The eager model with its weights cast to the dtype (the ``torch`` backend autocasts over fp32 weights)."""
    inputs = on_device(model, batch, seq_len, dtype, device)
    with torch.inference_mode():
        return timed_on_device(lambda: model(*inputs), device, protocol)


def aoti_uncaptured(path: str, cfg, batch_sizes: list[int], seq_len: int, dtype, device, protocol) -> dict:
    """The .pt2 package's own call, no CUDA graph around it: what the aoti backend's replay saves."""
    runner = torch._inductor.aoti_load_package(str(path), device_index=device.index or 0)
    out = {}
    for b in batch_sizes:
        images, ids, mask = (t.to(device) for t in example_inputs(cfg, b, seq_len))
        images = images.to(dtype).contiguous()
        with torch.inference_mode():
            out[b] = timed_on_device(lambda: runner(images, ids, mask), device, protocol)  # noqa: B023
        print(f"aoti package call, no graph, bs {b}: p50 {out[b]['p50_ms']:.3f} ms", flush=True)
    return out


def aoti_packages(cfg: SweepConfig, work_dir: Path, timeout_s: float = 3600) -> dict:
    """The ``.pt2`` packages of ``cfg.fusions``, built side by side before anything is timed (one child process each,
    killed after ``timeout_s``, the GPU idle meanwhile) where the sweeps of the aoti stage will find them: per fusion,
    its path or why its build failed. Packages an earlier call built are kept; one that failed is not built again by
    a resumed call (a build that hangs would take the lease's every call)."""
    start = time.perf_counter()
    builds: list[PackageBuild] = []
    loaded = {fusion: load_artifacts(cfg, fusion, work_dir, later=builds) for fusion in cfg.fusions}
    build_packages(builds, len(builds), timeout_s=timeout_s)
    found = {fusion: {"path": str(a.pt2)} if a.pt2 else {"failed": a.failed["pt2"]}
             for fusion, (a, _) in loaded.items() if a.pt2 or "pt2" in a.failed}  # none where aoti cannot run here
    print(f"aoti packages after {time.perf_counter() - start:.0f} s: "
          + (", ".join(f"{f} {'ready' if 'path' in v else 'failed'}" for f, v in found.items()) or "none"), flush=True)
    return found


# What must match for --resume to continue a record: the settings every figure in it depends on.
SAME_SETTINGS = ("preset", "precision", "device", "batch_sizes", "backends", "min_seconds")


def earlier_record(path: Path, args, env: dict) -> tuple[dict, list[dict]] | None:
    """The record at ``path`` if it was made with the same settings on this machine: (record with its batch-size keys
    back as numbers, the rows of the sweeps it lists). None, with the reason printed, otherwise."""
    if not path.exists():
        print(f"nothing to resume at {path}: a new record", flush=True)
        return None
    record = json.loads(path.read_text())
    if any(record["args"].get(k) != getattr(args, k) for k in SAME_SETTINGS) or any(
            record["environment"].get(k) != env.get(k) for k in MACHINE_KEYS):
        print(f"not resuming {path}: other settings or another machine; a new record", flush=True)
        return None
    record.setdefault("stages", [])
    for stage in ("bare_replay", "eager_weights_cast", "aoti_uncaptured", "compile_modes"):  # JSON keys are strings
        record[stage] = {name: {int(b): v for b, v in by_batch.items()} for name, by_batch in record[stage].items()}
    rows = [r for sweep_path in record["sweeps"] for r in json.loads(Path(sweep_path).read_text())["rows"]]
    return record, rows


def begin_call(record: dict, args) -> dict:
    """This call's entry in ``record["calls"]`` (its start, its arguments, the stages it ran): a record continued by
    ``--resume`` keeps how each of its calls was made, not only the last one's ``args``."""
    call = {"started": utc_stamp(), "args": vars(args), "stages": []}
    record.setdefault("calls", []).append(call)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--batch-sizes", default="1,8,32,128")
    parser.add_argument("--backends", default="torch,torch-cudagraphs")
    parser.add_argument("--more-backends", default="aoti,torch-cudagraphs-inductor",
                        help="backends swept for --more-fusions only ('' for none)")
    parser.add_argument("--more-fusions", default="mid")
    parser.add_argument("--aoti-fusions", default=None,
                        help="aoti's fusions, if not --more-fusions: its packages are built side by side, before the "
                             "sweep, so it can take every fusion in the time inductor takes one")
    parser.add_argument("--build-limit", type=float, default=480,
                        help="seconds an aoti package's build may take before it is killed and its row says so (a "
                             "seed model compiled with dynamic shapes took 2.7-3.7 min alone in torch.compile on an "
                             "H200, and four build at once here)")
    parser.add_argument("--compile-modes", default="", help="e.g. reduce-overhead,max-autotune")
    parser.add_argument("--compile-batch-sizes", default="1")
    parser.add_argument("--compile-fusion", default="mid")
    parser.add_argument("--min-seconds", type=float, default=0.5)
    parser.add_argument("--out", default="profiles")
    parser.add_argument("--resume", action="store_true",
                        help="continue this machine's record of the same settings: its finished stages are kept "
                             "(a lease split over two calls, or a call cut at its limit)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type != "cuda":
        parser.error("this benchmark measures a GPU: --device cuda:N")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    protocol = Protocol(warmup_seconds=0.3, min_seconds=args.min_seconds, min_calls=100)  # p99 from 100 samples
    dtype, seq_len = DTYPES[args.precision], model_config(args.preset).max_text_len
    common = dict(preset=args.preset, batch_sizes=batch_sizes, device=str(device), precision=args.precision,
                  models_dir="/nonexistent", profiles_dir=args.out, protocol=protocol)
    env = fingerprint()
    path = Path(args.out) / env["host"] / f"gpu-inference-{args.preset}-{args.precision}.json"
    record = {"schema_version": SCHEMA_VERSION, "kind": "gpu_inference", "args": vars(args), "sweeps": [],
              "aoti_builds": {}, "bare_replay": {}, "eager_weights_cast": {}, "aoti_uncaptured": {},
              "compile_modes": {}, "checks": {}, "stages": [], "calls": [], "environment": env}
    rows: list[dict] = []
    if args.resume and (before := earlier_record(path, args, env)):
        record, rows = before
        record["args"] = vars(args)  # the last call's; "calls" keeps each call's, with the stages it ran
        print(f"resuming {path}: stages done: {', '.join(record['stages'])}", flush=True)
    begin_call(record, args)
    done = set(record["stages"])

    def save(stage: str) -> None:  # after every stage: a run cut short at its time limit keeps what it measured
        if record["bare_replay"]:
            found = record["checks"] = checks(rows, record["bare_replay"], batch_sizes)
            record["median_best_over_bare"] = statistics.median(
                c["best_over_bare_replay_at_smallest"] for c in found.values()) if found else None
        record["completed"] = stage
        record["stages"].append(stage)
        record["calls"][-1]["stages"].append(stage)
        write_json(path, record)
        print(f"{machine_name(env)}: wrote {path} ({stage})", flush=True)

    def add(rec) -> None:
        record["sweeps"].append(rec.path)
        rows.extend(r.to_dict() for r in rec.rows)

    def fusions_of(backend: str) -> list[str]:
        chosen = args.aoti_fusions if backend == "aoti" and args.aoti_fusions is not None else args.more_fusions
        return [f for f in chosen.split(",") if f]

    if "aoti" in args.more_backends.split(",") and "aoti packages" not in done:
        record["aoti_builds"] = aoti_packages(SweepConfig(fusions=fusions_of("aoti"), backends=["aoti"], **common),
                                              Path(args.out) / env["host"], args.build_limit)
        save("aoti packages")
    if "sweep" not in done:  # a sweep cut before continues from its partial rows
        add(sweep(SweepConfig(fusions=fusion_names(), backends=args.backends.split(","), **common), log=print,
                  resume=args.resume))
        save("sweep")
    models = {}
    for fusion in fusion_names() if "bare replay" not in done else []:
        model = random_init_model(args.preset, fusion)
        flops = forward_flops(model, seq_len)["total"]  # counted in fp32 on the CPU, before the cast
        model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last)
        reference = record["bare_replay"][fusion] = {}
        for b in batch_sizes:
            r = bare_replay(model, b, seq_len, dtype, device, protocol)
            reference[b] = {**r, "tflops": flops * b / (r["p50_ms"] / 1e3) / 1e12}
            print(f"bare CUDA-graph replay {fusion} bs {b}: p50 {r['p50_ms']:.3f} ms, "
                  f"{reference[b]['tflops']:.1f} TFLOP/s", flush=True)
        if fusion == args.compile_fusion:
            models[fusion] = model
            record["eager_weights_cast"][fusion] = {
                b: eager_cast(model, b, seq_len, dtype, device, protocol) for b in batch_sizes}
            print(f"eager, weights cast to {args.precision}, {fusion}: " + ", ".join(
                f"bs {b} p50 {v['p50_ms']:.3f} ms" for b, v in record["eager_weights_cast"][fusion].items()))
        else:
            del model
    if "bare replay" not in done:
        save("bare replay")
    # One sweep per (backend, fusion), saved after each: minutes of compiling apiece, so a cut keeps the rest
    for backend in filter(None, args.more_backends.split(",")):
        for fusion in fusions_of(backend):
            if f"{backend} {fusion}" not in done:
                failed = record.get("aoti_builds", {}).get(fusion, {}).get("failed") if backend == "aoti" else None
                if reason := not_runnable(backend, device, args.precision):  # a row says why; the next one runs
                    rows.append(LatencyRow(fusion, backend, f"unavailable: {reason}").to_dict())
                elif failed:  # not built again: a build that crashed or ran out of time would do so twice
                    rows.append(LatencyRow(fusion, backend, f"failed: {failed}").to_dict())
                else:
                    add(sweep(SweepConfig(fusions=[fusion], backends=[backend], **common), log=print))
                save(f"{backend} {fusion}")
        for fusion in fusions_of("aoti") if backend == "aoti" else []:  # seconds: before the next backend's minutes
            package = next((r["backend_info"]["package"] for r in rows if r["fusion"] == fusion
                            and r["backend"] == "aoti" and "package" in r.get("backend_info", {})), None)
            if package and f"aoti {fusion} uncaptured" not in done:
                record["aoti_uncaptured"][fusion] = aoti_uncaptured(package, model_config(args.preset), batch_sizes,
                                                                    seq_len, dtype, device, protocol)
                save(f"aoti {fusion} uncaptured")
    for mode in filter(None, args.compile_modes.split(",")):
        pending = [int(b) for b in args.compile_batch_sizes.split(",") if f"compile {mode} bs {b}" not in done]
        if not pending:
            continue
        model = models.get(args.compile_fusion) or random_init_model(args.preset, args.compile_fusion).to(
            device=device, dtype=dtype, memory_format=torch.channels_last)
        timed = record["compile_modes"].setdefault(mode, {})
        for b in pending:
            timed[b] = compiled_mode(model, mode, b, seq_len, dtype, device, protocol)
            print(f"torch.compile mode={mode} {args.compile_fusion}: bs {b} p50 {timed[b]['p50_ms']:.3f} ms "
                  f"(compile {timed[b]['compile_seconds']:.0f} s)", flush=True)
            save(f"compile {mode} bs {b}")
    for fusion, c in record["checks"].items():
        print(f"{fusion}: best {c['best_backend']}: eager/best at bs {min(batch_sizes)} = "
              f"{c['eager_over_best_at_smallest']:.1f}×, "
              f"best/bare replay = {c['best_over_bare_replay_at_smallest']:.2f}, "
              f"{c['best_tflops_at_largest'] or float('nan'):.0f} TFLOP/s at bs {max(batch_sizes)}, "
              f"max CV {'unknown (one sample)' if c['best_cv_max'] is None else format(c['best_cv_max'], '.1%')}"
              + "".join(f", aoti/cudagraphs bs {b} {v:.2f}" for b, v in c["aoti_over_cudagraphs"].items()))
    save("done")


if __name__ == "__main__":
    main()
