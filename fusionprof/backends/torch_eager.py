"""``torch``: the PyTorch model as trained, in eval mode (autocast for bf16 / fp16)."""

import copy

import torch

from fusionprof.backends.base import Backend, register_backend
from fusionprof.runtime import autocast


@register_backend("torch")
class TorchEager(Backend):
    label = "PyTorch eager"

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        self.model = copy.deepcopy(artifacts.model).to(device).eval()  # the artifacts' model stays on the CPU
        if device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    @classmethod
    def available(cls, device):
        return True, ""

    def describe(self):
        weights = "fp32" if self.precision == "fp32" else f"fp32, autocast to {self.precision}"
        return {**super().describe(), "weights": weights}  # beside torch-cudagraphs' "cast to bf16"

    @torch.inference_mode()
    def run_on_device(self, images, input_ids, attention_mask):
        with autocast(self.device, self.precision):
            return self.model(images, input_ids, attention_mask)
