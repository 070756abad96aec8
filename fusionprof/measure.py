"""The timing protocol: one for every backend, so their numbers can stand side by side.

Warm up until both a minimum time and a minimum count are reached, then sample until both a minimum time
and a minimum count are reached (capped), keeping every sample. Each sample is one call followed by the
backend's synchronisation, timed with ``time.perf_counter_ns``; on CUDA, device-resident work is timed
with CUDA events instead.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

CV_WARNING = 0.10  # a coefficient of variation above this gets a warning in tables and records


@dataclass(frozen=True)
class Protocol:
    warmup_seconds: float = 0.5
    warmup_calls: int = 5
    min_seconds: float = 2.0
    min_calls: int = 20
    max_seconds: float = 30.0  # stop sampling here even if min_calls is not reached (very slow calls)
    max_calls: int = 5000

    def to_dict(self) -> dict:
        return asdict(self)


def replace_protocol(protocol: Protocol, **changes) -> Protocol:
    """The protocol with the given fields changed; ``None`` values (options left unset) change nothing."""
    return dataclasses.replace(protocol, **{k: v for k, v in changes.items() if v is not None})



def sample_calls(call: Callable[[], object], sync: Callable[[], None], protocol: Protocol) -> list[float]:
    """Latencies in milliseconds of ``call(); sync()``, after warm-up, per the protocol."""
    start = time.perf_counter()
    n = 0
    while n < protocol.warmup_calls or time.perf_counter() - start < protocol.warmup_seconds:
        call()
        sync()
        n += 1
    samples: list[float] = []
    clock = time.perf_counter_ns
    begin = clock()
    while True:
        t0 = clock()
        call()
        sync()
        t1 = clock()
        samples.append((t1 - t0) / 1e6)
        elapsed = (t1 - begin) / 1e9
        enough = len(samples) >= protocol.min_calls and elapsed >= protocol.min_seconds
        if enough or len(samples) >= protocol.max_calls or elapsed >= protocol.max_seconds:
            return samples


def sample_cuda_events(call: Callable[[], object], device, protocol: Protocol) -> list[float]:
    """Device-side latencies (ms) between CUDA events around ``call()``, per the protocol."""
    import torch

    stream = torch.cuda.current_stream(device)
    warm_start = time.perf_counter()
    n = 0
    while n < protocol.warmup_calls or time.perf_counter() - warm_start < protocol.warmup_seconds:
        call()
        n += 1
    torch.cuda.synchronize(device)
    samples: list[float] = []
    begin = time.perf_counter()
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        samples.append(start.elapsed_time(end))
        elapsed = time.perf_counter() - begin
        enough = len(samples) >= protocol.min_calls and elapsed >= protocol.min_seconds
        if enough or len(samples) >= protocol.max_calls or elapsed >= protocol.max_seconds:
            return samples


def summarize(samples_ms: list[float]) -> dict:
    """p50 / p90 / p99 / mean / std / CV / min / max of latency samples (ms)."""
    x = np.asarray(samples_ms, dtype=np.float64)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else 0.0
    return {"n": len(x), "p50_ms": float(np.percentile(x, 50)), "p90_ms": float(np.percentile(x, 90)),
            "p99_ms": float(np.percentile(x, 99)), "mean_ms": mean, "std_ms": std,
            "cv": std / mean if mean > 0 else math.nan, "min_ms": float(x.min()), "max_ms": float(x.max())}


def matmul_rate(device, dtype_name: str = "fp32", n: int = 2048, protocol: Protocol | None = None) -> dict:
    """This device's dense matmul rate (GFLOP/s) at ``dtype``: the yardstick for achieved FLOP/s, measured in the
    same run as the latencies it is compared with."""
    import torch

    from fusionprof.runtime import DTYPES, synchronize

    dtype = DTYPES[dtype_name]
    if device.type == "cpu" and dtype == torch.float16:
        dtype_name, dtype = "fp32", torch.float32  # no fast fp16 GEMM on the CPU: compare against fp32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    samples = sample_calls(lambda: torch.mm(a, b), lambda: synchronize(device),
                           protocol or Protocol(warmup_seconds=0.5, warmup_calls=3, min_seconds=1.0, min_calls=10))
    stats = summarize(samples)
    return {"n": n, "dtype": dtype_name, "p50_ms": stats["p50_ms"], "gflops": 2 * n**3 / (stats["p50_ms"] / 1e3) / 1e9}


# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by name fragment.
DATASHEET_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.5, "A100": 312.0, "L4": 121.0}


def datasheet_tflops(gpu_name: str, precision: str) -> float | None:
    """The datasheet's dense tensor-core peak for a GPU in bf16 / fp16: the denominator of MFU. None for fp32, the
    CPU or a card not in the table (an MFU against a guessed peak would be a number we could not defend)."""
    if precision not in ("bf16", "fp16"):
        return None
    return next((v for k, v in DATASHEET_TFLOPS.items() if k in gpu_name), None)
