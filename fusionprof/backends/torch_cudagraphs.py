"""``torch-cudagraphs``: the model's kernels captured once per input shape as a CUDA graph and replayed.

An eager forward of the seed model launches thousands of small kernels one by one from Python; at small batches the
GPU waits on those launches, not on the math (an H100 spent 8–13× longer per batch-1 call eagerly than replaying
the same kernels). Here the model runs in the precision's dtype (weights cast, not autocast over fp32 weights: a
graph replays fixed kernels, and casting once removes the per-call casts), each new (batch, caption length) is
warmed up on a side stream and captured into a graph that shares one memory pool with the others, and a call
copies its inputs into that graph's static buffers and replays it with one launch. The capture happens on the first
call of a shape (``capture_seconds`` in ``describe()``): the protocol's warm-up pays for it, never a timed sample.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch

from fusionprof.backends.base import AUTOCAST_PRECISIONS, Backend, register_backend
from fusionprof.backends.graphs import ShapeGraphs
from fusionprof.runtime import DTYPES


@register_backend("torch-cudagraphs")
class TorchCudaGraphs(Backend):
    label = "PyTorch + CUDA graphs"
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cuda": AUTOCAST_PRECISIONS["cuda"]}  # CUDA only

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        self.dtype = DTYPES[precision]
        self.model = copy.deepcopy(artifacts.model).eval().to(device=device, dtype=self.dtype,
                                                               memory_format=torch.channels_last)
        self.graphs = ShapeGraphs(self.model, device, self.dtype)

    @classmethod
    def available(cls, device):
        if device.type != "cuda":
            return False, "CUDA graphs need a CUDA device"
        return True, ""

    def run(self, images, input_ids, attention_mask) -> np.ndarray:
        # host tensors straight into the static buffers: the same copies as every backend, none more
        return self.graphs(images, input_ids, attention_mask).float().cpu().numpy()

    def run_on_device(self, images, input_ids, attention_mask):
        return self.graphs(images, input_ids, attention_mask)

    def describe(self):
        return {**super().describe(), "weights": f"cast to {self.precision}", **self.graphs.describe()}
