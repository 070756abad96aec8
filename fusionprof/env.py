"""The hardware / software fingerprint that goes into every record we write."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from importlib import metadata

import psutil
import torch

_PACKAGES = ("torch", "torchvision", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu",
             "openvino", "nncf", "tensorrt", "numpy", "fusionprof")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The instruction-set extensions that decide how fast a CPU runs fp32, bf16 and int8 (a record from an AVX2-only
# CPU and one from a Xeon with AMX explain their difference themselves).
CPU_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
# The low precisions a CPU computes natively, and the flags that make it so (without them they are emulated).
NATIVE_LOW_PRECISIONS = {"bf16": ("avx512_bf16", "amx_bf16"), "int8": ("avx512_vnni", "avx_vnni", "amx_int8")}


def cpu_isa(cpuinfo: str | None = None) -> dict[str, bool]:
    """Which of ``CPU_ISA_FLAGS`` this CPU has, from the kernel's ``flags`` line (Linux); else from PyTorch's own
    CPU capability probe, which knows most of them."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith(("flags", "Features"))), None)
    if line is not None:
        present = set(line.split(":", 1)[1].split())
        return {flag: flag in present for flag in CPU_ISA_FLAGS}
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = {}
    return {flag: bool(capability.get(flag)) for flag in CPU_ISA_FLAGS}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


# When a record was written, in UTC: the latency sweep's ``created`` (and its file name's stamp), and the training and
# export records' ``created``. Sorts as text in time order; a record written before it had one sorts first, as ``""``.
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"


def utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime(STAMP_FORMAT)


def fingerprint() -> dict:
    """Where a number came from: enough to tell two machines (and two software stacks) apart."""
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2),
                         "capability": f"{props.major}.{props.minor}"})
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_isa": cpu_isa(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 2),
        "gpus": gpus,
        "cuda_driver": _nvidia_driver() if gpus else None,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        # how "fp32" ran: TF32 where PyTorch allows it (cuDNN's convolutions by default, matmuls when asked), which an
        # Ampere+ GPU runs several times faster than fp32; and whether cuDNN benchmarked its algorithms
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {p: v for p in _PACKAGES if (v := _version(p)) is not None},
    }


# The extension that most decides a CPU's speed in the records' precisions, best first: a CPU machine's label names
# it, so that two CPUs sold (or virtualised) under one model name are two machines in a report, never one.
ISA_TIERS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512_vnni", "AVX512-VNNI"),
             ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX512"), ("avx2", "AVX2"))


def isa_tier(isa: dict[str, bool] | None) -> str | None:
    """The best of ``ISA_TIERS`` a CPU has; None if its record predates ``cpu_isa`` (or it has none of them)."""
    return next((tier for flag, tier in ISA_TIERS if (isa or {}).get(flag)), None)


def device_label(name: str) -> str:
    """A device as records of every kind can be compared by: ``cpu``, else with its index (``cuda`` → ``cuda:0``)."""
    return name if name == "cpu" or ":" in name else f"{name}:0"


def machine_name(fp: dict, device: str | None = None) -> str:
    """A short label for tables and plots: the host and what ran the figures, the GPU of ``device`` (``cuda:N``) or
    the CPU and its ISA tier (``cpu``, or a host with no GPU). Without ``device``, a GPU host is named by its first
    GPU: the machine as a whole, which is how records of one model are matched across devices (``records_of_model``);
    a record of figures names the device they ran on, so that CPU figures taken on a GPU host name that CPU."""
    gpus = fp.get("gpus") or []
    kind, _, index = (device or "").partition(":")
    if gpus and kind != "cpu":
        n = int(index) if index.isdigit() and int(index) < len(gpus) else 0
        return f"{fp.get('host', '?')} ({gpus[n]['name']})"
    tier = isa_tier(fp.get("cpu_isa"))
    return f"{fp.get('host', '?')} ({fp.get('cpu_model', 'cpu')}{f', {tier}' if tier else ''})"
