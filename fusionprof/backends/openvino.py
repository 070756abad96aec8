"""``openvino``: the exported ONNX model compiled by OpenVINO's CPU plugin, the runtime built for Intel's CPUs.

It reads the same ONNX as onnxruntime: the fp32 graph (in bf16 through the ``INFERENCE_PRECISION_HINT`` where the
CPU has native bf16), or in int8 the quantized graph: NNCF's OpenVINO IR (``Artifacts.ir``) where the int8 export
kept it (it passed the gates and ran faster here than the QDQ graph), else onnxruntime's QDQ ONNX, whose QDQ pairs
OpenVINO folds into int8 kernels. The hint is always set: left alone, OpenVINO runs an fp32 graph in bf16 on a CPU
with AMX or AVX512-BF16.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from fusionprof.backends.base import INPUT_NAMES, Backend, at_shape, register_backend, require, runtime_failure
from fusionprof.runtime import native_bf16

# The precision OpenVINO computes the float part of the graph in (int8's float ops included).
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


@register_backend("openvino")
class OpenVino(Backend):
    label = "OpenVINO"
    artifact = "onnx"
    # bf16 only where the CPU computes it: elsewhere the hint would emulate it, slower than fp32
    precisions: ClassVar[dict[str, tuple[str, ...]]] = {
        "cpu": ("fp32", "bf16", "int8") if native_bf16(torch.device("cpu")) else ("fp32", "int8")}

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        import openvino as ov

        if precision == "int8" and artifacts.ir is not None:
            path = require(artifacts.ir, "OpenVINO IR", "fusionprof export --precision int8")
        else:
            path = require(artifacts.onnx, "ONNX model", "fusionprof export --fmt onnx")
        self.path = path
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}  # the same threads as the torch backends
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
            self.request = self.compiled.create_infer_request()
        except Exception as e:  # RuntimeError / GeneralFailure, pages long
            raise runtime_failure(e, f"{path}: openvino cannot compile it") from None
        self.input_dtypes = {port.get_any_name(): port.get_element_type().to_dtype()
                             for port in self.compiled.inputs}

    @classmethod
    def available(cls, device):
        if device.type != "cpu":
            return False, "the openvino backend runs on the CPU only"
        try:
            import openvino as ov
        except ImportError as e:
            return False, f"openvino is not installed ({e})"
        if "CPU" not in ov.Core().available_devices:
            return False, "OpenVINO's CPU plugin does not load here"
        return True, ""

    def run(self, images, input_ids, attention_mask) -> np.ndarray:
        feeds = {name: np.ascontiguousarray(t.numpy(), dtype=self.input_dtypes[name])
                 for name, t in zip(INPUT_NAMES, (images, input_ids, attention_mask), strict=True)}
        try:
            self.request.infer(feeds)
        except Exception as e:
            raise runtime_failure(e, at_shape("openvino", images, input_ids)) from None
        return self.request.get_output_tensor(0).data.astype(np.float32)  # a copy: the next call reuses the buffer

    def run_on_device(self, images, input_ids, attention_mask):
        return torch.from_numpy(self.run(images, input_ids, attention_mask))

    def describe(self):
        import openvino as ov

        return {**super().describe(), "openvino": ov.get_version(), "model": self.path.name,
                "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                "inference_threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS"))}
