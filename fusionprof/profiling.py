"""torch.profiler traces, always from a separate short run (never the timed one), for TensorBoard and Perfetto.

Traces are written with ``tensorboard_trace_handler`` to ``profiles/traces/<run>/``: ``tensorboard --logdir
profiles/traces`` shows them in the PyTorch Profiler tab (torch-tb-profiler), and each ``*.pt.trace.json`` is a
Chrome trace that https://ui.perfetto.dev opens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

TRACES = "traces"
# What a training step is made of, as record_function ranges in the loop and the model.
TRAIN_RANGES = ("data", "image_encoder", "text_encoder", "fusion", "align", "loss", "backward", "optimizer_step")
WAIT, WARMUP, ACTIVE = 1, 2, 4  # profiler schedule: steps skipped, warmed up, then recorded


def trace_dir(profiles_dir: str | Path, run: str) -> Path:
    return Path(profiles_dir) / TRACES / run


@contextmanager
def profiler(out: Path, device: torch.device, active: int = ACTIVE):
    """A profiler with the wait / warm-up / active schedule whose trace lands in ``out``; call ``.step()``."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, schedule=schedule(wait=WAIT, warmup=WARMUP, active=active, repeat=1),
                 on_trace_ready=tensorboard_trace_handler(str(out), worker_name=out.name), record_shapes=True,
                 profile_memory=True) as prof:
        yield prof


def steps_needed(active: int = ACTIVE) -> int:
    return WAIT + WARMUP + active


def range_breakdown(prof, names: tuple[str, ...], steps: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Mean time per step of each named range and its share of their sum (device time on CUDA)."""
    totals = dict.fromkeys(names, 0.0)
    for event in prof.key_averages():
        if event.key in totals:
            us = event.device_time_total if device.type == "cuda" else event.cpu_time_total
            totals[event.key] += us
    total = sum(totals.values()) or 1.0
    return {name: {"ms_per_step": us / steps / 1e3, "share": us / total} for name, us in totals.items()}


def run_profiled(step: Callable[[int], None], out: Path, device: torch.device, active: int = ACTIVE):
    """Run ``step(i)`` for the schedule's steps under the profiler; returns the profiler."""
    with profiler(out, device, active) as prof:
        for i in range(steps_needed(active)):
            step(i)
            prof.step()
    return prof


def trace_inference(cfg, work_dir: Path) -> Path:
    """One trace per (fusion, batch size) of the eager torch backend, in a run separate from the timed sweep.

    ``work_dir`` is the sweep's result folder, where its ONNX exports live."""
    from fusionprof.backends import create_backend
    from fusionprof.latency import load_artifacts
    from fusionprof.models.model import example_inputs
    from fusionprof.runtime import resolve_device

    device = resolve_device(cfg.device)
    for fusion in cfg.fusions:
        artifacts, _ = load_artifacts(cfg, fusion, work_dir, log=lambda s: None)
        backend = create_backend("torch", artifacts, device, cfg.precision)
        seq_len = cfg.seq_len or artifacts.model.cfg.max_text_len
        for batch_size in cfg.batch_sizes:
            inputs = example_inputs(artifacts.model.cfg, batch_size, seq_len)
            run = f"latency-{cfg.preset}-{fusion}-bs{batch_size}-{device.type}-{cfg.precision}"
            run_profiled(lambda i, x=inputs, b=backend: b.run(*x), trace_dir(cfg.profiles_dir, run), device)
    return trace_dir(cfg.profiles_dir, "")
