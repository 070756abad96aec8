"""``torch-cudagraphs`` and ``torch-cudagraphs-inductor``: the model captured once per input shape as a CUDA graph.

An eager forward of the seed model launches thousands of small kernels one by one from Python; at small batches the
GPU waits on those launches, not on the math (an H100 spent 8–13× longer per batch-1 call eagerly than replaying
the same kernels). Here the model runs in the precision's dtype (weights cast, not autocast over fp32 weights: a
graph replays fixed kernels, and casting once removes the per-call casts), each new (batch, caption length) is
warmed up on a side stream and captured into a graph that shares one memory pool with the others, and a call
copies its inputs into that graph's static buffers and replays it with one launch. The capture happens on the first
call of a shape (``capture_seconds`` in ``describe()``): the protocol's warm-up pays for it, never a timed sample.

Which kernels the graphs replay (``kernels``):
- ``torch-cudagraphs``: the eager kernels as PyTorch launches them; a shape captures in about 0.1 s.
- ``torch-cudagraphs-inductor``: inductor's fused kernels (``torch.compile``, static shapes: each new shape is
  compiled, then captured). On an H200 (seed preset, bf16) it ran 1.59–1.66× faster than replaying the eager
  kernels at batch 1 and 1.42–1.45× at 128, faster than a bare replay of the eager kernels, after 12–21 s of
  compiling per shape (``profiles/h200/gpu-inference-seed-bf16-20261204.json``): the one to use where a compile per
  shape is affordable. Compiled with dynamic shapes instead, one seed model took 2.7–3.7 minutes to reach its first
  replay (``profiles/h200/inductor-dynamic-compile-cut.txt``). The compile is paid in the first call of a shape,
  counted in ``capture_seconds``.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch

from fusionprof.backends.base import AUTOCAST_PRECISIONS, Backend, inductor_status, register_backend
from fusionprof.backends.graphs import MEMORY_UNSEEN, ShapeGraphs
from fusionprof.errors import UserError, first_line
from fusionprof.models.model import allow_recompiles
from fusionprof.runtime import DTYPES


@register_backend("torch-cudagraphs")
class TorchCudaGraphs(Backend):
    label = "PyTorch + CUDA graphs"
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cuda": AUTOCAST_PRECISIONS["cuda"]}  # CUDA only
    kernels = "eager"  # what the graphs replay, as describe() says it
    cuda_memory_unseen = MEMORY_UNSEEN

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        self.dtype = DTYPES[precision]
        self.model = self.forward_of(copy.deepcopy(artifacts.model).eval().to(
            device=device, dtype=self.dtype, memory_format=torch.channels_last))
        self.graphs = ShapeGraphs(self.model, device, self.dtype)

    def forward_of(self, model):
        """What each shape's graph captures: here the model as it is, its eager kernels."""
        return model

    @classmethod
    def available(cls, device):
        if device.type != "cuda":
            return False, "CUDA graphs need a CUDA device"
        return True, ""

    def run(self, images, input_ids, attention_mask) -> np.ndarray:
        # host tensors straight into the static buffers: the same copies as every backend, none more
        return self.run_on_device(images, input_ids, attention_mask).float().cpu().numpy()

    def run_on_device(self, images, input_ids, attention_mask):
        try:
            return self.graphs(images, input_ids, attention_mask)
        except UserError:
            raise
        except Exception as e:  # a compile or a capture that fails is this backend's failed row, not a dead sweep
            shape = f"{images.shape[0]}x{input_ids.shape[1]}"
            raise UserError(f"{self.registered_name}: shape {shape} could not be compiled or captured "
                            f"({type(e).__name__}: {first_line(e)})") from None

    def describe(self):
        return {**super().describe(), "weights": f"cast to {self.precision}", "kernels": self.kernels,
                **self.graphs.describe()}


@register_backend("torch-cudagraphs-inductor")
class TorchCudaGraphsInductor(TorchCudaGraphs):
    label = "PyTorch + CUDA graphs (inductor)"
    kernels = "inductor (torch.compile, static shapes)"
    compiles = True

    def forward_of(self, model):
        # Dynamo's recompile budget is per code object, shared by every model built from these classes: a fresh
        # cache per backend keeps each model's compiled graphs its own (as torch-compile does).
        torch._dynamo.reset()
        allow_recompiles()  # one compile per shape: past Dynamo's limit of 8 the graphs would replay eager kernels
        return torch.compile(model, dynamic=False)

    @classmethod
    def available(cls, device):
        ok, reason = super().available(device)
        return inductor_status() if ok else (ok, reason)
