"""``tensorrt``: a serialized TensorRT engine (``model.plan``) built from the ONNX export.

Built with the TensorRT 10/11 Python API: ``OnnxParser`` on the model file, one optimization profile over
the batch sizes and sequence lengths, a workspace limit. Networks are strongly typed, so the precision comes
from the ONNX (an fp16 export for fp16), as TensorRT 11 requires now that the FP16 builder flag is gone.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from fusionprof.atomic import atomic_write
from fusionprof.backends.base import (
    GRAPH_PRECISIONS,
    INPUT_NAMES,
    OUTPUT_NAMES,
    Backend,
    register_backend,
    require,
)
from fusionprof.errors import UserError

INSTALL_HINT = 'TensorRT needs a CUDA GPU and the tensorrt package: pip install "fusionprof[trt]" on a CUDA machine'


def optimization_profile(batch_sizes: list[int], seq_lens: list[int], image_size: int) -> dict[str, tuple]:
    """(min, opt, max) shape per input covering every batch size and sequence length asked for.

    ``opt`` (the shape TensorRT tunes its kernels for) is the median batch size and the longest sequence.
    """
    if not batch_sizes or not seq_lens or min(batch_sizes) < 1 or min(seq_lens) < 1:
        raise UserError("the TensorRT profile needs batch sizes and sequence lengths of at least 1")
    b = sorted(batch_sizes)
    bmin, bopt, bmax = b[0], b[len(b) // 2], b[-1]
    lmin, lmax = min(seq_lens), max(seq_lens)
    image = lambda n: (n, 3, image_size, image_size)  # noqa: E731
    text = ((bmin, lmin), (bopt, lmax), (bmax, lmax))
    return {"images": (image(bmin), image(bopt), image(bmax)), "input_ids": text, "attention_mask": text}


def tensorrt_status() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU ({INSTALL_HINT})"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, f"the tensorrt package is not installed ({INSTALL_HINT})"
    return True, ""


def build_engine(onnx_path: Path, plan_path: Path, profile: dict[str, tuple], workspace_gib: float = 4.0) -> dict:
    """Parse the ONNX, build a serialized engine for ``profile`` and write it atomically; returns the settings."""
    ok, reason = tensorrt_status()
    if not ok:
        raise UserError(reason)
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"{onnx_path}: TensorRT cannot parse it ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    trt_profile = builder.create_optimization_profile()
    for name, (smallest, optimal, largest) in profile.items():
        trt_profile.set_shape(name, smallest, optimal, largest)
    config.add_optimization_profile(trt_profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    atomic_write(plan_path, lambda tmp: tmp.write_bytes(bytes(serialized)))
    return {"tensorrt": trt.__version__, "profile": {k: [list(s) for s in v] for k, v in profile.items()},
            "workspace_gib": workspace_gib, "strongly_typed": bool(flags), "onnx": str(onnx_path)}


@register_backend("tensorrt")
class TensorRT(Backend):
    label = "TensorRT"
    artifact = "plan"
    cuda_memory_unseen = "TensorRT allocates its engine's and context's memory itself"
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {"cuda": GRAPH_PRECISIONS["cuda"]}  # CUDA only

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        import tensorrt as trt

        path = require(artifacts.plan, "TensorRT engine", "fusionprof export --fmt trt")
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise UserError(f"{path}: not a TensorRT engine for this TensorRT version / GPU")
            self.context = self.engine.create_execution_context()
        self.path = path
        self.stream = torch.cuda.Stream(device)
        self.dtypes = {name: _torch_dtype(self.engine.get_tensor_dtype(name)) for name in INPUT_NAMES + OUTPUT_NAMES}

    def profile_range(self, name: str) -> str:
        smallest, _, largest = self.engine.get_tensor_profile_shape(name, 0)
        return f"{tuple(smallest)}–{tuple(largest)}"

    @classmethod
    def available(cls, device):
        if device.type != "cuda":
            return False, f"TensorRT runs on CUDA devices only ({INSTALL_HINT})"
        return tensorrt_status()

    def run_on_device(self, images, input_ids, attention_mask):
        inputs = [t.to(self.dtypes[n]).contiguous() for n, t in zip(INPUT_NAMES, (images, input_ids, attention_mask),
                                                                     strict=True)]
        for name, tensor in zip(INPUT_NAMES, inputs, strict=True):
            if not self.context.set_input_shape(name, tuple(tensor.shape)):  # outside the optimization profile
                raise UserError(f"{self.path}: input {name} of shape {tuple(tensor.shape)} is outside the engine's "
                                f"optimization profile {self.profile_range(name)}: export it again with a larger "
                                "--max-batch")
            self._check(self.context.set_tensor_address(name, tensor.data_ptr()), f"binding input {name}")
        logits = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAMES[0])), dtype=self.dtypes["logits"],
                             device=self.device)
        self._check(self.context.set_tensor_address(OUTPUT_NAMES[0], logits.data_ptr()), "binding the logits")
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)  # inputs written on torch's stream are ready
        self._check(self.context.execute_async_v3(self.stream.cuda_stream), "enqueueing the engine")
        current.wait_stream(self.stream)
        return logits

    def _check(self, ok: bool, what: str) -> None:
        """TensorRT reports failures by returning False (and logging): timing a call that enqueued nothing, or
        returning logits it never wrote, would be worse than stopping."""
        if not ok:
            raise UserError(f"{self.path}: TensorRT failed {what} (its log above says why)")

    def describe(self):
        import tensorrt as trt

        return {**super().describe(), "tensorrt": trt.__version__}


def _torch_dtype(dtype) -> torch.dtype:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32, trt.bfloat16: torch.bfloat16}[dtype]
