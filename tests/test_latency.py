"""`fusionprof latency` through the CLI: records, table, unavailable and wrong backends, errors; finding a trained
run; `train --profile`."""

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import NO_CUDA_64, copy_run, stand_in_onnx

from fusionprof.backends import BACKENDS, backend_names
from fusionprof.backends.torch_eager import TorchEager
from fusionprof.checkpoint import checkpoint_hash, find_checkpoint
from fusionprof.cli import cli
from fusionprof.compare import summarize as compare_summary
from fusionprof.errors import UserError
from fusionprof.latency import SweepConfig, sweep
from fusionprof.latency_output import CSV_COLUMNS, table
from fusionprof.measure import Protocol
from fusionprof.models import fusion_names
from fusionprof.records import CPU_TIMING, PARITY_FAILED, PARTIAL_KIND, PARTIAL_SUFFIX, LatencyRecord, visit_spread
from fusionprof.report import find_records, write_report

QUICK = ["--min-seconds", "0.05", "--min-calls", "5", "--warmup-seconds", "0", "--warmup-calls", "1"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_latency_sweep_writes_self_describing_records(tmp_path):
    code, out = run_cli("latency", "--fusion", "early", "--backends", "torch,onnxruntime,tensorrt",
                        "--batch-sizes", "1,3", "--models", tmp_path / "none", "--out", tmp_path, "--quiet", *QUICK,
                        "--max-warmup-seconds", "30")
    assert code == 0, out
    assert f"{tmp_path / 'none' / 'tiny-early'}: no checkpoint, so an untrained tiny early (random init) is timed" \
        in out  # said, so that a mistyped --models does not pass for the trained model
    [path] = list(tmp_path.glob("*/latency-tiny-cpu-fp32-*.json"))
    record = json.loads(path.read_text())
    assert record["schema_version"] == 1 and record["kind"] == "latency"
    assert record["environment"]["host"] == path.parent.name and record["config"]["protocol"]["min_calls"] == 5
    assert record["config"]["protocol"]["max_warmup_seconds"] == 30
    yardstick = record["reference_matmul"]  # measured at the sweep's start and end; shares of the faster
    assert yardstick["gflops"] == max(yardstick["start"]["gflops"], yardstick["end"]["gflops"]) > 0
    assert yardstick["n"] == 2048 and yardstick["dtype"] == "fp32"
    ok = [r for r in record["rows"] if r["status"] == "ok"]
    assert {(r["fusion"], r["backend"], r["batch_size"]) for r in ok} == {
        ("early", b, n) for b in ("torch", "onnxruntime") for n in (1, 3)}  # (many fusions: test_report's sweeps)
    for r in ok:
        assert len(r["samples_ms"]) == r["n"] >= 5
        assert r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["max_ms"]
        if r["n"] < 20:  # halves of under 10 calls are not compared
            assert r["halves_p50_ms"] is r["drift"] is None and r["drift_warning"] is False
        else:  # the medians of the first and last n // 2 calls, in call order
            half = r["n"] // 2
            assert r["halves_p50_ms"] == [np.median(r["samples_ms"][:half]), np.median(r["samples_ms"][-half:])]
            assert r["drift"] == r["halves_p50_ms"][1] / r["halves_p50_ms"][0] - 1
        # the tiny preset's default: three interleaved visits, whose move between halves is by design, not flagged
        assert record["config"]["rounds"] == 3 and len(r["rounds_p50_ms"]) == 3 and r["drift_warning"] is False
        assert r["p99_ms"] is None and "p99 needs at least 100 samples" in r["p99_note"]  # n < 100: no p99
        assert r["throughput_samples_per_s"] == pytest.approx(r["batch_size"] / (r["mean_ms"] / 1e3))  # from the mean
        assert r["achieved_gflops"] == pytest.approx(r["flops_per_sample"] * r["throughput_samples_per_s"] / 1e9)
        assert r["share_of_matmul_yardstick"] == pytest.approx(r["achieved_gflops"] / yardstick["gflops"])
        assert r["above_yardstick"] == (r["share_of_matmul_yardstick"] > 1) and r["mfu"] is None  # no MFU on a CPU
        assert r["parity_passed"] and r["model"]["weights"].startswith("untrained")
        assert r["warmup_calls"] >= 3 and r["warmup_capped"] is False  # --warmup-calls 1 in each of 3 visits
        assert r["first_call_batch_size"] == 1 and r["load_seconds"] > 0 and r["timing"] == CPU_TIMING
        # what other processes took of the CPUs while it was timed (test_contention: beside a busy one)
        assert r["contention"]["seconds"] >= 0.05 and r["contention"]["other_processes_cores"] >= 0
    for fusion, backend in {(r["fusion"], r["backend"]) for r in ok}:  # one first call per fresh backend, timed once
        assert len({r["first_call_of_fresh_backend_ms"] for r in ok if (r["fusion"], r["backend"]) == (fusion, backend)
                    }) == 1
    [trt] = [r for r in record["rows"] if r["backend"] == "tensorrt" and r["fusion"] == "early"]
    assert trt["status"].startswith("unavailable: TensorRT runs on CUDA devices only")
    assert "unavailable: TensorRT" in out and "p50 ms" in out
    rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert len(rows) == len(record["rows"]) and list(rows[0]) == CSV_COLUMNS and float(rows[0]["p50_ms"]) > 0
    assert {r["parity_passed"] for r in rows if r["status"] == "ok"} == {"True"} and rows[0]["p99_ms"] == ""
    typed = LatencyRecord.from_dict(record, path)  # the same code reads what it wrote
    assert typed.to_dict() == record and LatencyRecord.from_dict(typed.to_dict()) == typed


H200_TINY = Path(__file__).parent.parent / "profiles/h200/latency-tiny-cuda-bf16-20261127T033202Z.json"


def test_device_resident_figures_stand_beside_the_copies_in_the_csv_table_and_report(tmp_path):
    """On CUDA every row carries device-resident timing (CUDA events, no copies) beside the copy-inclusive one, as the
    spec asks; it was in the JSON only. The CSV, the printed table and the report show its p50 and p99 beside theirs
    (a p99 from 100 samples up, as every p99). A CPU sweep's table has no such columns, its CSV empty cells."""
    from fusionprof.latency_output import table, write_record
    from fusionprof.records import DEVICE_TIMING, HOST_TIMING, LatencyRow, Timing

    def row(batch: int, calls: int, host_ms: float, resident_ms: float | None) -> LatencyRow:  # as row_of makes one
        def timing(low: float, clock: str) -> Timing:
            return Timing.of(np.linspace(low, low + 1, calls).tolist(), clock)  # p50 low + 0.5, p99 low + 0.99
        return LatencyRow("mid", "torch", "ok", batch, timing(host_ms, HOST_TIMING if resident_ms else CPU_TIMING),
                          timing(resident_ms, DEVICE_TIMING) if resident_ms else None, seq_len=24,
                          flops_per_sample=1e9, parity_passed=True)

    rows = [row(1, 101, 3.0, 1.0).to_dict(), row(8, 50, 7.0, 5.0).to_dict()]
    record = LatencyRecord.from_dict({**json.loads(H200_TINY.read_text()), "rows": rows})  # a real CUDA sweep's setup
    write_record(record, tmp_path / "h200" / "latency-tiny-cuda-bf16-1.json")
    csv_rows = list(csv.DictReader((tmp_path / "h200" / "latency-tiny-cuda-bf16-1.csv").open()))
    assert [(r["p50_ms"], r["device_resident_p50_ms"], r["p99_ms"], r["device_resident_p99_ms"]) for r in csv_rows] \
        == [("3.5", "1.5", "3.99", "1.99"), ("7.5", "5.5", "", "")]  # 50 samples: no p99 of either
    lines = table(record.rows)
    assert lines[0].split() == ["fusion", "backend", "bs", "p50", "ms", "p90", "ms", "p99", "ms", "dev", "p50", "dev",
                                "p99", "CV", "samples/s", "GFLOP/s"]
    assert lines[1].split()[3:8] == ["3.50", "3.90", "3.99", "1.50", "1.99"]
    assert lines[2].split()[3:8] == ["7.50", "7.90", "–", "5.50", "–"]
    assert lines[3].startswith("dev p50, dev p99: device-resident (CUDA events")
    # the committed H200 sweep, as it was written: each row's device-resident p50 in its line
    h200 = LatencyRecord.from_dict(json.loads(H200_TINY.read_text()), H200_TINY)
    for r, line in zip(h200.rows, table(h200.rows)[1:], strict=False):
        assert line.split()[6] == f"{r.device_resident.p50_ms:.2f}"

    report = write_report([tmp_path / "h200"], tmp_path / "report")
    md = Path(report["markdown"]).read_text()
    assert "| fusion | backend | batch | p50 ms | device-resident p50 ms | p99 ms | device-resident p99 ms |" in md
    assert "| mid | torch | 1 | 3.50 | 1.50 | 3.99 | 1.99 |" in md and "| mid | torch | 8 | 7.50 | 5.50 | – | – |" in md

    cpu = LatencyRecord("1", record.environment, {**record.config, "device": "cpu"}, {}, [row(1, 101, 3.0, None)])
    write_record(cpu, tmp_path / "cpu" / "latency-tiny-cpu-fp32-1.json")
    [cpu_row] = csv.DictReader((tmp_path / "cpu" / "latency-tiny-cpu-fp32-1.csv").open())
    assert (cpu_row["p99_ms"], cpu_row["device_resident_p50_ms"], cpu_row["device_resident_p99_ms"]) == ("3.99", "", "")
    assert "dev p50" not in table(cpu.rows)[0] and "device-resident" not in "\n".join(table(cpu.rows))
    cpu_md = Path(write_report([tmp_path / "cpu"], tmp_path / "cpu-report")["markdown"]).read_text()
    assert "device-resident p50 ms" not in cpu_md


class WrongLogits(TorchEager):
    """A backend whose logits are off: it must be timed, kept, and never ranked."""

    registered_name = "wrong-logits"
    label = "eager, every logit off by one"

    def run_on_device(self, images, input_ids, attention_mask):
        return super().run_on_device(images, input_ids, attention_mask) + 1.0


def test_a_backend_that_fails_parity_is_timed_kept_and_never_ranked(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS._members, WrongLogits.registered_name, WrongLogits)  # a fifth backend file
    assert "wrong-logits" in backend_names() and "wrong-logits" in SweepConfig().backends  # swept by default
    code, out = run_cli("latency", "--fusion", "early", "--backends", "torch,wrong-logits", "--batch-sizes", "1,2",
                        "--models", tmp_path / "none", "--out", tmp_path, "--quiet", *QUICK)
    assert code == 0, out
    [path] = list(tmp_path.glob("*/latency-*.json"))
    rows = {(r["backend"], r["batch_size"]): r for r in json.loads(path.read_text())["rows"]}
    for batch in (1, 2):
        wrong = rows[("wrong-logits", batch)]
        assert wrong["status"] == PARITY_FAILED and wrong["parity_passed"] is False
        assert len(wrong["samples_ms"]) == wrong["n"] >= 5  # timed and kept
        assert rows[("torch", batch)]["status"] == "ok"
    assert f"WRONG: {PARITY_FAILED}" in out
    csv_rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert {(r["backend"], r["status"], r["parity_passed"]) for r in csv_rows} == {
        ("torch", "ok", "True"), ("wrong-logits", PARITY_FAILED, "False")}
    # the report plots, fronts and compares only rows that passed; the failed backend is listed with its status
    from fusionprof.report import _latency_rows

    [machine_cells] = _latency_rows(find_records([tmp_path])).values()
    assert {c.row.backend for c in machine_cells} == {"torch"}
    code, out = run_cli("report", tmp_path, "--out", tmp_path / "report")
    assert code == 0, out
    assert f"| wrong-logits | {PARITY_FAILED} |" in (tmp_path / "report" / "report.md").read_text()
    # compare's closing "best p50" takes no failed row, even one faster than every ok row
    fastest_wrong = {**{k: rows[("torch", 1)][k] for k in ("fusion", "batch_size")}, "backend": "wrong-logits",
                     "status": PARITY_FAILED, "p50_ms": 0.001}
    ok_row = {k: rows[("torch", 1)][k] for k in ("fusion", "backend", "batch_size", "status", "p50_ms")}
    [_, line] = compare_summary({"early": {"test_accuracy": 0.5, "train_seconds": 1.0}}, [fastest_wrong, ok_row])
    assert "(torch)" in line and "wrong-logits" not in line


def fake_run(models_dir, run, preset, fusion, age=0.0):
    """A file with the two configs a checkpoint carries (enough for find_checkpoint), ``age`` seconds old."""
    path = models_dir / run / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save({"train_config": {"preset": preset}, "model_config": {"fusion": fusion}, "model": {}}, path)
    stamp = path.stat().st_mtime - age
    os.utime(path, (stamp, stamp))
    return path


def test_find_checkpoint_prefers_the_default_run_then_the_newest_named_one(tmp_path):
    assert find_checkpoint(tmp_path / "nowhere", "tiny", "late") is None
    older = fake_run(tmp_path, "first-try", "tiny", "late", age=100)
    newer = fake_run(tmp_path, "second-try", "tiny", "late", age=10)
    fake_run(tmp_path, "newest-but-mid", "tiny", "mid")
    fake_run(tmp_path, "newest-but-seed", "seed", "late")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert older.exists() and find_checkpoint(tmp_path, "tiny", "late") == newer
    default = fake_run(tmp_path, "tiny-late", "tiny", "late", age=1000)  # the default folder wins, even if older
    assert find_checkpoint(tmp_path, "tiny", "late") == default
    assert find_checkpoint(tmp_path, "tiny", "early") is None


def test_a_default_run_folder_holding_another_fusion_is_refused_not_timed_under_its_name(tmp_path):
    """models/tiny-late/checkpoint.pt that holds a mid model would be timed and recorded as late."""
    fake_run(tmp_path, "tiny-late", "tiny", "mid")
    with pytest.raises(UserError, match=r"tiny-late/checkpoint.pt: holds a tiny mid model, not tiny late"):
        find_checkpoint(tmp_path, "tiny", "late")
    code, out = run_cli("latency", "--fusion", "late", "--backends", "torch", "--models", tmp_path, "--out", tmp_path)
    assert code == 1 and "holds a tiny mid model, not tiny late" in out.strip().splitlines()[-1]


@pytest.mark.slow
def test_latency_uses_trained_checkpoints_under_any_run_name(tmp_path, small_data):
    assert run_cli("train", "--fusion", "late", "--data", small_data, "--epochs", "1", "--limit-train", "8",
                   "--run-name", "late-try", "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet")[0] == 0
    code, out = run_cli("latency", "--fusion", "late", "--backends", "torch", "--batch-sizes", "2",
                        "--models", tmp_path / "m", "--out", tmp_path / "lat", "--quiet", *QUICK)
    assert code == 0, out
    [path] = list((tmp_path / "lat").glob("*/latency-*.json"))
    model = json.loads(path.read_text())["rows"][0]["model"]
    checkpoint = tmp_path / "m" / "late-try" / "checkpoint.pt"
    assert model == {"weights": "trained", "checkpoint": str(checkpoint),
                     "checkpoint_hash": checkpoint_hash(checkpoint)}  # which model the rows timed


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda:64"], NO_CUDA_64),
    (["--backends", "torch,tvm"], f"unknown backend 'tvm'; choose from {', '.join(backend_names())}"),
    (["--fusion", "mid,fancy"], f"unknown fusion 'fancy'; choose from all, {', '.join(fusion_names())}"),
    (["--batch-sizes", "1,x"], "'1,x' is not a comma-separated list of int"),
    (["--batch-sizes", "0,4"], "--batch-sizes must be whole numbers of at least 1"),
    (["--min-seconds", "-1"], "Invalid value for '--min-seconds': must be at least 0, got -1.0"),
    (["--warmup-seconds", "nan"], "Invalid value for '--warmup-seconds': must be a finite number, got nan"),
    (["--fusion", "early", "--backends", "torch", "--seq-len", "1000"],
     "--seq-len 1000: the tiny text encoder reads at most 512 tokens"),
    # refused before the export the backend loads is made (a pt2 or TensorRT build takes minutes)
    (["--fusion", "early", "--backends", "onnxruntime", "--seq-len", "600"],
     "--seq-len 600: the tiny text encoder reads at most 512 tokens"),
    # asked only for backends that cannot run here: an error naming each reason, not a record of nothing
    (["--backends", "tensorrt,torch-cudagraphs"], "nothing to time here: tensorrt: TensorRT runs on CUDA devices "
     "only (TensorRT needs a CUDA GPU and the tensorrt package: pip install \"fusionprof[trt]\" on a CUDA machine); "
     "torch-cudagraphs: CUDA graphs need a CUDA device"),
    (["--backends", "torch", "--precision", "int8"], "nothing to time here: torch: torch runs fp32 or bf16 on cpu, "
     "not int8"),
    # a value given twice would be a cell timed twice, two rows of it: refused, naming it
    (["--batch-sizes", "1,4,1"], "--batch-sizes 1,4,1: 1 is given twice"),
    (["--backends", "torch,onnxruntime,torch"], "--backends torch,onnxruntime,torch: torch is given twice"),
    (["--fusion", "early,mid,mid"], "--fusion early,mid,mid: mid is given twice"),
])
def test_latency_errors_are_one_line(args, message, tmp_path):
    code, out = run_cli("latency", *QUICK, *args, "--out", tmp_path, "--quiet")  # args after QUICK: they stand
    assert code != 0 and message in out.strip().splitlines()[-1] and "Traceback" not in out
    assert not list(tmp_path.rglob("latency-*"))  # no record, not even an unfinished one
    assert not list(tmp_path.rglob("*.onnx"))  # nor any export: every option is checked before it


@pytest.mark.slow
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


@pytest.mark.slow
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


class CannotLoad(TorchEager):
    """A backend that is available but cannot load what it was given (a TensorRT engine that was never built)."""

    registered_name = "cannot-load"
    label = "refuses its artifact"

    def __init__(self, artifacts, device, precision):
        raise UserError("no engine for this model: run `fusionprof export --fmt trt` first")


def test_a_backend_that_cannot_load_is_a_failed_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS._members, "cannot-load", CannotLoad)
    code, out = run_cli("latency", "--fusion", "early", "--backends", "cannot-load,torch", "--batch-sizes", "1,2",
                        "--models", tmp_path / "none", "--out", tmp_path, "--quiet", *QUICK)
    assert code == 0, out
    [path] = tmp_path.glob("*/latency-*.json")
    rows = json.loads(path.read_text())["rows"]
    assert [(r["backend"], r["status"]) for r in rows] == [
        ("cannot-load", "failed: no engine for this model: run `fusionprof export --fmt trt` first"),
        ("torch", "ok"), ("torch", "ok")]


class Crashes(TorchEager):
    """A runtime that dies mid-sweep with an error of its own (as inductor or a driver can), not a UserError."""

    registered_name = "crashes"
    label = "raises RuntimeError"

    def run_on_device(self, images, input_ids, attention_mask):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_a_sweep_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS._members, "crashes", Crashes)
    cfg = SweepConfig(fusions=["early", "late"], backends=["torch", "crashes"], batch_sizes=[1, 2],
                      models_dir=str(tmp_path / "none"), profiles_dir=str(tmp_path), protocol=Protocol(
                          warmup_seconds=0, warmup_calls=1, min_seconds=0.05, min_calls=5))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        sweep(cfg, progress=False, log=lambda *_: None)
    [partial] = tmp_path.glob(f"*/latency-tiny-cpu-fp32-*{PARTIAL_SUFFIX}")
    kept = json.loads(partial.read_text())
    assert kept["kind"] == PARTIAL_KIND and "unfinished" in kept["note"]
    assert [(r["fusion"], r["backend"], r["batch_size"], r["status"]) for r in kept["rows"]] == [
        ("early", "torch", 1, "ok"), ("early", "torch", 2, "ok")]  # measured before the crash, with their samples
    assert all(len(r["samples_ms"]) == r["n"] >= 5 and r["share_of_matmul_yardstick"] > 0 for r in kept["rows"])
    found = find_records([tmp_path])  # the report plots finished sweeps only, and names the unfinished one
    assert not found.latency and found.unfinished == [str(partial)]
    report = write_report([tmp_path], tmp_path / "report")
    assert f"1 latency sweep(s) cut short, their rows so far in `{partial}`" in Path(report["markdown"]).read_text()

    # other settings resume nothing: a new sweep, which leaves its record and no partial file of its own
    said = []
    other = sweep(SweepConfig(**{**cfg.__dict__, "backends": ["torch"], "fusions": ["early"]}), progress=False,
                  log=said.append, resume=True)
    assert any(line.startswith("nothing to resume") for line in said) and "resumed" not in other.config
    assert len(find_records([tmp_path]).latency) == 1 and list(tmp_path.glob(f"*/*{PARTIAL_SUFFIX}")) == [partial]

    # the runtime fixed, --resume keeps the rows measured before and measures only what the crash left
    monkeypatch.setattr(Crashes, "run_on_device", TorchEager.run_on_device)
    said.clear()
    record = sweep(cfg, progress=False, log=said.append, resume=True)
    assert said[1] == f"resuming {partial}: 2 rows kept, 3 (fusion, backend) pairs to go"
    assert [(r.fusion, r.backend, r.batch_size) for r in record.rows] == [
        (f, b, n) for f in ("early", "late") for b in ("torch", "crashes") for n in (1, 2)]
    assert [r.to_dict()["samples_ms"] for r in record.rows[:2]] == [r["samples_ms"] for r in kept["rows"]]
    assert record.config["resumed"] == {"partial": str(partial), "rows_kept": 2}
    assert not partial.exists() and len(find_records([tmp_path]).latency) == 2
    code, out = run_cli("latency", "--fusion", "early", "--backends", "torch", "--batch-sizes", "1", "--resume",
                        "--models", tmp_path / "none", "--out", tmp_path / "cli", "--quiet", *QUICK)
    assert code == 0 and "nothing to resume under" in out, out


class FailsAtBatch2(TorchEager):
    """A backend that runs batch 1 and fails at batch 2 (an engine profile too small, memory, a capture)."""

    registered_name = "fails-at-2"
    label = "fails at batch 2"
    error = UserError("batch 2 is outside this engine's optimization profile")

    def run_on_device(self, images, input_ids, attention_mask):
        if images.shape[0] == 2:
            raise self.error
        return super().run_on_device(images, input_ids, attention_mask)


@pytest.mark.parametrize("error,status", [
    (UserError("batch 2 is outside this engine's optimization profile"),
     "failed: batch 2 is outside this engine's optimization profile"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
     "failed: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)"),
    # the CPU allocator's failure is a plain RuntimeError (a batch too large for this machine's memory)
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory)"),
     "failed: out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
     "memory: you tried to allocate 26214400000 bytes. Error code 12 (Cannot allocate memory))")])
@pytest.mark.parametrize("rounds", [1, 2])
def test_a_backend_failing_at_one_batch_keeps_the_batches_it_ran(error, status, rounds, tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS._members, FailsAtBatch2.registered_name, FailsAtBatch2)
    monkeypatch.setattr(FailsAtBatch2, "error", error)
    monkeypatch.setattr("fusionprof.latency.parity", lambda *a, **k: {"passed": True})  # parity runs batch 3 and 8
    cfg = SweepConfig(fusions=["early"], backends=["fails-at-2", "torch"], batch_sizes=[1, 2, 4],
                      models_dir=str(tmp_path / "none"), profiles_dir=str(tmp_path), protocol=Protocol(
                          warmup_seconds=0, warmup_calls=1, min_seconds=0.02, min_calls=3), rounds=rounds)
    record = sweep(cfg, progress=False, log=lambda *_: None)
    # batch 1's timing stays, the failure says where (and in an interleaved sweep, in which round); the other
    # backend's cells are all timed, every round
    assert [(r.backend, r.batch_size, r.status) for r in record.rows] == [
        ("fails-at-2", 1, "ok"), ("fails-at-2", 2, status + (" (round 1)" if rounds > 1 else "")),
        ("torch", 1, "ok"), ("torch", 2, "ok"), ("torch", 4, "ok")]
    assert record.rows[1].host is None
    if rounds == 1:
        assert record.rows[0].host.n >= 3 and all(r.host.rounds_p50_ms is None for r in record.rows if r.host)
    else:  # the failing backend was timed at batch 1 in round 1 only (2 calls of 3): its row says one visit
        assert record.rows[0].host.n >= 2 and len(record.rows[0].host.rounds_p50_ms) == 1
        assert all(len(r.host.rounds_p50_ms) == 2 and r.host.n >= 4 for r in record.rows[2:])


def test_onnxruntime_and_openvino_failures_are_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Their runtimes' own errors (onnxruntime's ``Fail``, no RuntimeError; OpenVINO's RuntimeError) once ended the
    sweep with a traceback and no record. Now memory running out is an out-of-memory row as PyTorch's is, any other
    error a failed row naming the runtime and the shape, and the sweep goes on: the other cells are all there."""
    from fusionprof.atomic import write_json

    for fusion, fails in (("early", "memory"), ("late", "reshape")):  # as an earlier sweep of these weights left them
        onnx = stand_in_onnx(tmp_path / socket.gethostname() / "onnx" / f"tiny-{fusion}" / "model.onnx", fails)
        write_json(onnx.with_name("model.onnx.made-from.json"), {"weights": "untrained, seed 0"})
    monkeypatch.setattr("fusionprof.latency.parity", lambda *a, **k: {"passed": True})  # the stand-ins' logits are not
    code, out = run_cli("latency", "--fusion", "early,late", "--backends", "onnxruntime,openvino,torch",
                        "--batch-sizes", "1,64", "--rounds", "1", "--models", tmp_path / "none", "--out", tmp_path,
                        "--quiet", *QUICK)
    assert code == 0 and "Traceback" not in out, out
    [path] = tmp_path.glob("*/latency-*.json")
    rows = {(r["fusion"], r["backend"], r["batch_size"]): r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == {(f, b, n) for f in ("early", "late") for b in ("onnxruntime", "openvino", "torch")
                         for n in (1, 64)}
    failed = {
        ("early", "onnxruntime", 64): "failed: out of memory (onnxruntime at batch 64, seq 24: Failed to allocate "
                                      "memory for requested buffer of size 1125899906842624)",
        ("early", "openvino", 64): "failed: out of memory (openvino at batch 64, seq 24: Failed to allocate "
                                   "1125899906842624 bytes of memory)",
        ("late", "onnxruntime", 64): "failed: onnxruntime at batch 64, seq 24: [ONNXRuntimeError] : 1 : FAIL : "
                                     "Non-zero status code returned while running Reshape node. Name:'' Status "
                                     "Message: input_shape_size == requested_shape_size was false. The input tensor "
                                     "cannot be reshaped to the requested shape. Input shape:{64}, requested "
                                     "shape:{1}"}
    assert {cell: rows[cell]["status"] for cell in failed} == failed
    assert all(r["status"] == "ok" and r["n"] >= 5 for cell, r in rows.items() if cell not in failed)
    csv_rows = list(csv.DictReader(path.with_suffix(".csv").open()))
    assert {(r["fusion"], r["backend"], int(r["batch_size"])): r["status"] for r in csv_rows} == {
        cell: r["status"] for cell, r in rows.items()}
    assert "  failed: out of memory (onnxruntime at batch 64, seq 24: Failed to allocate memory" in out


def test_a_backend_that_cannot_be_checked_at_the_largest_batch_is_timed_at_the_others(tmp_path):
    """Parity runs at the largest batch before any cell is timed; memory running out there (the backend's, as here,
    or the eager reference's) made the whole backend one failed row, and the batches it runs were lost with it. Now
    that batch's row says why and the others are checked without it and timed, in every round."""
    from fusionprof.atomic import write_json

    onnx = stand_in_onnx(tmp_path / socket.gethostname() / "onnx" / "tiny-early" / "model.onnx", "memory")
    write_json(onnx.with_name("model.onnx.made-from.json"), {"weights": "untrained, seed 0"})
    code, out = run_cli("latency", "--fusion", "early", "--backends", "onnxruntime,openvino,torch", "--batch-sizes",
                        "1,64", "--rounds", "2", "--models", tmp_path / "none", "--out", tmp_path, "--quiet", *QUICK)
    assert code == 0 and "Traceback" not in out, out
    [path] = tmp_path.glob("*/latency-*.json")
    rows = [(r["backend"], r["batch_size"], r["status"], len(r.get("rounds_p50_ms") or []))
            for r in json.loads(path.read_text())["rows"]]
    assert rows == [  # the stand-in's logits are not the model's: timed, kept, marked (at batch 1, 3 and 8)
        ("onnxruntime", 1, PARITY_FAILED, 2),
        ("onnxruntime", 64, "failed: checking parity: out of memory (onnxruntime at batch 64, seq 24: Failed to "
                            "allocate memory for requested buffer of size 1125899906842624)", 0),
        ("openvino", 1, PARITY_FAILED, 2),
        ("openvino", 64, "failed: checking parity: out of memory (openvino at batch 64, seq 24: Failed to allocate "
                         "1125899906842624 bytes of memory)", 0),
        ("torch", 1, "ok", 2), ("torch", 64, "ok", 2)]


@pytest.mark.parametrize("message", [
    # onnxruntime 1.31's arena, as it said it at batch 64 above, and as 1.19 said it on CUDA (the status on a line of
    # its own); OpenVINO's CPU plugin; std::bad_alloc as libstdc++ and MSVC name it
    "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ConstantOfShape node. Name:'' Status "
    "Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate memory for requested buffer of size "
    "1125899906842624\n",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running Conv node. "
    "Name:'/fc1/Conv' Status Message: \n/onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:376 void* "
    "onnxruntime::BFCArena::"
    "AllocateRawInternal(size_t, bool, onnxruntime::Stream*, bool, onnxruntime::WaitNotificationFn) Failed to "
    "allocate memory for requested buffer of size 4585490524328388608",
    "Exception from src/inference/src/cpp/infer_request.cpp:224:\n"
    "Exception from src/plugins/intel_cpu/src/node.cpp:794:\n"
    "[CPU] Broadcast node with name 'zeros' Check 'ptr' failed at src/plugins/intel_cpu/src/cpu_memory.cpp:257:\n"
    "Failed to allocate 1125899906842624 bytes of memory\n\n\n",
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : std::bad_alloc",
    "bad allocation"])
def test_out_of_memory_knows_the_runtimes_words(message):
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

    from fusionprof.runtime import allocator_words, out_of_memory

    for error in (Fail(message), RuntimeException(message), RuntimeError(message)):
        assert out_of_memory(error)
        words = allocator_words(error)
        assert "\n" not in words and words.startswith(("Failed to allocate", "std::bad_alloc", "bad allocation"))
    assert out_of_memory(MemoryError()) and out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    refused = "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: images"
    assert not out_of_memory(InvalidArgument(refused)) and allocator_words(InvalidArgument(refused)) is None
    assert not out_of_memory(RuntimeError("a bug of ours"))


def test_an_error_that_is_no_failure_to_report_is_raised_not_hidden_in_a_row(tmp_path, monkeypatch):
    monkeypatch.setitem(BACKENDS._members, FailsAtBatch2.registered_name, FailsAtBatch2)
    monkeypatch.setattr(FailsAtBatch2, "error", RuntimeError("a bug of ours"))
    monkeypatch.setattr("fusionprof.latency.parity", lambda *a, **k: {"passed": True})
    cfg = SweepConfig(fusions=["early"], backends=["fails-at-2"], batch_sizes=[1, 2], models_dir=str(tmp_path / "none"),
                      profiles_dir=str(tmp_path), protocol=Protocol(warmup_seconds=0, warmup_calls=1, min_seconds=0.02,
                                                                    min_calls=3), rounds=1)
    with pytest.raises(RuntimeError, match="a bug of ours"):
        sweep(cfg, progress=False, log=lambda *_: None)


def test_a_sweeps_own_export_is_made_again_for_other_weights(tmp_path, trained_mid, untrained_onnx):
    """An untrained model's ONNX, left by an earlier sweep, is not what a trained checkpoint's sweep times."""
    import shutil

    from fusionprof.atomic import write_json
    from fusionprof.backends import create_backend
    from fusionprof.export import parity
    from fusionprof.latency import load_artifacts

    models = copy_run(trained_mid[0], tmp_path / "models").parent  # the run alone: no verified export
    left = tmp_path / "work" / "onnx" / "tiny-mid" / "model.onnx"  # as an untrained sweep left it, with its note
    left.parent.mkdir(parents=True)
    shutil.copy(untrained_onnx["mid"].onnx, left)
    write_json(left.with_name("model.onnx.made-from.json"), {"weights": "untrained, seed 0"})
    said = []
    cfg = SweepConfig(fusions=["mid"], backends=["onnxruntime"], models_dir=str(tmp_path / "models"))
    trained, source = load_artifacts(cfg, "mid", tmp_path / "work", said.append)
    assert trained.onnx == left and source["weights"] == "trained"
    assert source["checkpoint_hash"] == checkpoint_hash(models / "checkpoint.pt")  # which model the rows timed
    assert said[0] == f"{left} was made from another model, for other batch sizes or by an older sweep: exporting it " \
                      "again"
    backend = create_backend("onnxruntime", trained, torch.device("cpu"))
    assert parity(trained.model, backend, "fp32")["passed"]  # before: the untrained graph, and parity failed
    said.clear()
    assert load_artifacts(cfg, "mid", tmp_path / "work", said.append)[0].onnx == left and not said  # kept now


def test_an_interleaved_sweep_visits_every_cell_each_round(tmp_path):
    """--rounds 3: each cell timed in three visits, the order reversed every other round, the sampling minimums
    split over them (7 calls and 1/3 of the time each, a whole warm-up each visit); its row keeps every sample in
    call order and each visit's p50 and calls."""
    from fusionprof.latency import round_protocol, visit_order

    assert list(visit_order(["a", "b"], 3)) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert list(visit_order(["a", "b"], 3, first_round=1)) == [(1, "b"), (1, "a"), (2, "a"), (2, "b")]
    per_visit = round_protocol(Protocol(), 3)
    assert (per_visit.min_calls, per_visit.min_seconds, per_visit.warmup_calls, per_visit.warmup_seconds) == \
        (7, 2 / 3, 5, 0.5)

    code, out = run_cli("latency", "--fusion", "late,early", "--backends", "onnxruntime,torch", "--batch-sizes",
                        "1,2", "--rounds", "3", "--min-calls", "12", "--min-seconds", "0.03", "--warmup-seconds", "0",
                        "--warmup-calls", "1", "--models", tmp_path / "none", "--out", tmp_path, "--quiet")
    assert code == 0, out
    [path] = tmp_path.glob("*/latency-*.json")
    record = json.loads(path.read_text())
    assert record["config"]["rounds"] == 3 and not list(tmp_path.glob("*/*.partial.json"))
    assert "each cell timed in 3 visits, one a round through the whole sweep (--rounds)" in out
    _, median, widest = visit_spread(LatencyRecord.from_dict(record).rows)
    assert (f"(rounds_p50_ms): {median:.0%} apart at the median cell, most at {widest.fusion}/{widest.backend} batch "
            f"{widest.batch_size} ({min(widest.host.rounds_p50_ms):.2f} to ") in out
    assert [(r["fusion"], r["backend"], r["batch_size"]) for r in record["rows"]] == [
        (f, b, n) for f in ("late", "early") for b in ("onnxruntime", "torch") for n in (1, 2)]  # as one round's
    for r in record["rows"]:
        assert r["status"] == "ok" and r["n"] >= 12 and len(r["rounds_p50_ms"]) == 3
        assert min(r["rounds_p50_ms"]) >= r["min_ms"] and max(r["rounds_p50_ms"]) <= r["max_ms"]
        assert sum(r["rounds_calls"]) == r["n"] and min(r["rounds_calls"]) >= 4
        assert r["contention"]["seconds"] > 0
    code, out = run_cli("latency", "--rounds", "0", "--out", tmp_path, "--quiet")
    assert code == 2 and "--rounds" in out and "Traceback" not in out


def test_a_killed_interleaved_sweep_goes_on_from_its_last_round(tmp_path, monkeypatch):
    """Stopped in its third round, an interleaved sweep has left the rows of two rounds; resumed, it keeps their
    visits as they were (every sample, peak, load) and times the third. The tiny preset's default is three rounds."""
    import fusionprof.latency as latency
    from fusionprof.latency import default_rounds

    assert default_rounds("tiny") == 3 and default_rounds("seed") == 1
    cfg = SweepConfig(fusions=["early", "late"], backends=["torch", "onnxruntime"], batch_sizes=[1, 2],
                      models_dir=str(tmp_path / "none"), profiles_dir=str(tmp_path), rounds=3, protocol=Protocol(
                          warmup_seconds=0.03, warmup_calls=1, min_seconds=0.03, min_calls=6))
    visit, protocols = latency.visit_cell, []

    def killed_in_round_3(prepared, batch_size, protocol):
        if len(protocols) == 2 * 8 + 3:  # two rounds of 8 cells, then 3 visits of the third
            raise KeyboardInterrupt
        protocols.append(protocol.warmup_seconds)
        return visit(prepared, batch_size, protocol)

    monkeypatch.setattr(latency, "visit_cell", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        sweep(cfg, progress=False, log=lambda *_: None)
    assert protocols == [0.03] * 19  # each visit warmed up in full
    [partial] = tmp_path.glob("*/latency-*.partial.json")
    left = json.loads(partial.read_text())["rows"]
    assert len(left) == 8 and all(len(r["rounds_p50_ms"]) == 2 for r in left)  # the host timing's, in the row

    protocols.clear()
    said = []
    record = sweep(cfg, progress=False, log=said.append, resume=True)
    assert f"resuming {partial}: 8 rows kept, 4 (fusion, backend) pairs to go" in said
    assert "the interleaved sweep goes on at round 3 of 3" in said
    assert protocols == [0.03] * 8 and not partial.exists()
    assert record.config["resumed"]["rows_kept"] == 8
    for before, row in zip(left, record.rows, strict=True):
        assert (row.fusion, row.backend, row.batch_size) == (before["fusion"], before["backend"], before["batch_size"])
        kept = sum(before["rounds_calls"])
        assert row.host.samples_ms[:kept] == before["samples_ms"]
        assert row.host.rounds_p50_ms[:2] == before["rounds_p50_ms"] and len(row.host.rounds_p50_ms) == 3
        assert row.host.n == kept + row.host.rounds_calls[2]
        assert row.host.warmup_calls > before["warmup_calls"] and not row.host.warmup_capped  # its visits' warm-ups
        assert row.contention["seconds"] > before["contention"]["seconds"]


def test_each_row_says_what_its_warm_up_took_and_a_runaway_one_is_capped(tmp_path):
    """A warm-up that would run on (here 10⁶ calls asked for; in life a backend recompiling every call) ends at the
    warm-up cap; each row records its warm-up calls and seconds over its visits, flagged where the cap ended it."""
    cfg = SweepConfig(fusions=["early"], backends=["torch"], batch_sizes=[1, 2], models_dir=str(tmp_path / "none"),
                      profiles_dir=str(tmp_path), rounds=2, protocol=Protocol(
                          warmup_seconds=0, warmup_calls=10**6, max_warmup_seconds=0.1, min_seconds=0, min_calls=4))
    record = sweep(cfg, progress=False, log=lambda *_: None)
    for row in record.rows:
        t = row.host
        assert t.warmup_capped and 2 <= t.warmup_calls < 10**5 and 0.2 <= t.warmup_seconds < 5  # two visits' worth
        assert t.n == 4 and sum(t.rounds_calls) == 4  # what is sampled is the protocol's, whatever the warm-up did
    written = json.loads(Path(record.path).read_text())["rows"][0]
    assert written["warmup_capped"] is True and written["warmup_calls"] == record.rows[0].host.warmup_calls
    assert " w" in table(record.rows)[1] and any(line.startswith("w the warm-up cap") for line in table(record.rows))
    # the normal case: warm-up minimums met, nothing capped, the same calls as asked for
    cfg.protocol, cfg.rounds = Protocol(warmup_seconds=0, warmup_calls=3, min_seconds=0, min_calls=4), 1
    for row in sweep(cfg, progress=False, log=lambda *_: None).rows:
        assert (row.host.warmup_calls, row.host.warmup_capped) == (3, False) and row.host.n == 4


def test_traces_are_taken_on_the_threads_the_sweep_was_timed_on(tmp_path, monkeypatch):
    """`latency --threads 1 --trace`: the traces come from a separate run, but of the model as it was timed, on the
    sweep's threads (an operator's time on 1 thread and on 2 differs), and the caller's threads are given back."""
    import fusionprof.latency as latency

    profiled, traced = latency.run_profiled, []

    def watched(step, out, device):
        traced.append(torch.get_num_threads())
        return profiled(step, out, device)
    monkeypatch.setattr(latency, "run_profiled", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = SweepConfig(fusions=["early"], backends=["torch"], batch_sizes=[1], threads=1,
                          models_dir=str(tmp_path / "none"), profiles_dir=str(tmp_path))
        traces = latency.trace_inference(cfg, tmp_path / "work")
        assert traced == [1] and torch.get_num_threads() == 2
        assert list(traces.glob("latency-tiny-early-bs1-cpu-fp32/*.pt.trace.json"))
    finally:
        torch.set_num_threads(before)


def test_a_trace_the_eager_model_cannot_take_is_refused_before_the_sweep(tmp_path):
    """--trace traces the eager torch backend, which has no int8: refused in one line before minutes of sweeping,
    not after the sweep's record is written."""
    code, out = run_cli("latency", "--fusion", "early", "--backends", "onnxruntime", "--batch-sizes", "1",
                        "--precision", "int8", "--trace", "--models", tmp_path / "none", "--out", tmp_path, "--quiet",
                        *QUICK)
    assert code != 0 and "--trace" in out and "int8" in out and "Traceback" not in out
    assert not list(tmp_path.glob("*/latency-*.json"))  # nothing swept


def test_a_sweep_on_other_threads_is_not_resumed(tmp_path):
    from fusionprof.env import fingerprint
    from fusionprof.latency import find_partial, save_partial

    env, config = fingerprint(), {"fusions": ["mid"], "backends": ["torch"]}
    save_partial(tmp_path / f"latency-tiny-cpu-fp32-1{PARTIAL_SUFFIX}", LatencyRecord("1", env, config, {}, []))
    assert find_partial(tmp_path, config, env) is not None
    assert find_partial(tmp_path, config, {**env, "torch_threads": env["torch_threads"] + 1}) is None


def test_an_empty_fusion_list_names_its_option(tmp_path):
    code, out = run_cli("latency", "--fusion", ",", "--models", tmp_path, "--out", tmp_path)
    assert code == 2 and out.strip().splitlines()[-1] == "Error: Invalid value for '--fusion': empty list"
