"""The timing protocol: one for every backend, so their numbers can stand side by side.

Warm up until both a minimum time and a minimum count are reached (capped: ``max_warmup_seconds``), then sample
until both a minimum time and a minimum count are reached (capped), keeping every sample. Each sample is one call
followed by the backend's synchronisation, timed with ``time.perf_counter_ns``; on CUDA, device-resident work is timed
with CUDA events instead. One loop (``sample``) serves both clocks; ``peak_memory`` is the one place a peak is
reset and read.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np

CV_WARNING = 0.10  # a coefficient of variation above this gets a warning in tables and records
P99_MIN_SAMPLES = 100  # below this a "p99" is the largest sample or two: not shown
# How a percentile is read between samples: numpy's "linear" (Hyndman & Fan's type 7, as R's and Excel's PERCENTILE.INC
# default): the q-th percentile of n sorted samples x[0..n-1] lies at rank h = q/100 · (n-1), x[⌊h⌋] + (h-⌊h⌋) ·
# (x[⌊h⌋+1] - x[⌊h⌋]). So p50 of an even count is the mean of the middle two, and p99 of 100 samples lies between
# the 99th and the 100th (the largest). Records say so (``Protocol.to_dict``).
PERCENTILE_METHOD = "linear"
# A cell's level can move while it is timed (on a shared VM: 13.0 ms for a second, then 8.2 ms, nothing else running):
# its p50 then lies between two levels. The medians of the first and the second half of its calls, in call order,
# show it; a move above DRIFT_WARNING is flagged. Halves of fewer than DRIFT_MIN_HALF calls are not compared.
DRIFT_WARNING = 0.10
DRIFT_MIN_HALF = 10


@dataclass(frozen=True)
class Protocol:
    warmup_seconds: float = 0.5
    warmup_calls: int = 5
    min_seconds: float = 2.0
    min_calls: int = 20
    # Caps, each guarding against the other minimum running away: max_seconds ends slow calls short of min_calls,
    # max_calls ends fast ones short of min_seconds. A cap below its own minimum (--min-seconds 60) gives way to it.
    max_seconds: float = 30.0
    max_calls: int = 5000
    # The warm-up's cap: a backend that recompiles on every call, or is pathologically slow, would otherwise warm up
    # for warmup_calls × its call time, unbounded. After at least one call, the warm-up ends here even short of
    # warmup_calls (the row says so: ``Warmup.capped``). Far above a normal warm-up (5 calls of a seed model at batch
    # 32 on a 2-core VM, ~4 s each); no count cap, which would cut short the thousands of calls a fast backend makes
    # in warmup_seconds. Like the other caps, it gives way to a longer --warmup-seconds.
    max_warmup_seconds: float = 60.0

    def to_dict(self) -> dict:
        return {**asdict(self), "percentile_method": PERCENTILE_METHOD}


def replace_protocol(protocol: Protocol, **changes) -> Protocol:
    """The protocol with the given fields changed; ``None`` values (options left unset) change nothing."""
    return dataclasses.replace(protocol, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Warmup:
    """What a warm-up did: its calls, its seconds, and whether ``max_warmup_seconds`` ended it before both of the
    protocol's warm-up minimums were met (the first samples may then still pay for compiling or tuning)."""

    calls: int
    seconds: float
    capped: bool


@dataclass(frozen=True)
class Sampled:
    samples: list[float]
    warmup: Warmup


def sample(timed_call: Callable[[], float], protocol: Protocol) -> list[float]:
    """The one sampling loop: ``timed_call()`` (which runs the work once and returns its milliseconds) through
    warm-up, then sampled until the protocol is satisfied."""
    return sample_with_warmup(timed_call, protocol).samples


def warm_up(call: Callable[[], object], protocol: Protocol) -> Warmup:
    """``call()`` until both warm-up minimums are met, or (after at least one call) until the warm-up cap."""
    cap = max(protocol.max_warmup_seconds, protocol.warmup_seconds)
    start = time.perf_counter()
    n, capped = 0, False
    while n < protocol.warmup_calls or time.perf_counter() - start < protocol.warmup_seconds:
        if n > 0 and time.perf_counter() - start >= cap:
            capped = True
            break
        call()
        n += 1
    return Warmup(n, time.perf_counter() - start, capped)


def sample_with_warmup(timed_call: Callable[[], float], protocol: Protocol) -> Sampled:
    """``sample``, and what its warm-up did."""
    warmup = warm_up(timed_call, protocol)
    samples: list[float] = []
    max_calls = max(protocol.max_calls, protocol.min_calls)
    max_seconds = max(protocol.max_seconds, protocol.min_seconds)
    begin = time.perf_counter()
    while True:
        samples.append(timed_call())
        elapsed = time.perf_counter() - begin
        enough = len(samples) >= protocol.min_calls and elapsed >= protocol.min_seconds
        if enough or len(samples) >= max_calls or elapsed >= max_seconds:
            return Sampled(samples, warmup)


def host_timer(call: Callable[[], object], sync: Callable[[], None]) -> Callable[[], float]:
    """``call(); sync()`` timed on the host clock, in milliseconds."""
    clock = time.perf_counter_ns

    def timed() -> float:
        t0 = clock()
        call()
        sync()
        return (clock() - t0) / 1e6
    return timed


def cuda_event_timer(call: Callable[[], object], device) -> Callable[[], float]:
    """``call()`` timed between two CUDA events on the device's current stream, in milliseconds."""
    import torch

    stream = torch.cuda.current_stream(device)

    def timed() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        call()
        end.record(stream)
        end.synchronize()
        return start.elapsed_time(end)
    return timed


def sample_calls(call: Callable[[], object], sync: Callable[[], None], protocol: Protocol) -> list[float]:
    """Latencies in milliseconds of ``call(); sync()``, after warm-up, per the protocol."""
    return sample(host_timer(call, sync), protocol)


def sample_cuda_events(call: Callable[[], object], device, protocol: Protocol) -> list[float]:
    """Device-side latencies (ms) between CUDA events around ``call()``, per the protocol."""
    return sample(cuda_event_timer(call, device), protocol)


@contextmanager
def peak_memory(device) -> Iterator[dict[str, float | str]]:
    """The peak memory of the work inside the block: the peak is reset on entry, and the dict this yields is
    filled on exit (CUDA max allocated on a GPU; the process's peak RSS within the block, always: reset on entry
    where Linux lets us, else since the process started, as ``host_peak_rss_scope`` says)."""
    from fusionprof.runtime import peak_memory_mib, reset_peak_memory

    reset_peak_memory(device)
    peak: dict[str, float | str] = {}
    try:
        yield peak
    finally:
        peak.update(peak_memory_mib(device))


def p99_note(n: int) -> str | None:
    """Why a series of ``n`` samples has no p99, or None when it has one."""
    return None if n >= P99_MIN_SAMPLES else f"p99 needs at least {P99_MIN_SAMPLES} samples; this has {n}"


def summarize(samples_ms: list[float]) -> dict:
    """p50 / p90 / p99 / mean / std / CV / min / max of latency samples (ms). Percentiles are interpolated linearly
    between the samples either side (``PERCENTILE_METHOD``); std is the sample standard deviation (n - 1), CV is std
    over the mean.

    p99 is None below ``P99_MIN_SAMPLES`` samples, with the reason in ``p99_note``: from fewer it is the largest
    sample or two, not a percentile. std and CV are None from one sample (one call that ran past the time cap):
    its spread is unknown, not zero, and a CV of 0 would pass for the steadiest cell of a sweep. ``halves_p50_ms``:
    see ``halves_p50``."""
    x = np.asarray(samples_ms, dtype=np.float64)
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if len(x) > 1 else None
    note = p99_note(len(x))
    p50, p90, p99 = np.percentile(x, [50, 90, 99], method=PERCENTILE_METHOD)
    return {"n": len(x), "p50_ms": float(p50), "p90_ms": float(p90),
            "p99_ms": None if note else float(p99), "p99_note": note, "mean_ms": mean, "std_ms": std,
            "cv": None if std is None else std / mean if mean > 0 else math.nan,
            "min_ms": float(x.min()), "max_ms": float(x.max()), "halves_p50_ms": halves_p50(samples_ms)}


def halves_p50(samples_ms: list[float]) -> list[float] | None:
    """The medians of the first and the second half of the samples in call order (the middle one of an odd count
    left out), or None below ``DRIFT_MIN_HALF`` calls a half: whether the cell's level moved while it was timed."""
    half = len(samples_ms) // 2
    if half < DRIFT_MIN_HALF:
        return None
    return [float(np.median(samples_ms[:half])), float(np.median(samples_ms[-half:]))]


# The yardstick's matmul side per device type: 8192² keeps a GPU's tensor cores busy (a 2048² bf16 matmul timed
# from the host ran at 341 TFLOP/s on an H100, an 8192² one at 699); on a 2-core CPU 2048² already takes ~0.3 s.
YARDSTICK_N = {"cpu": 2048, "cuda": 8192}
BACK_TO_BACK = 10  # matmuls between two CUDA events: one sample, the launch gaps between them hidden by the queue


def matmul_rate(device, dtype_name: str = "fp32", n: int | None = None, protocol: Protocol | None = None) -> dict:
    """This device's dense matmul rate (GFLOP/s) at ``dtype``: what achieved FLOP/s are compared with, measured in
    the same run. On CUDA, ``BACK_TO_BACK`` matmuls per CUDA-event sample; on the CPU, one per host-clock sample."""
    import torch

    from fusionprof.runtime import DTYPES, synchronize

    n = n or YARDSTICK_N[device.type]
    dtype = DTYPES[dtype_name]
    if device.type == "cpu" and dtype == torch.float16:
        dtype_name, dtype = "fp32", torch.float32  # no fast fp16 GEMM on the CPU: compare against fp32
    a, b, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(3))
    protocol = protocol or Protocol(warmup_seconds=0.5, warmup_calls=3, min_seconds=1.0, min_calls=10)
    if device.type == "cuda":
        def calls():
            for _ in range(BACK_TO_BACK):
                torch.mm(a, b, out=c)
        samples = [ms / BACK_TO_BACK for ms in sample_cuda_events(calls, device, protocol)]
        timing = f"CUDA events around {BACK_TO_BACK} back-to-back matmuls"
    else:
        samples = sample_calls(lambda: torch.mm(a, b, out=c), lambda: synchronize(device), protocol)
        timing = "host clock, one matmul per sample"
    p50 = summarize(samples)["p50_ms"]
    return {"n": n, "dtype": dtype_name, "p50_ms": p50, "gflops": 2 * n**3 / (p50 / 1e3) / 1e9, "timing": timing}


def yardstick(start: dict, end: dict) -> dict:
    """The sweep's yardstick from the matmul rate measured at its start and at its end (a clock that drifted
    between them shows as ``drift``): shares are of the faster of the two, the nearest thing to a peak we measure.
    A model's share above 100 % says the yardstick is no peak (the model's kernels beat the plain matmul's)."""
    return {"n": start["n"], "dtype": start["dtype"], "timing": start["timing"], "start": start, "end": end,
            "gflops": max(start["gflops"], end["gflops"]), "drift": end["gflops"] / start["gflops"] - 1}


# Dense bf16/fp16 tensor-core peaks from NVIDIA's datasheets (TFLOP/s, without sparsity), by the exact name
# torch.cuda.get_device_name gives: a fragment would match a different card ("L4" is in "L40S", "H200" in
# "H200 NVL", whose peaks differ).
DATASHEET_TFLOPS = {"NVIDIA H200": 989.4, "NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.5,
                    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
                    "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA L4": 121.0}


def datasheet_tflops(gpu_name: str, precision: str) -> float | None:
    """The datasheet's dense tensor-core peak for a GPU in bf16 / fp16: the denominator of MFU. None for fp32, the
    CPU or a card not in the table (an MFU against a guessed peak would be a number we could not defend)."""
    if precision not in ("bf16", "fp16"):
        return None
    return DATASHEET_TFLOPS.get(gpu_name)
