"""``aoti``: an AOTInductor package (``fusionprof export --fmt pt2``), run without the model's Python code.

The package holds the graph compiled ahead of time for one device type and precision (weights cast to it), with
dynamic batch and caption length; ``aoti_load_package`` loads it as a callable. It is PyTorch's own deployment path
(no ONNX, no TensorRT), so it runs wherever PyTorch runs — the CPU included.

On a GPU the package's call still launches each of its kernels from the host (from C++, not Python, but one by one),
so, as issue 14 allows, each input shape's call is captured once as a CUDA graph and replayed (``graphs.py``, like
``torch-cudagraphs``). A package whose call cannot be captured runs uncaptured, and ``describe()`` says why.
"""

from __future__ import annotations

import torch

from fusionprof.backends.base import AUTOCAST_PRECISIONS, Backend, inductor_status, register_backend, require
from fusionprof.backends.graphs import MEMORY_UNSEEN, ShapeGraphs
from fusionprof.chatter import quieted
from fusionprof.errors import UserError, first_line
from fusionprof.runtime import DTYPES


@register_backend("aoti")
class AOTInductor(Backend):
    label = "AOTInductor (.pt2)"
    artifact = "pt2"
    precisions = AUTOCAST_PRECISIONS  # weights cast to the dtype at export: fp16 on a GPU only, like autocast
    compiles = True  # its export compiles the model ahead of time: a minute or two per model on a 2-core CPU
    cuda_graphs = True  # on a GPU, replay each shape's call as a CUDA graph (False: the package's call as it is)
    cuda_memory_unseen = MEMORY_UNSEEN  # its calls replayed as graphs

    def __init__(self, artifacts, device, precision, **options):
        super().__init__(artifacts, device, precision, **options)
        path = require(artifacts.pt2, "AOTInductor package", f"fusionprof export --fmt pt2 --precision {precision}")
        self.dtype = DTYPES[precision]
        captured = device.type == "cuda" and self.cuda_graphs
        try:
            # single-threaded: the package's runtime then skips the CUDA event it queries and records per call
            # between its model instances, which a stream being captured refuses ("operation not permitted when
            # stream is capturing"); PyTorch added the flag for capturing packages in CUDA graphs
            # loading imports cpp_extension, which warns on a CUDA build of torch with no CUDA runtime (any CPU-only
            # machine): not news to the user, and not fusionprof's to print
            with quieted("torch.utils.cpp_extension", stdout=False):
                self.runner = torch._inductor.aoti_load_package(str(path), run_single_threaded=captured,
                                                                device_index=device.index or 0
                                                                if device.type == "cuda" else -1)
        except Exception as e:  # a package for another device, torch version or a truncated file
            raise UserError(f"{path}: AOTInductor cannot load it ({first_line(e)})") from None
        self.path = path
        self.graphs = ShapeGraphs(self._call, device, self.dtype) if captured else None
        self.uncaptured = None if self.graphs else "not on a GPU" if device.type != "cuda" else "switched off"

    @classmethod
    def available(cls, device):
        return inductor_status()

    def _call(self, images, input_ids, attention_mask):
        # The package's kernels index memory as the export's example laid it out (contiguous NCHW) and check no
        # strides: channels_last images, as evaluation batches are, would be read as garbage.
        return self.runner(images.to(self.dtype).contiguous(), input_ids.contiguous(), attention_mask.contiguous())

    @torch.inference_mode()
    def run_on_device(self, images, input_ids, attention_mask):
        if self.graphs is not None:
            try:
                return self.graphs(images, input_ids, attention_mask)
            except RuntimeError as e:  # a kernel or allocation the capture refuses: run the package as it is
                self.graphs, self.uncaptured = None, f"capture failed: {first_line(e)}"
                torch.cuda.synchronize(self.device)
        return self._call(images, input_ids, attention_mask)

    def describe(self):
        replay = self.graphs.describe() if self.graphs else {"uncaptured": self.uncaptured}
        return {**super().describe(), "package": str(self.path), "weights": f"cast to {self.precision}", **replay}
