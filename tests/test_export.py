"""`fusionprof export` end to end: a trained checkpoint → ONNX → verified parity and accuracy."""

import json

import pytest
import torch
from click.testing import CliRunner

import fusionprof.export
from fusionprof.checkpoint import checkpoint_hash, load_checkpoint
from fusionprof.cli import cli
from fusionprof.export import verified_export, within_tolerance

pytestmark = pytest.mark.slow  # the checkpoint is trained for real


@pytest.fixture
def checkpoint(trained_mid):
    """The session's trained tiny mid run (conftest.py): (checkpoint path, metrics)."""
    return trained_mid


def export_cli(*args):
    result = CliRunner().invoke(cli, ["export", *map(str, args), "--quiet"])
    return result.exit_code, result.output


def test_export_onnx_verifies_parity_and_accuracy(checkpoint, tmp_path):
    path, metrics = checkpoint
    code, out = export_cli("--checkpoint", path, "--out", tmp_path)
    assert code == 0, out
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["status"] == "ok" and record["passed"] and (tmp_path / "model.onnx").exists()
    assert record["onnx"]["axes"]["input_ids"] == ["batch", "sequence"]
    assert [r["batch"] for r in record["parity"]["shapes"]] == [1, 3, 8, 32]  # and the largest batch to be timed
    assert record["checkpoint_hash"] == checkpoint_hash(path) and record["precision"] == "fp32"
    assert all(r["max_abs_error"] < 1e-4 for r in record["parity"]["shapes"])
    acc = record["accuracy"]
    assert acc["pairs"] == 64 and acc["checkpoint_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert acc["exported_accuracy"] == pytest.approx(acc["checkpoint_accuracy"], abs=0.002)
    assert record["backend"]["provider"] == "CPUExecutionProvider"
    assert "parity batch  8" in out and "status ok" in out
    assert verified_export(path, tmp_path, "onnx", "fp32") is not None

    # exported again over it, and the checks die on an error of their own: the old "ok" must not vouch for the new file
    def gone(*args, **kwargs):
        raise RuntimeError("the test split's images are gone")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusionprof.export, "AccuracyGate", gone)
        code, out = export_cli("--checkpoint", path, "--out", tmp_path)
    assert code == 1 and out.strip().splitlines()[-1] == (
        f"Error: RuntimeError: the test split's images are gone (marked failed in {tmp_path / 'export.json'})")
    record = json.loads((tmp_path / "export.json").read_text())
    assert record["status"] == "failed" and "images are gone" in record["failure"]
    assert verified_export(path, tmp_path, "onnx", "fp32") is None


def test_fp32_parity_on_a_gpu_is_held_to_tf32s_tolerance():
    """cuDNN convolutions run in TF32 by default: fp32 on CUDA gets TF32's tolerance, and says so; the CPU does not."""
    from fusionprof.config import model_config
    from fusionprof.export import TF32_TOLERANCE, TOLERANCES, parity
    from fusionprof.models import build_model

    torch.manual_seed(0)
    model = build_model(model_config("tiny", fusion="early", vocab_size=1000)).eval()

    class Off:  # the model's logits moved by 5e-4, as TF32 rounding moves them
        def __init__(self, device):
            self.device = torch.device(device)

        def run(self, images, ids, mask):
            with torch.no_grad():
                return model(images, ids, mask).float().numpy() + 5e-4

    on_gpu, on_cpu = parity(model, Off("cuda:0"), "fp32"), parity(model, Off("cpu"), "fp32")
    assert on_gpu["passed"] and on_gpu["tolerance"]["atol"] == TF32_TOLERANCE["atol"] and "TF32" in on_gpu[
        "tolerance"]["why"]
    assert not on_cpu["passed"] and on_cpu["tolerance"] == TOLERANCES["fp32"]


def test_a_failed_gate_marks_the_artifact_failed(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(fusionprof.export.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0})  # nothing passes
    code, out = export_cli("--checkpoint", checkpoint[0], "--out", tmp_path)
    assert code == 1 and "OUT OF TOLERANCE" in out
    assert out.strip().splitlines()[-1].startswith("Error: the exported model failed verification; marked failed")
    assert json.loads((tmp_path / "export.json").read_text())["status"] == "failed"


def test_export_errors_are_one_line(checkpoint, tmp_path):
    code, out = export_cli("--checkpoint", tmp_path / "none.pt")
    assert code == 1 and "no such checkpoint" in out
    code, out = export_cli("--checkpoint", checkpoint[0], "--fmt", "tflite")
    assert code == 2 and "Invalid value for '--fmt'" in out
    if not torch.cuda.is_available():
        code, out = export_cli("--checkpoint", checkpoint[0], "--fmt", "trt")
        assert code == 1 and 'pip install "fusionprof[trt]" on a CUDA machine' in out
        assert len(out.strip().splitlines()) == 1


def test_a_checkpoint_whose_weights_are_another_fusion(checkpoint, tmp_path):
    ckpt = load_checkpoint(checkpoint[0])
    ckpt["model_config"]["fusion"] = "bottleneck"  # a mid state dict under a bottleneck config
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    code, out = export_cli("--checkpoint", tmp_path / "checkpoint.pt")
    assert code == 1 and "its weights do not fit the bottleneck model its config describes" in out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_pt2_export_is_verified_and_the_sweep_runs_it_without_rebuilding(checkpoint, pt2_export, tmp_path):
    """`export --fmt pt2` into the run's folder (run once, by the pt2_export fixture: test_backends runs the same
    package); then `latency` times that very package beside eager torch."""
    path, metrics = checkpoint
    code, out = pt2_export
    assert code == 0, out
    record = json.loads((path.parent / "export.pt2.cpu.fp32.json").read_text())
    assert record["status"] == "ok" and record["format"] == "pt2" and record["checkpoint_hash"] == checkpoint_hash(path)
    assert record["pt2"]["path"] == str(path.parent / "model.cpu.fp32.pt2") and record["pt2"]["seconds"]["compile"] > 0
    assert record["backend"]["backend"] == "aoti" and all(r["within"] for r in record["parity"]["shapes"])
    assert record["accuracy"]["checkpoint_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    result = CliRunner().invoke(cli, ["latency", "--fusion", "mid", "--backends", "torch,aoti",
                                      "--batch-sizes", "1,8", "--models", str(path.parent.parent),
                                      "--out", str(tmp_path), "--quiet", "--min-seconds", "0.05", "--min-calls", "5",
                                      "--warmup-seconds", "0", "--warmup-calls", "1"])
    assert result.exit_code == 0, result.output
    assert "exporting" not in result.output  # the verified package of this checkpoint, not a new build
    [sweep] = tmp_path.glob("*/latency-tiny-cpu-fp32-*.json")
    rows = json.loads(sweep.read_text())["rows"]
    assert {(r["backend"], r["batch_size"], r["status"]) for r in rows} == {
        (b, n, "ok") for b in ("torch", "aoti") for n in (1, 8)}
    assert {r["backend_info"]["package"] for r in rows if r["backend"] == "aoti"} == {record["pt2"]["path"]}


def test_an_export_of_another_checkpoint_is_not_reused(checkpoint, tmp_path):
    """The sweep reuses a run's export only while its record's checkpoint hash is the checkpoint's."""
    copy = tmp_path / "checkpoint.pt"
    copy.write_bytes(checkpoint[0].read_bytes())
    (tmp_path / "export.json").write_text(json.dumps({"status": "ok", "checkpoint_hash": checkpoint_hash(copy)}))
    assert verified_export(copy, tmp_path, "onnx", "fp32")
    assert not verified_export(copy, tmp_path, "onnx", "fp16")  # no such export
    copy.write_bytes(copy.read_bytes() + b"retrained")  # the run went on after its export
    assert not verified_export(copy, tmp_path, "onnx", "fp32")
    (tmp_path / "export.json").write_text('{"status": "ok", "checkpoint_')  # cut short: exported afresh, no error
    assert verified_export(copy, tmp_path, "onnx", "fp32") is None


@pytest.mark.parametrize("wrong,pairs,tolerance,passed", [
    (4, 2000, 0.002, True),  # exactly at the tolerance, which as a fraction of floats reads just above it
    (5, 2000, 0.002, False),
    (0, 64, 0.01, True),
    (1, 64, 0.01, False),  # one pair is 1.6 %: the allowance of 0.64 pairs is none, not one
    (1, 100, 0.01, True),
])
def test_the_accuracy_gate_counts_pairs(wrong, pairs, tolerance, passed):
    reference, exported = 0.9, 0.9 - wrong / pairs  # as the gate gets them: two accuracies, each a fraction
    assert within_tolerance(abs(exported - reference), pairs, tolerance) is passed


def test_training_and_export_records_say_when_they_were_written(checkpoint, tmp_path):
    """`created`, in UTC and the latency records' format: where several records of one model exist, the newest is
    the one read (records.newest_first)."""
    from datetime import datetime

    from fusionprof.env import STAMP_FORMAT

    path, metrics = checkpoint
    code, out = export_cli("--checkpoint", path, "--out", tmp_path)
    assert code == 0, out
    trained = datetime.strptime(metrics["created"], STAMP_FORMAT)
    exported = datetime.strptime(json.loads((tmp_path / "export.json").read_text())["created"], STAMP_FORMAT)
    assert trained <= exported


def test_a_trt_export_never_rewrites_the_onnx_export_it_builds_from(checkpoint, tmp_path, monkeypatch):
    """`--fmt trt` after `--fmt onnx`: the engine is built from the ONNX that export gated (the same precision, its
    record "ok"), which it reads and never rewrites. Here, without TensorRT, the build fails with one line after the
    ONNX step (TensorRT's availability is let through the early check so that the ONNX step runs, as on a GPU)."""
    import hashlib

    path, _ = checkpoint
    code, out = export_cli("--checkpoint", path, "--out", tmp_path)
    assert code == 0, out
    onnx_bytes = hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest()
    onnx_record = (tmp_path / "export.json").read_text()

    monkeypatch.setattr(fusionprof.export, "tensorrt_status", lambda: (True, ""))
    monkeypatch.setattr(fusionprof.export, "resolve_device", lambda name: torch.device("cuda", 0))
    built, real_export_onnx = [], fusionprof.export.export_onnx
    monkeypatch.setattr(fusionprof.export, "export_onnx",
                        lambda *a, **k: built.append(a[1]) or real_export_onnx(*a, **k))
    code, out = export_cli("--checkpoint", path, "--out", tmp_path, "--fmt", "trt")
    error = [line for line in out.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(error) == 1 and "tensorrt" in error[0].lower(), out  # one line, naming what is missing
    assert hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest() == onnx_bytes
    assert (tmp_path / "export.json").read_text() == onnx_record and json.loads(onnx_record)["status"] == "ok"
    assert built == []  # the gated ONNX was reused, not exported again
    trt = json.loads((tmp_path / "export.trt.fp32.json").read_text())
    assert trt["status"] == "failed" and trt["onnx"]["path"] == str(tmp_path / "model.onnx")
    assert trt["onnx"]["reused"] == str(tmp_path / "export.json")

    # with no gated ONNX of its precision to build from, it writes an intermediate of its own, beside the plan
    (tmp_path / "export.json").unlink()
    code, out = export_cli("--checkpoint", path, "--out", tmp_path, "--fmt", "trt")
    assert code == 1 and out.strip().splitlines()[-1].startswith("Error: "), out
    assert built == [tmp_path / "model.trt.onnx"]
    assert hashlib.sha256((tmp_path / "model.onnx").read_bytes()).hexdigest() == onnx_bytes
