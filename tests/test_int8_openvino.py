"""int8 on OpenVINO: NNCF's IR beside onnxruntime's QDQ graph, from the same calibration sample, gated the same way,
and loaded by ``openvino`` only where it passed and ran faster."""

import pytest
import torch

from fusionprof.backends import create_backend
from fusionprof.backends.base import BACKENDS
from fusionprof.config import model_config
from fusionprof.export import CHOICE_ROUNDS, TOLERANCES, export_int8_onnx, int8_artifacts, int8_choice, nncf_ir_path
from fusionprof.models import build_model
from fusionprof.quantize import calibration_sample

CPU = torch.device("cpu")


def test_openvino_loads_nncfs_ir_only_when_it_passed_and_ran_faster():
    assert int8_choice(True, {"nncf": 8.0, "qdq": 9.0})[0] == "nncf"
    assert int8_choice(True, {"nncf": 9.0, "qdq": 9.0}) == ("qdq", "the QDQ graph ran at least as fast on openvino "
                                                                   "at batch 8")
    assert int8_choice(False, {"nncf": 1.0, "qdq": 9.0}) == ("qdq", "NNCF's IR failed the int8 parity gate")


@pytest.mark.slow  # an ONNX export, two quantizations and four openvino compilations: about a minute
def test_the_int8_export_keeps_the_model_openvino_chose(tmp_path, tokenizer, small_data, capsys, untrained_onnx):
    if not BACKENDS.get("openvino").available(CPU)[0]:
        pytest.skip("openvino is unavailable here")
    torch.manual_seed(0)
    model = build_model(model_config("tiny", fusion="mid", vocab_size=len(tokenizer))).eval()
    feeds, source = calibration_sample(model.cfg, str(small_data), seed=0, pairs=32, batch_size=16)
    path = tmp_path / "model.int8.onnx"
    capsys.readouterr()
    another = {"path": str(untrained_onnx["early"].onnx), "reused": "an fp32 export of another model"}
    record = export_int8_onnx(model, path, feeds, source, another)  # fails parity: mid is exported afresh
    assert "reused" not in record["quantized_from"] and record["quantized_from"]["parity"]["passed"]
    assert "Statistics collection" not in capsys.readouterr().out  # progress off: NNCF's bars are not shown
    openvino = record["openvino"]

    nncf = openvino["nncf"]  # its parity was measured on the IR itself, compiled by openvino
    assert nncf["backend"]["model"] == "model.int8.nncf.xml" and openvino["qdq"]["backend"]["model"] == path.name
    assert nncf["parity"]["tolerance"] == TOLERANCES["int8"] and nncf["tool"].startswith("nncf ")
    assert nncf["int8_ops"]["Convolution"] > 0 and nncf["int8_ops"]["MatMul"] > 0
    assert {"MVN", "Softmax"} <= set(nncf["float_ops"])  # LayerNorm and softmax stay in float
    timed = openvino["p50_ms"]
    assert all(len(rounds) == CHOICE_ROUNDS for rounds in timed["rounds"].values())
    assert (openvino["loads"], openvino["why"]) == int8_choice(nncf["parity"]["passed"], timed["median"])

    kept = nncf_ir_path(path)  # on disk only if chosen: what the sweep and the load test then run
    assert kept.exists() == kept.with_suffix(".bin").exists() == (openvino["loads"] == "nncf")
    backend = create_backend("openvino", int8_artifacts(model, path), CPU, "int8")
    assert backend.describe()["model"] == (kept.name if openvino["loads"] == "nncf" else path.name)
