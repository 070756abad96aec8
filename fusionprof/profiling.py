"""torch.profiler traces, always from a separate short run (never the timed one), for TensorBoard and Perfetto.

Traces are written with ``tensorboard_trace_handler`` to ``profiles/traces/<run>/``: ``tensorboard --logdir
profiles/traces`` shows them in the PyTorch Profiler tab (torch-tb-profiler), and each ``*.pt.trace.json`` is a
Chrome trace that https://ui.perfetto.dev opens.
"""

from __future__ import annotations

import bisect
import gzip
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

TRACES = "traces"
# What a training step is made of, as record_function ranges in the loop and the model.
TRAIN_RANGES = ("data", "image_encoder", "text_encoder", "fusion", "align", "loss", "backward", "optimizer_step")
WAIT, WARMUP, ACTIVE = 1, 2, 4  # profiler schedule: steps skipped, warmed up, then recorded
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # trace categories of time spent on the GPU


def trace_dir(profiles_dir: str | Path, run: str) -> Path:
    return Path(profiles_dir) / TRACES / run


@contextmanager
def profiler(out: Path, device: torch.device, active: int = ACTIVE):
    """A profiler with the wait / warm-up / active schedule whose trace lands in ``out``; call ``.step()``."""
    # torch 2.14's Kineto prints stage lines, and "ERROR ... gpuGetDeviceCount failed" on a CUDA build without a
    # GPU, to stderr on every profiled run; read when the profiler starts, so this quiets it unless the user asked.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=active, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(str(out), worker_name=out.name), record_shapes=True,
                 profile_memory=True) as prof:
        yield prof


def steps_needed(active: int = ACTIVE) -> int:
    return WAIT + WARMUP + active


def step_breakdown(trace: Path, names: tuple[str, ...]) -> dict:
    """What a profiled step is made of, read from its Chrome trace.

    Per named ``record_function`` range: its host time per step (the range's span on the thread that opened it)
    and its share of the ranges' sum; where the trace holds GPU work, also ``gpu_ms_per_step``, the kernel, copy
    and memset time launched while the range was open, from any thread (backward's kernels are launched by
    autograd's own thread while the loop waits inside ``backward``). Alongside, the mean profiled step and the GPU
    busy time in it: a small busy share means the step is bound by the host (launches, Python), not the GPU."""
    opener = gzip.open if Path(trace).suffix == ".gz" else open
    with opener(trace, "rt") as f:
        events = json.load(f)["traceEvents"]
    annotations = [e for e in events if e.get("cat") == "user_annotation"]
    steps = [e for e in annotations if e["name"].startswith("ProfilerStep#")]
    ranges = sorted((e for e in annotations if e["name"] in names), key=lambda e: e["ts"])
    launched_at = {e["args"]["correlation"]: e["ts"] for e in events
                   if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    gpu_work = [e for e in events if e.get("cat") in GPU_WORK]
    n = max(len(steps), 1)
    host, gpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for r in ranges:
        host[r["name"]] += r["dur"]
    starts = [r["ts"] for r in ranges]
    for work in gpu_work:
        t = launched_at.get(work.get("args", {}).get("correlation"))
        i = bisect.bisect_right(starts, t) - 1 if t is not None else -1
        if i >= 0 and t <= ranges[i]["ts"] + ranges[i]["dur"]:
            gpu[ranges[i]["name"]] += work["dur"]
    total = sum(host.values()) or 1.0
    parts = {name: {"ms_per_step": host[name] / n / 1e3, "share": host[name] / total} for name in names}
    step_ms = sum(e["dur"] for e in steps) / n / 1e3
    summary = {"steps": len(steps), "step_ms": step_ms, "trace": str(trace)}
    if gpu_work:
        for name in names:
            parts[name]["gpu_ms_per_step"] = gpu[name] / n / 1e3
        busy = sum(e["dur"] for e in gpu_work) / n / 1e3
        summary.update(gpu_busy_ms=busy, gpu_busy_share=busy / step_ms if step_ms else None)
    return {"ranges": parts, "step": summary}


def describe_step_profile(profile: dict) -> str:
    """One log line: the profiled step, the host time of each range and, on a GPU, how busy the GPU was."""
    step, ranges = profile["step"], profile["ranges"]
    line = (f"training step profile ({step['trace']}): {step['step_ms']:.1f} ms a step under the profiler; host: "
            + ", ".join(f"{k} {v['ms_per_step']:.1f} ms ({v['share']:.0%})" for k, v in ranges.items()))
    if "gpu_busy_ms" in step:
        line += (f"; GPU busy {step['gpu_busy_ms']:.1f} ms ({step['gpu_busy_share']:.0%} of the step): "
                 + ", ".join(f"{k} {v['gpu_ms_per_step']:.2f}" for k, v in ranges.items()) + " ms")
    return line


def run_profiled(step: Callable[[int], None], out: Path, device: torch.device, active: int = ACTIVE) -> Path:
    """Run ``step(i)`` for the schedule's steps under the profiler; returns the trace it wrote."""
    before = set(out.glob("*.pt.trace.json"))
    with profiler(out, device, active) as prof:
        for i in range(steps_needed(active)):
            step(i)
            prof.step()
    [trace] = set(out.glob("*.pt.trace.json")) - before
    return trace

