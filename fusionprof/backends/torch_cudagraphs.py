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
import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from fusionprof.backends.base import AUTOCAST_PRECISIONS, Backend, register_backend
from fusionprof.runtime import DTYPES

WARMUP_CALLS = 3  # eager calls on a side stream before capture: cuDNN / cuBLAS pick their kernels then


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static buffers the graph reads
    output: torch.Tensor  # the buffer the graph writes


@register_backend("torch-cudagraphs")
class TorchCudaGraphs(Backend):
    label = "PyTorch + CUDA graphs"
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cuda": AUTOCAST_PRECISIONS["cuda"]}  # CUDA only

    def __init__(self, artifacts, device, precision):
        super().__init__(artifacts, device, precision)
        self.dtype = DTYPES[precision]
        self.model = copy.deepcopy(artifacts.model).eval().to(device=device, dtype=self.dtype,
                                                               memory_format=torch.channels_last)
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds: dict[str, float] = {}

    @classmethod
    def available(cls, device):
        if device.type != "cuda":
            return False, "CUDA graphs need a CUDA device"
        return True, ""

    def _captured(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Captured:
        shape = (images.shape[0], input_ids.shape[1])
        if shape not in self.graphs:
            start = time.perf_counter()
            inputs = (torch.zeros(images.shape, dtype=self.dtype, device=self.device),
                      torch.ones(input_ids.shape, dtype=input_ids.dtype, device=self.device),
                      torch.ones(attention_mask.shape, dtype=attention_mask.dtype, device=self.device))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), torch.inference_mode():
                for _ in range(WARMUP_CALLS):
                    self.model(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
                output = self.model(*inputs)
            torch.cuda.synchronize(self.device)
            self.graphs[shape] = _Captured(graph, inputs, output)
            self.capture_seconds[f"{shape[0]}x{shape[1]}"] = time.perf_counter() - start
        return self.graphs[shape]

    def _replay(self, images, input_ids, attention_mask) -> torch.Tensor:
        captured = self._captured(images, input_ids, attention_mask)
        for static, given in zip(captured.inputs, (images, input_ids, attention_mask), strict=True):
            static.copy_(given, non_blocking=True)  # host → device for run(), device → device for run_on_device()
        captured.graph.replay()
        return captured.output

    def run(self, images, input_ids, attention_mask) -> np.ndarray:
        # host tensors straight into the static buffers: the same copies as every backend, none more
        return self._replay(images, input_ids, attention_mask).float().cpu().numpy()

    def run_on_device(self, images, input_ids, attention_mask):
        return self._replay(images, input_ids, attention_mask)

    def describe(self):
        return {**super().describe(), "weights": f"cast to {self.precision}", "graphs": len(self.graphs),
                "capture_seconds": self.capture_seconds}
