"""``torch-cudagraphs``: the model captured once per input shape as a CUDA graph and replayed; inductor's kernels.

An eager forward of the seed model launches thousands of small kernels one by one from Python; at small batches the
GPU waits on those launches, not on the math (an H100 spent 8–13× longer per batch-1 call eagerly than replaying
the same kernels). Here the model runs in the precision's dtype (weights cast, not autocast over fp32 weights: a
graph replays fixed kernels, and casting once removes the per-call casts), each new (batch, caption length) is
warmed up on a side stream and captured into a graph that shares one memory pool with the others, and a call
copies its inputs into that graph's static buffers and replays it with one launch. The capture happens on the first
call of a shape (``capture_seconds`` in ``describe()``): the protocol's warm-up pays for it, never a timed sample.

Which kernels the graph replays (``kernels``):
- ``torch-cudagraphs``: inductor's (``torch.compile``, dynamic batch and caption length, so one compile serves every
  batch but 1, which PyTorch specializes), fused: on an H200 ``torch.compile(mode="reduce-overhead")`` — the same
  idea — ran 1.23× faster than replaying the eager kernels at batch 1 and 32
  (``profiles/h200/gpu-inference-seed-bf16.json``). The compile (tens of seconds per model on the seed preset) is
  paid in the first call of a shape, counted in ``capture_seconds``.
- ``torch-cudagraphs-eager``: the eager kernels as PyTorch launches them; a shape captures in about 0.1 s.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import numpy as np
import torch

from fusionprof.backends.base import AUTOCAST_PRECISIONS, Backend, inductor_status, register_backend
from fusionprof.backends.graphs import ShapeGraphs
from fusionprof.errors import UserError, first_line
from fusionprof.runtime import DTYPES


@register_backend("torch-cudagraphs")
class TorchCudaGraphs(Backend):
    label = "PyTorch + CUDA graphs (inductor)"
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cuda": AUTOCAST_PRECISIONS["cuda"]}  # CUDA only
    kernels = "inductor"  # what the graphs replay: "inductor" (torch.compile's) or "eager"
    compiles = True

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        self.dtype = DTYPES[precision]
        self.model = copy.deepcopy(artifacts.model).eval().to(device=device, dtype=self.dtype,
                                                               memory_format=torch.channels_last)
        if self.kernels == "inductor":
            # Dynamo's recompile budget is per code object, shared by every model built from these classes: a fresh
            # cache per backend keeps each model's compiled graphs its own (as torch-compile does).
            torch._dynamo.reset()
            self.model = torch.compile(self.model, dynamic=True)
        self.graphs = ShapeGraphs(self.model, device, self.dtype)

    @classmethod
    def available(cls, device):
        if device.type != "cuda":
            return False, "CUDA graphs need a CUDA device"
        return inductor_status() if cls.kernels == "inductor" else (True, "")

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
        return {**super().describe(), "weights": f"cast to {self.precision}",
                "kernels": "inductor (torch.compile, dynamic=True)" if self.kernels == "inductor" else "eager",
                **self.graphs.describe()}


@register_backend("torch-cudagraphs-eager")
class TorchCudaGraphsEager(TorchCudaGraphs):
    label = "PyTorch + CUDA graphs (eager kernels)"
    kernels = "eager"
    compiles = False
