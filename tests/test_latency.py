"""`fusionprof latency` through the CLI: records, table, unavailable backends, errors; `train --profile`."""

import csv
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import NO_CUDA_64

from fusionprof.cli import cli

QUICK = ["--min-seconds", "0.05", "--min-calls", "5", "--warmup-seconds", "0", "--warmup-calls", "1"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_latency_sweep_writes_self_describing_records(tmp_path):
    code, out = run_cli("latency", "--fusion", "early,bottleneck", "--backends", "torch,onnxruntime,tensorrt",
                        "--batch-sizes", "1,3", "--models", tmp_path / "none", "--out", tmp_path, "--quiet", *QUICK)
    assert code == 0, out
    [path] = list(tmp_path.glob("*/latency-tiny-cpu-fp32-*.json"))
    record = json.loads(path.read_text())
    assert record["schema_version"] == 1 and record["kind"] == "latency"
    assert record["environment"]["host"] == path.parent.name and record["config"]["protocol"]["min_calls"] == 5
    assert record["reference_matmul"]["gflops"] > 0
    ok = [r for r in record["rows"] if r["status"] == "ok"]
    assert {(r["fusion"], r["backend"], r["batch_size"]) for r in ok} == {
        (f, b, n) for f in ("early", "bottleneck") for b in ("torch", "onnxruntime") for n in (1, 3)}
    for r in ok:
        assert len(r["samples_ms"]) == r["n"] >= 5
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_samples_per_s"] == pytest.approx(r["batch_size"] / (r["mean_ms"] / 1e3))
        assert r["achieved_gflops"] == pytest.approx(r["flops_per_sample"] * r["throughput_samples_per_s"] / 1e9)
        assert r["parity_passed"] and r["model"]["weights"].startswith("untrained")
        assert r["first_call_ms"] > 0 and r["load_seconds"] >= 0 and "copy" in r["timing"]
    [trt] = [r for r in record["rows"] if r["backend"] == "tensorrt" and r["fusion"] == "early"]
    assert trt["status"].startswith("unavailable: TensorRT runs on CUDA devices only")
    assert "unavailable: TensorRT" in out and "p50 ms" in out
    rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert len(rows) == len(record["rows"]) and float(rows[0]["p50_ms"]) > 0


def test_latency_uses_trained_checkpoints(tmp_path, small_data):
    assert run_cli("train", "--fusion", "late", "--data", small_data, "--epochs", "1", "--limit-train", "8",
                   "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet")[0] == 0
    code, out = run_cli("latency", "--fusion", "late", "--backends", "torch", "--batch-sizes", "2",
                        "--models", tmp_path / "m", "--out", tmp_path / "lat", "--quiet", *QUICK)
    assert code == 0, out
    [path] = list((tmp_path / "lat").glob("*/latency-*.json"))
    assert json.loads(path.read_text())["rows"][0]["model"]["weights"] == "trained"


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda:64"], NO_CUDA_64),
    (["--backends", "torch,tvm"], "unknown backend 'tvm'; choose from onnxruntime, tensorrt, torch, torch-compile"),
    (["--fusion", "mid,fancy"], "unknown fusion 'fancy'; choose from all, bottleneck, early, late, mid"),
    (["--batch-sizes", "1,x"], "'1,x' is not a comma-separated list of int"),
    (["--batch-sizes", "0,4"], "--batch-sizes must be whole numbers of at least 1"),
])
def test_latency_errors_are_one_line(args, message, tmp_path):
    code, out = run_cli("latency", *args, "--out", tmp_path, "--quiet", *QUICK)
    assert code != 0 and message in out.strip().splitlines()[-1] and "Traceback" not in out


def test_train_profile_writes_a_trace_and_the_step_breakdown(tmp_path, small_data):
    code, out = run_cli("train", "--fusion", "mid", "--data", small_data, "--epochs", "1", "--batch-size", "8",
                        "--profile", "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet")
    assert code == 0, out
    assert "training step profile" in out
    metrics = json.loads((tmp_path / "p" / "tiny-mid" / "metrics.json").read_text())
    parts = metrics["step_breakdown"]
    assert set(parts) == {"data", "image_encoder", "text_encoder", "fusion", "align", "loss", "backward",
                          "optimizer_step"}
    assert sum(p["share"] for p in parts.values()) == pytest.approx(1.0)
    assert parts["backward"]["ms_per_step"] > 0 and parts["image_encoder"]["ms_per_step"] > 0
    step = metrics["step_profile"]
    assert step["steps"] == 4 and step["step_ms"] >= sum(p["ms_per_step"] for p in parts.values())
    assert "gpu_busy_ms" not in step and "gpu_ms_per_step" not in parts["backward"]  # a CPU run: no GPU figures
    traces = list((tmp_path / "p" / "traces" / "train-tiny-mid").glob("*.pt.trace.json"))
    assert len(traces) == 1
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"data", "backward", "optimizer_step", "image_encoder"} <= names


def test_a_profiled_run_keeps_the_terminal_clean(tmp_path, small_data):
    """Kineto's own stage lines (and, on a CUDA build without a GPU, an "ERROR ... gpuGetDeviceCount") stay out
    of a profiled run's stderr; the step profile line is what the user sees."""
    out = subprocess.run([sys.executable, "-m", "fusionprof", "train", "--fusion", "late", "--data", small_data,
                          "--epochs", "1", "--limit-train", "8", "--batch-size", "8", "--profile", "--quiet",
                          "--out", tmp_path / "m", "--profiles", tmp_path / "p"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "training step profile" in out.stdout
    assert not [line for line in out.stderr.splitlines() if line.startswith(("USDT:", "STAGE:", "ERROR:"))]
