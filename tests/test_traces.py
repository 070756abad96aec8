"""Traces we write are served by a real TensorBoard with the PyTorch Profiler plugin (torch-tb-profiler)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fusionprof.backends import Artifacts, create_backend
from fusionprof.config import model_config
from fusionprof.models import build_model
from fusionprof.models.model import example_inputs
from fusionprof.profiling import TRAIN_RANGES, describe_step_profile, run_profiled, step_breakdown, trace_dir

H200_TRACE = Path(__file__).parent / "data" / "h200-train-tiny-mid.pt.trace.json.gz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def trace(tmp_path, tokenizer):
    model = build_model(model_config("tiny", fusion="mid", vocab_size=len(tokenizer))).eval()
    backend = create_backend("torch", Artifacts(model), torch.device("cpu"))
    inputs = example_inputs(model.cfg, 4, 12)
    out = trace_dir(tmp_path, "latency-mid-bs4")
    written = run_profiled(lambda i: backend.run(*inputs), out, torch.device("cpu"))
    files = list(out.glob("*.pt.trace.json"))
    assert files == [written]
    events = json.loads(files[0].read_text())["traceEvents"]  # plain Chrome trace JSON, what Perfetto opens
    names = {e.get("name") for e in events}
    assert {"image_encoder", "text_encoder", "fusion"} <= names and "ProfilerStep#3" in names
    return tmp_path / "traces"


@pytest.mark.slow
def test_tensorboard_serves_our_trace(trace):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(trace), "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/data/plugin/pytorch_profiler"
    try:
        deadline, runs = time.time() + 120, {}
        while time.time() < deadline:
            try:
                runs = get(f"{api}/runs")
                if "latency-mid-bs4" in runs["runs"] and not runs["loading"]:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        assert runs.get("runs") == ["latency-mid-bs4"], runs
        run = "run=latency-mid-bs4"
        views = get(f"{api}/views?{run}")
        assert "Overview" in views and "Operator" in views
        workers = get(f"{api}/workers?{run}&view=Overview")
        assert workers == ["latency-mid-bs4"]
        spans = get(f"{api}/spans?{run}&worker={workers[0]}")
        query = f"{run}&worker={workers[0]}&span={spans[0] if spans else ''}"
        overview = get(f"{api}/overview?{query}")
        assert overview["environments"][1] == {"title": "Device Type", "value": "CPU"}
        assert len(overview["steps"]["rows"]) == 4  # the four active profiler steps
        operators = get(f"{api}/operation/table?{query}&group_by=Operation")
        op_names = {row["name"] for row in operators["data"]}
        assert "aten::conv2d" in op_names and "aten::linear" in op_names
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_step_breakdown_of_a_real_gpu_trace():
    """A tiny/mid training step profiled on an H200 (trimmed trace, tests/data): 4 steps of ~64 ms in which the GPU
    is busy ~3.4 ms. Backward's kernels come from autograd's thread, not the loop's; they still count as backward."""
    profile = step_breakdown(H200_TRACE, TRAIN_RANGES)
    step, ranges = profile["step"], profile["ranges"]
    assert step["steps"] == 4
    assert step["step_ms"] == pytest.approx(64.02, abs=0.01)
    assert step["gpu_busy_ms"] == pytest.approx(3.41, abs=0.01)
    assert step["gpu_busy_share"] == pytest.approx(3.41 / 64.02, abs=1e-3)
    assert ranges["backward"]["gpu_ms_per_step"] == pytest.approx(1.80, abs=0.01)
    assert ranges["backward"]["ms_per_step"] == pytest.approx(21.15, abs=0.01)
    assert ranges["fusion"]["ms_per_step"] == pytest.approx(11.73, abs=0.01)
    # every kernel of this trace was launched inside one of the ranges
    assert sum(r["gpu_ms_per_step"] for r in ranges.values()) == pytest.approx(step["gpu_busy_ms"], rel=1e-9)
    assert sum(r["share"] for r in ranges.values()) == pytest.approx(1.0)
    line = describe_step_profile(profile)
    assert "64.0 ms a step" in line and "GPU busy 3.4 ms (5% of the step)" in line and "backward 1.80" in line
