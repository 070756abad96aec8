"""``onnxruntime``: the exported ONNX model in an InferenceSession (CPU provider, or CUDA with IO binding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fusionprof.backends.base import (
    INPUT_NAMES,
    QUANTIZED_GRAPH_PRECISIONS,
    Backend,
    at_shape,
    register_backend,
    require,
    runtime_failure,
)
from fusionprof.errors import UserError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_TORCH_DTYPE = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}


@register_backend("onnxruntime")
class OnnxRuntime(Backend):
    label = "ONNX Runtime"
    artifact = "onnx"
    cuda_memory_unseen = "onnxruntime allocates from its own CUDA arena"
    precisions = QUANTIZED_GRAPH_PRECISIONS  # int8 on the CPU: the quantized graph's QDQ ops run as int8 kernels

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        import onnxruntime as ort

        path = require(artifacts.onnx, "ONNX model", "fusionprof export --fmt onnx")
        settings = ort.SessionOptions()
        settings.intra_op_num_threads = torch.get_num_threads()  # the same threads as the torch backends
        if self.sleep_when_idle:  # busy-waiting pool threads would take cores that other work needs
            settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
            settings.add_session_config_entry("session.inter_op.allow_spinning", "0")
        provider = PROVIDERS[device.type]
        provider_options = [{"device_id": device.index or 0}] if device.type == "cuda" else [{}]
        try:
            self.session = ort.InferenceSession(str(path), settings, providers=[provider],
                                                provider_options=provider_options)
        except Exception as e:  # InvalidProtobuf, Fail, memory, ...
            raise runtime_failure(e, f"{path}: onnxruntime cannot load it") from None
        used = self.session.get_providers()[0]
        if used != provider:  # ORT silently falls back to the CPU when a provider fails to load
            raise UserError(f"onnxruntime runs on {used}, not {provider} as asked (is onnxruntime-gpu installed?)")
        self.input_dtypes = {i.name: _TORCH_DTYPE[i.type] for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        self.provider, self.path = provider, Path(path)

    @classmethod
    def available(cls, device):
        try:
            import onnxruntime as ort
        except ImportError as e:
            return False, f"onnxruntime is not installed ({e})"
        provider = PROVIDERS.get(device.type)
        if provider not in ort.get_available_providers():
            return False, f"{provider} is not in this onnxruntime build ({', '.join(ort.get_available_providers())})"
        return True, ""

    def _cast(self, inputs):
        return {n: t.to(self.input_dtypes[n]) for n, t in zip(INPUT_NAMES, inputs, strict=True)}

    def run(self, images, input_ids, attention_mask) -> np.ndarray:
        if self.device.type == "cuda":
            return super().run(images, input_ids, attention_mask)
        feeds = {n: t.numpy() for n, t in self._cast((images, input_ids, attention_mask)).items()}
        try:
            logits = self.session.run([self.output_name], feeds)[0]
        except Exception as e:
            raise runtime_failure(e, at_shape("onnxruntime", images, input_ids)) from None
        return logits.astype(np.float32)

    def run_on_device(self, images, input_ids, attention_mask):
        if self.device.type == "cpu":
            return torch.from_numpy(self.run(images, input_ids, attention_mask))
        # CUDA: IO binding on torch-owned device memory, so no copy leaves the GPU.
        binding = self.session.io_binding()
        # ORT reads the bound memory by address only: these tensors (copies where an input was cast or channels-last)
        # must live until the run returns, or torch's allocator may hand their memory to the next one
        bound = {name: t.contiguous() for name, t in self._cast((images, input_ids, attention_mask)).items()}
        for name, tensor in bound.items():
            binding.bind_input(name, "cuda", self.device.index or 0, _np_dtype(tensor), list(tensor.shape),
                               tensor.data_ptr())
        out_dtype = torch.float16 if self.session.get_outputs()[0].type == "tensor(float16)" else torch.float32
        logits = torch.empty(images.shape[0], dtype=out_dtype, device=self.device)
        binding.bind_output(self.output_name, "cuda", self.device.index or 0, _np_dtype(logits), list(logits.shape),
                            logits.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are ready
        try:
            self.session.run_with_iobinding(binding)
        except Exception as e:
            raise runtime_failure(e, at_shape("onnxruntime", images, input_ids)) from None
        return logits

    def describe(self):
        import onnxruntime as ort

        return {**super().describe(), "onnxruntime": ort.__version__, "model": self.path.name,
                "provider": self.provider, "intra_op_threads": self.session.get_session_options().intra_op_num_threads,
                "spin_wait": self._spins()}

    def _spins(self) -> bool:
        """Whether the session's pool threads busy-wait between calls (onnxruntime's default), as the session has it."""
        try:
            return self.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") != "0"
        except Exception:  # onnxruntime raises when the entry was never set: its default, spinning
            return True


def _np_dtype(t: torch.Tensor):
    return {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}[t.dtype]
