"""``torch-compile``: the eager model through ``torch.compile`` (dynamic shapes: batch and sequence vary)."""

import torch

from fusionprof.backends.base import inductor_status, register_backend
from fusionprof.backends.torch_eager import TorchEager


@register_backend("torch-compile")
class TorchCompile(TorchEager):
    label = "torch.compile (inductor)"
    compiles = True

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        # Dynamo's recompile budget is per code object, shared by every model built from these classes: after the
        # limit it silently runs eager. A fresh cache per backend keeps each model's compiled graphs its own.
        torch._dynamo.reset()
        self.model = torch.compile(self.model, dynamic=True)

    @classmethod
    def available(cls, device):
        return inductor_status()

    def describe(self):
        return {**super().describe(), "compile": "inductor, dynamic=True"}
