"""benchmarks/gpu_inference.py's checks (issue 14's targets), on rows shaped as a GPU sweep writes them: the script
runs only on a lent GPU, so its arithmetic is checked here, before a lease depends on it."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("gpu_inference", Path(__file__).parents[1] / "benchmarks" /
                                              "gpu_inference.py")
gpu_inference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_inference)


def row(fusion, backend, batch, p50, cv=0.01, status="ok", gflops=None):
    return {"fusion": fusion, "backend": backend, "batch_size": batch, "status": status,
            "device_resident": {"p50_ms": p50, "cv": cv}, "device_resident_gflops": gflops or batch * 1e3 / p50}


def test_checks_pick_the_best_launch_free_backend_that_passed_parity_per_fusion():
    rows = [row("mid", "torch", 1, 12.0), row("mid", "torch", 128, 17.0),
            row("mid", "torch-cudagraphs", 1, 1.8, cv=0.02), row("mid", "torch-cudagraphs", 128, 12.0),
            row("mid", "torch-cudagraphs-inductor", 1, 1.5, cv=0.03),
            row("mid", "torch-cudagraphs-inductor", 128, 10.0, cv=0.04, gflops=160e3),
            row("mid", "aoti", 1, 1.4, status="failed: parity"), row("mid", "aoti", 128, 10.5, status="failed: parity"),
            {"fusion": "mid", "backend": "tensorrt", "batch_size": None, "status": "unavailable: no GPU"},
            row("early", "torch", 1, 10.0), row("early", "torch", 128, 15.0),
            row("early", "torch-cudagraphs", 1, 1.6),
            row("early", "torch-cudagraphs", 128, 11.0, cv=None, gflops=150e3)]
    bare = {"mid": {1: {"p50_ms": 1.84}, 128: {"p50_ms": 12.2}}, "early": {1: {"p50_ms": 1.62}, 128: {"p50_ms": 11}}}
    found = gpu_inference.checks(rows, bare, [1, 128])
    mid, early = found["mid"], found["early"]
    assert mid["best_backend"] == "torch-cudagraphs-inductor" and early["best_backend"] == "torch-cudagraphs"
    assert mid["eager_over_best_at_smallest"] == pytest.approx(12.0 / 1.5)
    assert mid["best_over_bare_replay_at_smallest"] == pytest.approx(1.5 / 1.84)
    assert mid["best_tflops_at_largest"] == pytest.approx(160) and early["best_tflops_at_largest"] == pytest.approx(150)
    assert mid["best_cv_max"] == pytest.approx(0.04)  # the worst cell of the best backend, every batch size
    assert early["best_cv_max"] is None  # one cell of one sample: its spread unknown, no CV bar passed
    # aoti, the fastest at batch 1 but wrong, is not the best; it is still compared with torch-cudagraphs at each
    # batch it was timed, and "parity" says which backends passed
    assert mid["aoti_over_cudagraphs"] == {1: pytest.approx(1.4 / 1.8), 128: pytest.approx(10.5 / 12.0)}
    assert mid["parity"] == {"torch": True, "torch-cudagraphs": True, "torch-cudagraphs-inductor": True,
                             "aoti": False}
    assert early["aoti_over_cudagraphs"] == {} and set(found) == {"mid", "early"}


def test_resume_continues_a_record_of_the_same_settings_on_the_same_machine(tmp_path):
    env = {"host": "vm", "cpu_model": "Xeon", "cpu_logical_cores": 16, "gpus": [{"name": "NVIDIA H200"}],
           "cuda_driver": "580", "versions": {"torch": "2.11.0"}, "torch_threads": 16}
    settings = {"preset": "seed", "precision": "bf16", "device": "cuda:0", "batch_sizes": "1,128",
                "backends": "torch,torch-cudagraphs", "min_seconds": 0.5}
    sweep_file = tmp_path / "latency-seed-cuda-bf16.json"
    sweep_file.write_text(json.dumps({"rows": [row("mid", "torch", 1, 12.0)]}))
    path = tmp_path / "gpu-inference-seed-bf16.json"
    path.write_text(json.dumps({
        "args": {**settings, "more_fusions": "mid"}, "environment": env,
        "sweeps": [str(sweep_file)], "stages": ["sweep", "bare replay"], "bare_replay": {"mid": {"1": {"p50_ms": 1.8}}},
        "eager_weights_cast": {}, "aoti_uncaptured": {}, "compile_modes": {"max-autotune": {"1": {"p50_ms": 1.4}}}}))
    args = argparse.Namespace(**settings, more_fusions="mid,early")  # more stages may be asked for than before
    record, rows = gpu_inference.earlier_record(path, args, env)
    assert record["stages"] == ["sweep", "bare replay"] and rows == [row("mid", "torch", 1, 12.0)]
    assert record["bare_replay"] == {"mid": {1: {"p50_ms": 1.8}}}  # batch sizes back as numbers, as checks() reads
    assert record["compile_modes"]["max-autotune"][1]["p50_ms"] == 1.4
    # each call is kept with its own arguments (a record written before calls were kept gets the list)
    call = gpu_inference.begin_call(record, args)
    assert record["calls"] == [call] and call["args"]["more_fusions"] == "mid,early" and call["stages"] == []
    # other settings, or another machine: a new record
    assert gpu_inference.earlier_record(path, argparse.Namespace(**{**settings, "min_seconds": 1.0}), env) is None
    assert gpu_inference.earlier_record(path, args, {**env, "gpus": [{"name": "NVIDIA H100"}]}) is None
    assert gpu_inference.earlier_record(path, args, {**env, "torch_threads": 8}) is None  # rows of other threads
    assert gpu_inference.earlier_record(tmp_path / "none.json", args, env) is None


def test_aoti_packages_reports_each_fusions_package_and_none_where_aoti_cannot_run(tmp_path, capsys):
    """The stage before the sweep: packages an earlier call built (found by their notes) are reported ready, not
    built again; in a precision aoti does not run, there is nothing to build and nothing is reported."""
    from fusionprof.latency import SweepConfig

    for fusion in ("early", "late"):
        package = tmp_path / "pt2" / f"tiny-{fusion}" / "model.cpu.fp32.pt2"
        package.parent.mkdir(parents=True)
        package.write_bytes(b"built by the call before")
        package.with_name(f"{package.name}.made-from.json").write_text(json.dumps({"weights": "untrained, seed 0"}))
    cfg = SweepConfig(fusions=["early", "late"], backends=["aoti"], models_dir=str(tmp_path / "none"))
    found = gpu_inference.aoti_packages(cfg, tmp_path)
    assert found == {f: {"path": str(tmp_path / "pt2" / f"tiny-{f}" / "model.cpu.fp32.pt2")} for f in ("early", "late")}
    assert capsys.readouterr().out.endswith(" s: early ready, late ready\n")
    assert gpu_inference.aoti_packages(SweepConfig(fusions=["early", "late"], backends=["aoti"], precision="int8",
                                                   models_dir=str(tmp_path / "none")), tmp_path) == {}
