"""What every inference backend does, so that one measurement protocol fits them all.

A backend is built from the model's ``Artifacts`` (the PyTorch model, and the exported ONNX / TensorRT files
when they exist) for one device and precision. ``run`` takes host tensors and returns host logits: it
includes the host→device input copy and the device→host output copy, the same for every backend.
``run_on_device`` takes inputs already on the device and leaves the output there (device-resident timing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fusionprof.errors import UserError
from fusionprof.models import FusionModel
from fusionprof.registry import Registry
from fusionprof.runtime import check_precision, synchronize

INPUT_NAMES = ("images", "input_ids", "attention_mask")
OUTPUT_NAMES = ("logits",)


@dataclass
class Artifacts:
    """One model in its deployable forms."""

    model: FusionModel  # eval mode, on the CPU
    onnx: Path | None = None
    plan: Path | None = None


class Backend(ABC):
    registered_name: str

    def __init__(self, artifacts: Artifacts, device: torch.device, precision: str):
        ok, reason = self.available(device)
        if not ok:
            raise UserError(f"backend {self.registered_name} is unavailable: {reason}")
        self.check_precision(precision, device)
        self.device, self.precision = device, precision

    def check_precision(self, precision: str, device: torch.device) -> None:
        """Torch backends run fp16 / bf16 through autocast, which has no fp16 on the CPU."""
        check_precision(precision, device)

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


def create_backend(name: str, artifacts: Artifacts, device: torch.device, precision: str = "fp32") -> Backend:
    return BACKENDS.get(name)(artifacts, device, precision)


def require(path: Path | None, what: str, command: str) -> Path:
    if path is None or not Path(path).exists():
        raise UserError(f"no {what} for this model: run `{command}` first")
    return Path(path)
