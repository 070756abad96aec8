"""AOTInductor packages are built in a child process: a crash or a hang is a reason, never a dead caller."""

import json
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import copy_run

from fusionprof.backends import Artifacts
from fusionprof.checkpoint import load_model
from fusionprof.cli import cli
from fusionprof.compare import Stages, export_stages
from fusionprof.config import model_config
from fusionprof.errors import UserError
from fusionprof.export import export
from fusionprof.latency import PackageBuild, SweepConfig, build_packages, load_ahead, random_init_model
from fusionprof.models import build_model
from fusionprof.pt2 import PackagesAhead, _why, build_pt2, reason, run_child

CPU = torch.device("cpu")


def test_a_child_killed_by_a_signal_names_the_signal():
    assert _why(-11, {"step": "compile"}) == "the build process died with SIGSEGV"
    assert _why(1, {"step": "export", "error": "RuntimeError: no"}) == "RuntimeError: no"
    assert _why(1, {"step": "export"}) == "the build process exited with code 1"


def test_an_export_error_keeps_its_first_listed_cause():
    """torch 2.11's export failure on an H200: its first line alone did not say which guard failed."""
    error = RuntimeError("Constraints violated (sequence)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
                         "  - Not all values of sequence = L['input_ids'].size()[1] in the specified range sequence <= "
                         "512 satisfy the generated guard min(L, 8*L) == L.\n\nThe error above occurred when calling "
                         "torch.export.export.")
    assert reason(error).startswith("Constraints violated (sequence)! For more information")
    assert reason(error).endswith("- Not all values of sequence = L['input_ids'].size()[1] in the specified range "
                                  "sequence <= 512 satisfy the generated guard min(L, 8*L) == L.")
    assert reason(RuntimeError("one line\nthen a page")) == "one line" and "\n" not in reason(error)


def test_a_sigkill_we_did_not_send_is_not_called_a_timeout():
    """The out-of-memory killer sends SIGKILL too: a child killed by it before our time limit was said to have run
    past that limit ("SIGKILL after 3600 s"). Real children: one that SIGKILLs itself at once, one that outlives it."""
    start = time.perf_counter()
    exitcode, timed_out = run_child(signal.raise_signal, (signal.SIGKILL,), timeout_s=120)
    assert (exitcode, timed_out) == (-signal.SIGKILL, False) and time.perf_counter() - start < 60
    killed = _why(exitcode, {"step": "compile"}, 120 if timed_out else None)
    assert killed == "the build process was killed by SIGKILL (likely out of memory)"
    exitcode, timed_out = run_child(time.sleep, (120,), timeout_s=1)
    assert (exitcode, timed_out) == (-signal.SIGKILL, True)  # the same exit code: only our own flag tells them apart
    assert _why(exitcode, {"step": "compile"}, 1 if timed_out else None) == \
        "the build process ran past its 1 s time limit and was killed (SIGKILL)"


def test_a_build_past_its_time_limit_is_a_one_line_error(tmp_path):
    model = build_model(model_config("tiny", fusion="early", vocab_size=1000))
    with pytest.raises(UserError, match=r"AOTInductor build failed at its \w+ step: the build process ran past its "
                                        r"1 s time limit and was killed \(SIGKILL\)"):
        build_pt2(model, tmp_path / "model.pt2", "fp32", torch.device("cpu"), timeout_s=1)
    assert not (tmp_path / "model.pt2").exists()


def test_a_stopped_child_is_killed_at_once_and_not_called_a_timeout():
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    start = time.perf_counter()
    exitcode, timed_out = run_child(time.sleep, (120,), timeout_s=120, stop=stop)
    assert (exitcode, timed_out) == (-signal.SIGKILL, False) and time.perf_counter() - start < 30


def test_packages_nobody_takes_are_stopped_and_leave_nothing(tmp_path):
    """Leaving the block (a study stopped by a failed export, or Ctrl-C) kills the builds still running, at once,
    rather than waiting minutes for packages no one will take; nothing is left at their paths."""
    model = build_model(model_config("tiny", fusion="early", vocab_size=1000))
    start = time.perf_counter()
    with PackagesAhead({tmp_path / "a.pt2": (model, "fp32", CPU), tmp_path / "b.pt2": (model, "fp32", CPU)}, 2):
        time.sleep(1)  # both children started
    assert time.perf_counter() - start < 30
    assert not list(tmp_path.iterdir())


def test_an_export_takes_the_reason_its_package_failed_ahead(tmp_path, trained_mid):
    """A package built ahead that failed makes its export fail as if the export had built it: a failed record with
    the build's reason, and one line."""
    checkpoint = copy_run(trained_mid[0], tmp_path / "models")
    package = checkpoint.parent / "model.cpu.fp32.pt2"
    failed = r"AOTInductor build failed at its \w+ step: the build process ran past its 1 s time limit and was killed"
    with PackagesAhead({package: (load_model(checkpoint)[0], "fp32", CPU)}, 1, timeout_s=1) as ahead, \
            pytest.raises(UserError, match=failed + r" \(SIGKILL\) \(marked failed in "):
        export(checkpoint, "pt2", progress=False, log=lambda _: None, packages=ahead)
    record = json.loads((checkpoint.parent / "export.pt2.cpu.fp32.json").read_text())
    assert record["status"] == "failed" and "ran past its 1 s time limit" in record["failure"]
    assert not package.exists()


def test_builds_side_by_side_keep_each_failure_to_its_model(tmp_path):
    """Each build that fails says why in its own model's ``Artifacts`` (one refused at once, one killed at its time
    limit in its child process), and no note says a package was made."""
    early, late = (PackageBuild(f, Artifacts(random_init_model("tiny", f)), tmp_path / f / "model.pt2", precision,
                                torch.device("cpu"), {"weights": "untrained, seed 0"})
                   for f, precision in (("early", "int8"), ("late", "fp32")))
    said = []
    build_packages([early, late], jobs=2, log=said.append, timeout_s=1)
    assert said[0].startswith("building 2 AOTInductor package(s), 2 at a time: early → ")
    assert early.artifacts.pt2 is None and "holds fp32, bf16 or fp16 weights" in early.artifacts.failed["pt2"]
    assert late.artifacts.pt2 is None and "ran past its 1 s time limit" in late.artifacts.failed["pt2"]
    assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob("*.pt2"))


def test_packages_a_sweep_built_before_are_not_built_again(tmp_path):
    """load_ahead finds each fusion's earlier package by its note (made from the same weights) and builds none; with
    one build at a time, one fusion, or no backend that loads a package, it leaves each fusion to the sweep."""
    cfg = SweepConfig(fusions=["early", "mid"], backends=["aoti"], models_dir=str(tmp_path / "none"))
    for fusion in cfg.fusions:
        package = tmp_path / "pt2" / f"tiny-{fusion}" / "model.cpu.fp32.pt2"
        package.parent.mkdir(parents=True)
        package.write_bytes(b"an earlier sweep's package")
        package.with_name(f"{package.name}.made-from.json").write_text(json.dumps({"weights": "untrained, seed 0"}))
    said = []
    loaded = load_ahead(cfg, cfg.fusions, tmp_path, jobs=2, log=said.append)
    assert {f: a.pt2.parent.name for f, (a, _) in loaded.items()} == {"early": "tiny-early", "mid": "tiny-mid"}
    assert not any("building" in line or "exporting" in line for line in said)
    assert load_ahead(cfg, cfg.fusions, tmp_path, jobs=1) == {}
    assert load_ahead(cfg, ["mid"], tmp_path, jobs=2) == {}
    assert load_ahead(SweepConfig(fusions=["early", "mid"], backends=["torch"]), ["early", "mid"], tmp_path, 2) == {}


@pytest.mark.slow
def test_a_sweep_builds_its_packages_side_by_side_then_times_them(tmp_path):
    """`latency --backends aoti` over two fusions: both packages built at once (real AOTInductor builds, each in its
    own process), before anything is timed, then each timed; a second sweep reuses them."""
    args = ["latency", "--fusion", "early,late", "--backends", "aoti", "--batch-sizes", "1", "--build-jobs", "2",
            "--models", str(tmp_path / "none"), "--out", str(tmp_path), "--quiet", "--min-seconds", "0.05",
            "--min-calls", "5", "--warmup-seconds", "0", "--warmup-calls", "1", "--rounds", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "building 2 AOTInductor package(s), 2 at a time" in result.output
    assert result.output.count(": built ") == 2 and "exporting" not in result.output
    [record] = tmp_path.glob("*/latency-*.json")
    rows = json.loads(record.read_text())["rows"]
    assert {(r["fusion"], r["status"]) for r in rows} == {("early", "ok"), ("late", "ok")}
    assert {r["backend_info"]["package"].split("/")[-2] for r in rows} == {"tiny-early", "tiny-late"}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0 and "building" not in again.output and "exporting" not in again.output


@pytest.mark.slow
def test_compare_builds_its_packages_while_the_onnx_exports_run(tmp_path, trained_mid, learned_early):
    """`compare --backends onnxruntime,aoti`'s export stage over two fusions (real builds and gates): both packages
    are started before the first ONNX export, every ONNX export runs before the first .pt2 export takes its package,
    each package passes its gates where `export` puts it, and the next study skips every stage and builds nothing."""
    models = tmp_path / "models"
    checkpoints = {"mid": copy_run(trained_mid[0], models),
                   "early": copy_run(Path(learned_early["checkpoint"]), models)}
    said = []
    export_stages(Stages(tmp_path / "compare.json", said.append), "tiny", checkpoints, "cpu", ["onnxruntime", "aoti"],
                  [], False, said.append)
    started = [line for line in said if line.startswith("[compare] ") and line.endswith(" ...")]
    assert started == [f"[compare] export tiny-{f} {fmt} ..." for fmt in ("onnx", "pt2") for f in ("mid", "early")]
    assert re.fullmatch(r"\[compare\] building the mid, early \.pt2 package\(s\) side by side, [12] at a time, while "
                        r"the other exports run", said[0]), said[0]
    for checkpoint in checkpoints.values():
        record = json.loads((checkpoint.parent / "export.pt2.cpu.fp32.json").read_text())
        assert record["status"] == "ok" and record["pt2"]["path"] == str(checkpoint.parent / "model.cpu.fp32.pt2")
        assert record["parity"]["passed"] and record["accuracy"]["passed"]
        assert Path(record["pt2"]["path"]).stat().st_size > 2**20
    again = []
    export_stages(Stages(tmp_path / "compare.json", again.append), "tiny", checkpoints, "cpu", ["onnxruntime", "aoti"],
                  [], False, again.append)
    assert again == [f"[compare] export tiny-{f} {fmt}: done before, skipped" for fmt in ("onnx", "pt2")
                     for f in ("mid", "early")]
