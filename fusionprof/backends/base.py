"""What every inference backend does, so that one measurement protocol fits them all.

A backend is built from the model's ``Artifacts`` (the PyTorch model, and the exported ONNX / TensorRT files
when they exist) for one device and precision. ``run`` takes host tensors and returns host logits: it
includes the host→device input copy and the device→host output copy, the same for every backend.
``run_on_device`` takes inputs already on the device and leaves the output there (device-resident timing).

Each backend class describes itself (timm-style: the entry carries its defaults), so no module outside this
package tests a backend's name: ``artifact`` (what it loads besides the PyTorch model), ``precisions`` (per
device type), ``label`` (its name in tables), ``compiles`` (it builds code at load time: slow on a small CPU) and
``cuda_memory_unseen`` (why torch's allocator does not see its GPU memory, where it does not).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fusionprof.errors import UserError
from fusionprof.models import FusionModel
from fusionprof.registry import Registry
from fusionprof.runtime import allocator_words, out_of_memory, synchronize

INPUT_NAMES = ("images", "input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)
# The torch backends run fp16 / bf16 through autocast, which has no fp16 on the CPU.
AUTOCAST_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "bf16", "fp16")}
# An exported graph runs in the precision it was exported in: fp32 or fp16 (TensorRT's networks are strongly typed),
# or on a CPU int8 (a quantized graph, see quantize.py).
GRAPH_PRECISIONS = {"cpu": ("fp32", "fp16"), "cuda": ("fp32", "fp16")}
QUANTIZED_GRAPH_PRECISIONS = {"cpu": (*GRAPH_PRECISIONS["cpu"], "int8"), "cuda": GRAPH_PRECISIONS["cuda"]}
EAGER = "torch"  # the model as trained, through PyTorch: the backend profiler traces are taken of
# What `fusionprof export --fmt` calls the artifact a backend loads (the artifact is also ``Artifacts``' field).
EXPORT_FORMATS = {"onnx": "onnx", "trt": "plan", "pt2": "pt2"}


@dataclass
class Artifacts:
    """One model in its deployable forms."""

    model: FusionModel  # eval mode, on the CPU
    onnx: Path | None = None
    plan: Path | None = None
    pt2: Path | None = None  # an AOTInductor package, for one device type and precision
    ir: Path | None = None  # an OpenVINO IR: int8 from NNCF, which ``openvino`` loads instead of the int8 ONNX
    failed: dict[str, str] = field(default_factory=dict)  # artifact → why it could not be built here


class Backend(ABC):
    registered_name: str
    label: str  # its name in tables
    artifact: str | None = None  # the ``Artifacts`` field it loads besides the model: None, "onnx", "plan", "pt2"
    precisions: dict[str, tuple[str, ...]] = AUTOCAST_PRECISIONS  # device type → the precisions it runs there
    compiles: bool = False  # builds code when loaded or exported (minutes per model on a 2-core CPU)
    # On CUDA, why torch.cuda.max_memory_allocated does not measure what this backend's cells use; None: it does
    cuda_memory_unseen: str | None = None

    def __init__(self, artifacts: Artifacts, device: torch.device, precision: str, *,
                 sleep_when_idle: bool = False):
        """``sleep_when_idle``: a runtime whose pool threads busy-wait between calls (onnxruntime's) lets them sleep
        instead, for cores other work needs (``fusionprof load --no-spin-wait``). On a quiet machine spinning
        served more (``profiles/vm/load-server-tiny-mid-onnxruntime-*``), so it is not the default."""
        ok, reason = self.available(device)
        if not ok:
            raise UserError(f"backend {self.registered_name} is unavailable: {reason}")
        problem = self.precision_problem(precision, device)
        if problem:
            raise UserError(problem)
        self.device, self.precision, self.sleep_when_idle = device, precision, sleep_when_idle

    @classmethod
    def precision_problem(cls, precision: str, device: torch.device) -> str | None:
        """None when this backend runs ``precision`` on ``device``'s type, else why not (one line)."""
        runs = cls.precisions.get(device.type, ())
        if precision in runs:
            return None
        return f"{cls.registered_name} runs {' or '.join(runs)} on {device.type}, not {precision}"

    @classmethod
    @abstractmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        """(True, "") when this backend can run on ``device`` here, else (False, why not)."""

    @abstractmethod
    def run_on_device(self, images: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits for inputs already on ``self.device``; the result stays there."""

    def run(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> np.ndarray:
        """Host inputs → host logits (float32), copies included."""
        inputs = [t.to(self.device, non_blocking=True) for t in (images, input_ids, attention_mask)]
        return self.run_on_device(*inputs).float().cpu().numpy()

    def synchronize(self) -> None:
        synchronize(self.device)

    def describe(self) -> dict:
        return {"backend": self.registered_name, "device": str(self.device), "precision": self.precision,
                "torch_threads": torch.get_num_threads()}


BACKENDS: Registry = Registry("backend", "fusionprof.backends")
register_backend = BACKENDS.register
backend_names = BACKENDS.names


def backend_for_format(fmt: str) -> type[Backend]:
    """The backend that loads what ``fusionprof export --fmt fmt`` writes (it verifies that export)."""
    artifact = EXPORT_FORMATS.get(fmt)
    for name in backend_names():
        if artifact is not None and BACKENDS.get(name).artifact == artifact:
            return BACKENDS.get(name)
    raise UserError(f"--fmt {fmt}: choose from {', '.join(export_formats())}")


def format_of(backend: str) -> str | None:
    """The ``--fmt`` of the export ``backend`` loads besides the PyTorch model (``onnx`` for openvino too); None for a
    backend that runs the model itself, or a name no backend has (an older record's)."""
    if backend not in backend_names():
        return None
    artifact = BACKENDS.get(backend).artifact
    return next((fmt for fmt, loaded in EXPORT_FORMATS.items() if loaded == artifact), None)


def export_formats() -> list[str]:
    """The ``--fmt`` names of the artifacts the registered backends load."""
    loaded = {BACKENDS.get(name).artifact for name in backend_names()}
    return [fmt for fmt, artifact in EXPORT_FORMATS.items() if artifact in loaded]


def create_backend(name: str, artifacts: Artifacts, device: torch.device, precision: str = "fp32",
                   sleep_when_idle: bool = False) -> Backend:
    """A backend, loaded. ``sleep_when_idle`` reaches it only when set: one written as ``__init__(artifacts, device,
    precision)`` still loads everywhere but behind ``fusionprof load --no-spin-wait``."""
    backend = BACKENDS.get(name)
    if sleep_when_idle:
        return backend(artifacts, device, precision, sleep_when_idle=True)
    return backend(artifacts, device, precision)


def inductor_status() -> tuple[bool, str]:
    """Whether torch's inductor (a C++ compiler on the CPU, Triton on CUDA) can be imported: what the backends that
    compile (torch-compile) or run compiled packages (aoti) need."""
    try:
        import torch._inductor  # noqa: F401
    except ImportError as e:
        return False, f"torch inductor cannot be imported ({e})"
    return True, ""


def runtime_failure(error: Exception, what: str) -> Exception:
    """What a call into onnxruntime or OpenVINO that raised ``error`` is raised as, for a caller that could not name
    their exceptions (onnxruntime's ``Fail``, ``InvalidArgument``, ...: none a ``RuntimeError``; OpenVINO's a page
    long): memory running out a ``MemoryError`` (``out_of_memory``, as PyTorch's would be), anything else a
    ``UserError``, each one line saying ``what`` failed. A sweep records either as that cell's failure and goes on.
    Called from an ``except``: a call that succeeds pays nothing, not even for ``what``'s message."""
    if out_of_memory(error):
        return MemoryError(f"{what}: {allocator_words(error) or runtime_words(error)}")
    return UserError(f"{what}: {runtime_words(error)}")


# Where a runtime's message says where in its own source it was, not what went wrong: onnxruntime's status message
# begins "reshape_helper.h:91 onnxruntime::ReshapeHelper::ReshapeHelper(...) ", OpenVINO's first lines are
# "Exception from src/inference/src/cpp/infer_request.cpp:224:", one per frame, then "Check '...' failed at ...:".
_SOURCE_POSITION = re.compile(r"\S+\.(?:h|cc|cpp):\d+ [^()\n]*\([^)\n]*\) |^Exception from \S+:\d+:$|"
                              r"Check '.*' failed at \S+:\d+:", re.MULTILINE)


def runtime_words(error: BaseException, limit: int = 300) -> str:
    """What onnxruntime's or OpenVINO's message says went wrong, as one line: its source positions left out, the
    lines left joined by "; " (onnxruntime names a wrong input on one line and its dimensions on the next)."""
    lines = [line.strip() for line in _SOURCE_POSITION.sub("", str(error)).splitlines() if line.strip()]
    return "; ".join(lines)[:limit] if lines else type(error).__name__


def at_shape(runtime: str, images: torch.Tensor, input_ids: torch.Tensor) -> str:
    """Which call failed, for ``runtime_failure``: the runtime and the inputs' shape."""
    return f"{runtime} at batch {images.shape[0]}, seq {input_ids.shape[1]}"


def require(path: Path | None, what: str, command: str) -> Path:
    if path is None or not Path(path).exists():
        raise UserError(f"no {what} for this model: run `{command}` first")
    return Path(path)
