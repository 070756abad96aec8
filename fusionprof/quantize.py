"""int8: static post-training quantization of an fp32 ONNX graph, calibrated on the **validation** split.

``onnxruntime.quantization.quantize_static`` in the QDQ format: per-channel int8 weights and per-tensor uint8
activations for the ops that carry the FLOPs (convolutions, and matmuls whose second operand is a weight); every
other op (LayerNorm, Softmax, GELU, the attention's activation × activation matmuls, the residual adds) stays in
float, and the record says which by counting the graph's nodes. The calibration sample is a fixed, seeded draw of
the validation split's pairs: the test split, on which the export gate measures accuracy, is never read here.

For OpenVINO, the same fp32 graph is also quantized by NNCF (``nncf.quantize``, its transformer preset: SmoothQuant,
then fast bias correction), on the same calibration sample, into an OpenVINO IR; ``export.py`` gates both and keeps
for the ``openvino`` backend whichever of the two runs faster there.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fusionprof.chatter import quieted
from fusionprof.config import ModelConfig
from fusionprof.data import prepare_data
from fusionprof.data.text import build_tokenizer
from fusionprof.evaluate import to_inputs

CALIBRATION_SPLIT = "val"
CALIBRATION_PAIRS = 128  # a seeded sample of the split's fixed pairs (positives and negatives)
CALIBRATION_BATCH = 16
QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")  # where the FLOPs are; everything else stays in float
_QDQ = ("QuantizeLinear", "DequantizeLinear")

Feeds = dict[str, np.ndarray]


def calibration_sample(model_cfg: ModelConfig, data: str | None, seed: int, limit: int | None = None,
                       pairs: int = CALIBRATION_PAIRS, batch_size: int = CALIBRATION_BATCH,
                       layout: str | None = None) -> tuple[list[Feeds], dict]:
    """The calibration inputs (ONNX feeds, host numpy) from ``pairs`` pairs of the validation split, drawn with
    ``seed``; and where they came from. ``data`` None: the embedded dataset; ``layout``: the run's (None: the one
    found). Only the validation split is read."""
    tokenizer = build_tokenizer(model_cfg)
    splits, source = prepare_data(data, tokenizer, model_cfg.image_size, model_cfg.max_text_len, seed,
                                  limit_eval=limit, splits=(CALIBRATION_SPLIT,), progress=False, layout=layout)
    split = splits[CALIBRATION_SPLIT]
    all_pairs = split.pairs(seed)
    rng = np.random.default_rng([seed, 8])  # 8: int8's own stream, apart from the pairs' negatives
    chosen = np.sort(rng.choice(len(all_pairs), size=min(pairs, len(all_pairs)), replace=False))
    batches = split.batches(all_pairs, batch_size, order=chosen)
    feeds = []
    for start in range(0, len(chosen), batch_size):  # the batches of the sample, not of the whole split
        (images, ids, mask), _ = to_inputs(batches[start // batch_size], torch.device("cpu"))
        feeds.append({"images": images.contiguous().numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    return feeds, {"split": CALIBRATION_SPLIT, "pairs": len(chosen), "batch_size": batch_size, "seed": seed,
                   "data": source}


def quantize_onnx(source: Path, path: Path, calibration: list[Feeds]) -> dict:
    """Write the int8 QDQ graph of ``source`` to ``path``, calibrated (min / max) on ``calibration``; return what was
    quantized and what stayed in float."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(calibration)

        def get_next(self):
            return next(self.feeds, None)

    input_types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
                   for i in onnx.load(str(source), load_external_data=False).graph.input}
    calibration = [{k: v.astype(input_types[k]) for k, v in feeds.items()} for feeds in calibration]
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # uint8 activations × int8 weights (U8S8): what x86 multiplies fastest without VNNI (AVX2's VPMADDUBSW); on
    # this project's AVX2 EPYC S8S8 ran no faster than fp32, U8S8 1.8x faster at batch 8
    with _without_preprocessing_advice():
        quantize_static(str(source), str(path), Reader(), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=list(QUANTIZED_OP_TYPES), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        # attention's Q·Kᵀ and P·V have no weight: quantizing both inputs costs accuracy for little
                        extra_options={"MatMulConstBOnly": True})
    return {"quantize_seconds": time.perf_counter() - start, "format": "QDQ", "weights": "int8, per channel",
            "activations": "uint8, per tensor, min/max calibration", **ops_by_precision(path)}


def _advice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Please consider")


@contextlib.contextmanager
def _without_preprocessing_advice():
    """onnxruntime's quantizer advises, twice per graph and on the root logger, a pre-processing pass (shape
    inference, graph optimisation) that this export does not run by choice: the user can do nothing about it, so it
    is left out. Its other warnings still show."""
    root = logging.getLogger()
    root.addFilter(_advice)
    try:
        yield
    finally:
        root.removeFilter(_advice)


def ops_by_precision(path: Path) -> dict[str, dict[str, int]]:
    """Node counts per op type: those whose every input is dequantized int8 run in int8, the others in float."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    int8, stays_float = Counter(), Counter()
    for node in graph.node:
        if node.op_type in _QDQ:
            continue
        # onnxruntime fuses DequantizeLinear → op → QuantizeLinear into an int8 kernel where every input is
        # dequantized int8 (a bias may be absent): the others read and write float
        quantized = node.op_type in QUANTIZED_OP_TYPES and all(name in dequantized for name in node.input if name)
        (int8 if quantized else stays_float)[node.op_type] += 1
    return {"int8_ops": dict(sorted(int8.items())), "float_ops": dict(sorted(stays_float.items()))}


def quantize_nncf(source: Path, path: Path, calibration: list[Feeds], progress: bool = False) -> dict:
    """Write the int8 OpenVINO IR of the fp32 ONNX ``source`` to ``path`` (``.xml``, weights in the ``.bin`` beside
    it), quantized by NNCF's post-training quantization on ``calibration``; return what was quantized. NNCF's
    progress bars (on stdout) show only with ``progress``."""
    import nncf
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(source))
    types = {p.get_any_name(): p.get_element_type().to_dtype() for p in model.inputs}
    dataset = nncf.Dataset([{k: v.astype(types[k]) for k, v in feeds.items()} for feeds in calibration])
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # subset_size counts the dataset's items: here batches of the calibration sample, every one of them
    # NNCF asks whether the model is a PyTorch one by importing nncf.torch, which makes PyTorch's CUDA build warn on
    # a machine with no CUDA runtime: noise here, where the model is OpenVINO's. Its progress bars go to stdout.
    with quieted("torch.utils.cpp_extension", stdout=not progress):
        quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                                  model_type=nncf.ModelType.TRANSFORMER)
    seconds = time.perf_counter() - start
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    return {"quantize_seconds": seconds, "format": "OpenVINO IR (FakeQuantize)", "tool": f"nncf {nncf.__version__}",
            "preset": "transformer (SmoothQuant, fast bias correction)", **ir_ops_by_precision(quantized)}


# Ops that carry the FLOPs or the numerics a reader asks about: each is counted as int8 or as float.
_IR_OPS = ("Convolution", "MatMul", "MVN", "Softmax", "Erf", "Gelu")


def ir_ops_by_precision(model) -> dict[str, dict[str, int]]:
    """An OpenVINO model's ops of ``_IR_OPS``: those that read a FakeQuantize output run in int8, the others in
    float."""
    int8, stays_float = Counter(), Counter()
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in _IR_OPS:
            continue
        quantized = any(i.get_source_output().get_node().get_type_name() == "FakeQuantize" for i in op.inputs())
        (int8 if quantized else stays_float)[kind] += 1
    return {"int8_ops": dict(sorted(int8.items())), "float_ops": dict(sorted(stays_float.items()))}
