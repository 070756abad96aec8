"""int8 on OpenVINO: NNCF's IR beside onnxruntime's QDQ graph, from the same calibration sample, gated the same way,
and loaded by ``openvino`` only where it passed and ran faster."""

import json

import pytest
import torch
from conftest import copy_run

import fusionprof.export
from fusionprof.backends import create_backend
from fusionprof.backends.base import BACKENDS
from fusionprof.checkpoint import load_model
from fusionprof.export import CHOICE_ROUNDS, TOLERANCES, int8_artifacts, int8_choice, nncf_ir_path

CPU = torch.device("cpu")


def test_openvino_loads_nncfs_ir_only_when_it_passed_and_ran_faster():
    assert int8_choice(True, {"nncf": 8.0, "qdq": 9.0})[0] == "nncf"
    assert int8_choice(True, {"nncf": 9.0, "qdq": 9.0}) == ("qdq", "the QDQ graph ran at least as fast on openvino "
                                                                   "at batch 8")
    assert int8_choice(False, {"nncf": 1.0, "qdq": 9.0}) == ("qdq", "NNCF's IR failed the int8 parity gate")


@pytest.mark.slow  # the session's int8 export of its trained tiny mid run: two quantizations, four openvino compiles
def test_the_int8_export_keeps_the_model_openvino_chose(int8_export, trained_mid):
    if not BACKENDS.get("openvino").available(CPU)[0]:
        pytest.skip("openvino is unavailable here")
    _, out, folder = int8_export
    assert "Statistics collection" not in out  # --quiet: NNCF's progress bars are not shown
    path = folder / "model.int8.onnx"
    openvino = json.loads((folder / "export.onnx.int8.json").read_text())["onnx"]["openvino"]

    nncf = openvino["nncf"]  # its parity was measured on the IR itself, compiled by openvino
    assert nncf["backend"]["model"] == "model.int8.nncf.xml" and openvino["qdq"]["backend"]["model"] == path.name
    assert nncf["parity"]["tolerance"] == TOLERANCES["int8"] and nncf["tool"].startswith("nncf ")
    assert nncf["int8_ops"]["Convolution"] > 0 and nncf["int8_ops"]["MatMul"] > 0
    assert {"MVN", "Softmax"} <= set(nncf["float_ops"])  # LayerNorm and softmax stay in float
    timed = openvino["p50_ms"]
    assert all(len(rounds) == CHOICE_ROUNDS for rounds in timed["rounds"].values())
    chosen = int8_choice(nncf["parity"]["passed"], timed["median"])
    if chosen[0] == "nncf" and not nncf["accuracy"]["passed"]:  # chosen, then dropped by export's accuracy gate
        chosen = ("qdq", "NNCF's IR failed the accuracy gate")
    assert (openvino["loads"], openvino["why"]) == chosen

    kept = nncf_ir_path(path)  # on disk only if chosen: what the sweep and the load test then run
    assert kept.exists() == kept.with_suffix(".bin").exists() == (openvino["loads"] == "nncf")
    model, _ = load_model(trained_mid[0])
    backend = create_backend("openvino", int8_artifacts(model, path), CPU, "int8")
    assert backend.describe()["model"] == (kept.name if openvino["loads"] == "nncf" else path.name)


@pytest.mark.slow  # quantizes the session's trained tiny mid run twice, with NNCF and for onnxruntime
def test_a_sweeps_int8_export_holds_nncfs_ir_to_the_accuracy_gate(trained_mid, tmp_path, monkeypatch):
    """The sweep's own int8 export of a trained model kept NNCF's IR on parity and speed alone, where `fusionprof
    export` also holds it to the accuracy gate. With the IR chosen whatever the timing said, it is kept where the gate
    passes it and dropped where it does not (no accuracy close enough): openvino then loads the QDQ graph."""
    from fusionprof.latency import IR_GATED, SweepConfig, _made_from, load_artifacts

    if not BACKENDS.get("openvino").available(CPU)[0]:
        pytest.skip("openvino is unavailable here")
    monkeypatch.setattr(fusionprof.export, "int8_choice", lambda passed, p50_ms: ("nncf", "chosen by the test"))
    copy_run(trained_mid[0], tmp_path / "models")
    cfg = SweepConfig(fusions=["mid"], backends=["openvino"], precision="int8", models_dir=str(tmp_path / "models"))
    for tolerance, kept in ((1.0, True), (-1.0, False)):  # any accuracy is close enough; none is
        monkeypatch.setitem(fusionprof.export.ACCURACY_TOLERANCE, "int8", tolerance)
        work = tmp_path / f"sweep-{kept}"
        artifacts, _ = load_artifacts(cfg, "mid", work, log=lambda s: None)
        assert (artifacts.ir is not None) == kept and len(list(work.rglob("*.nncf.*"))) == 2 * kept
        assert _made_from(artifacts.onnx)["nncf_ir"] == IR_GATED  # an older sweep's IR, never gated, is made again
        backend = create_backend("openvino", artifacts, CPU, "int8")
        assert backend.describe()["model"] == ("model.int8.nncf.xml" if kept else "model.int8.onnx")
