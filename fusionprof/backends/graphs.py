"""One CUDA graph per input shape of a forward call, replayed with one launch (used by torch-cudagraphs and aoti).

A forward launches hundreds to thousands of kernels; at small batches the GPU waits on those launches, not on the
math. Here each new (batch, caption length) is warmed up on a side stream (cuDNN / cuBLAS pick their kernels then)
and captured into a graph that shares one memory pool with the others; a call copies its inputs into that graph's
static buffers and replays it. The capture happens on the first call of a shape (``capture_seconds``): the
protocol's warm-up pays for it, never a timed sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

WARMUP_CALLS = 3  # calls on a side stream before capture
# Why torch.cuda.max_memory_allocated does not measure a cell replayed here (``Backend.cuda_memory_unseen``)
MEMORY_UNSEEN = ("a CUDA graph's memory pool is allocated when a shape is captured (parity captures most shapes "
                 "before a cell's peak is reset); a replay allocates nothing")


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # static buffers the graph reads
    output: torch.Tensor  # the buffer the graph writes


class ShapeGraphs:
    """``forward(images, input_ids, attention_mask)`` captured per input shape; images in ``image_dtype``."""

    def __init__(self, forward: Callable[..., torch.Tensor], device: torch.device, image_dtype: torch.dtype):
        self.forward, self.device, self.image_dtype = forward, device, image_dtype
        self.graphs: dict[tuple[int, int], _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.capture_seconds: dict[str, float] = {}

    def _capture(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> _Captured:
        start = time.perf_counter()
        inputs = (torch.zeros(images.shape, dtype=self.image_dtype, device=self.device),
                  torch.ones(input_ids.shape, dtype=input_ids.dtype, device=self.device),
                  torch.ones(attention_mask.shape, dtype=attention_mask.dtype, device=self.device))
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(WARMUP_CALLS):
                self.forward(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph captures on a stream of the current device: on cuda:1 with cuda:0 current it would
        # capture nothing of the model's work
        with torch.cuda.device(self.device), torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            output = self.forward(*inputs)
        torch.cuda.synchronize(self.device)
        self.capture_seconds[f"{images.shape[0]}x{input_ids.shape[1]}"] = time.perf_counter() - start
        return _Captured(graph, inputs, output)

    def __call__(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits, in the graph's own output buffer: the next replay of this shape (or of another, whose graph
        shares the pool) overwrites it, so copy what is to be kept (``Backend.run`` copies it to the host)."""
        shape = (images.shape[0], input_ids.shape[1])
        if shape not in self.graphs:
            self.graphs[shape] = self._capture(images, input_ids, attention_mask)
        captured = self.graphs[shape]
        for static, given in zip(captured.inputs, (images, input_ids, attention_mask), strict=True):
            static.copy_(given, non_blocking=True)  # host → device for run(), device → device for run_on_device()
        captured.graph.replay()
        return captured.output

    def describe(self) -> dict:
        return {"graphs": len(self.graphs), "capture_seconds": self.capture_seconds}
