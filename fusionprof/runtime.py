"""Devices and precisions: checked once, up front, with one-line errors."""

from __future__ import annotations

import contextlib
import random
import re
import resource
from pathlib import Path

import numpy as np
import torch

from fusionprof.errors import UserError

PRECISIONS = ("fp32", "bf16", "fp16")  # what a model trains and evaluates in: autocast's
# What a deployed model runs in: autocast's, and int8 (a graph quantized after training, see quantize.py).
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# What an allocator says when memory runs out, where the error has no type that says so: PyTorch's CPU allocator (a
# RuntimeError), onnxruntime's arena ("Failed to allocate memory for requested buffer of size N", in a ``Fail`` or
# ``RuntimeException``, not even a RuntimeError), OpenVINO's CPU plugin ("Failed to allocate N bytes of memory"), and
# C++'s std::bad_alloc, which both runtimes pass on as its text ("std::bad_alloc"; "bad allocation" from MSVC's).
_ALLOCATOR_OUT_OF_MEMORY = re.compile(r"DefaultCPUAllocator: can't allocate memory"
                                      r"|Failed to allocate (memory|\d+ bytes)|(std::)?bad_alloc|bad allocation")


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation that failed: CUDA's ``OutOfMemoryError``, Python's ``MemoryError`` (numpy's,
    and what the onnxruntime and openvino backends make of their runtime's), or any error in whose message an
    allocator says so (``allocator_words``)."""
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or allocator_words(error) is not None


def allocator_words(error: BaseException) -> str | None:
    """What the allocator said in ``error``'s message, to the end of its line (a runtime's message may say it on its
    third line, after a page of source paths), or None where no allocator ran out of memory."""
    message = str(error)
    found = _ALLOCATOR_OUT_OF_MEMORY.search(message)
    return message[found.start():].splitlines()[0] if found else None


def resolve_device(name: str) -> torch.device:
    """The device ``name`` asks for, checked; a GPU becomes the process's current device, as runtimes that take no
    device argument (CUDA graph capture, TensorRT's execution, cuDNN's handles) use the current one."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (use cpu or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False)")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda:N are supported")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 matmuls and convolutions in hardware (not emulated through fp32):
    CUDA compute capability 8.0+, or a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):  # a private helper: without it, assume nothing
        return False
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 where the hardware has native bf16, else fp32; anything else is checked and kept."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    check_precision(precision, device)
    return precision


def check_precision(precision: str, device: torch.device, choices: tuple[str, ...] = PRECISIONS) -> None:
    if precision not in choices:
        raise UserError(f"--precision {precision}: choose from {', '.join(choices)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")


def autocast(device: torch.device, precision: str):
    """Mixed precision for bf16 / fp16; a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``n`` intra-op threads for torch inside the block (the onnxruntime and openvino backends take torch's count),
    the caller's again after it: a sweep called from ``compare``, a notebook or a test must not leave the process on
    the threads it was asked for (a later run would be timed, and would behave, on them without saying so)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Where the host's peak RSS counts from. On Linux writing "5" to /proc/self/clear_refs sets the process's high-water
# mark (VmHWM) back to its current RSS (proc(5)), so a peak can be of one cell or one run; elsewhere getrusage's
# ru_maxrss is all there is, and it never falls back: a peak since the process started.
SINCE_RESET, SINCE_START = "since reset", "since process start"
_host_peak_scope = SINCE_START


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's max allocated on a GPU, and the host's peak RSS where the kernel lets us."""
    global _host_peak_scope
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _host_peak_scope = SINCE_RESET
    except OSError:
        _host_peak_scope = SINCE_START


def _host_peak_rss_mib() -> tuple[float, str]:
    """The host's peak RSS (MiB) and where it counts from: VmHWM after a reset, else ru_maxrss since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, _host_peak_scope  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, SINCE_START  # KiB on Linux


def largest_peaks(peaks: list[dict]) -> dict:
    """Several visits' peaks as one: the largest of each figure, and a host peak counted since process start if any
    visit's was (then it may hold more than the cell)."""
    out = {k: max(p[k] for p in peaks if k in p) for k in dict.fromkeys(k for p in peaks for k in p)
           if k != "host_peak_rss_scope"}
    scopes = {p["host_peak_rss_scope"] for p in peaks if "host_peak_rss_scope" in p}
    if scopes:
        out["host_peak_rss_scope"] = SINCE_START if SINCE_START in scopes else SINCE_RESET
    return out


def peak_memory_mib(device: torch.device) -> dict[str, float | str]:
    """Peak memory since ``reset_peak_memory``: CUDA max allocated on a GPU; the process's peak RSS on the host,
    always, with ``host_peak_rss_scope`` saying whether it is since the reset or (no /proc to reset it) since the
    process started — then it holds every earlier cell's and run's peak too."""
    rss, scope = _host_peak_rss_mib()
    out: dict[str, float | str] = {"host_peak_rss_mib": rss, "host_peak_rss_scope": scope}
    if device.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
