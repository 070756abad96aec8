"""`fusionprof report` merges records from several machines; `fusionprof compare` runs and resumes the study."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fusionprof.checkpoint import checkpoint_hash
from fusionprof.cli import cli
from fusionprof.env import machine_name
from fusionprof.models import fusion_names
from fusionprof.records import LatencyRecord, LatencyRow, model_accuracy
from fusionprof.report import Records, Sweep, build_seconds, pareto_front, row_accuracy, write_report

QUICK = ["--min-seconds", "0.05", "--min-calls", "5"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def two_machines(tmp_path_factory):
    """A real latency sweep, and the same file as if measured on a second, twice-as-slow machine (eager torch only:
    what is merged is the same for every backend, and an ONNX backend would first export each model)."""
    root = tmp_path_factory.mktemp("results")
    code, out = run_cli("latency", "--fusion", "early,late", "--backends", "torch", "--batch-sizes", "1,4",
                        "--models", root / "none", "--out", root / "here", "--quiet", *QUICK,
                        "--warmup-seconds", "0", "--warmup-calls", "1")  # what is timed is not what is checked here
    assert code == 0, out
    [path] = list((root / "here").glob("*/latency-*.json"))
    record = json.loads(path.read_text())
    record["environment"] = {**record["environment"], "host": "gpu-box", "cpu_model": "Other CPU",
                             "cpu_isa": {"avx2": True}}
    for row in record["rows"]:
        if row["status"] == "ok":
            for key in ("p50_ms", "p90_ms", "mean_ms"):
                row[key] *= 2
            row["samples_ms"] = [2 * s for s in row["samples_ms"]]
    (root / "there").mkdir()
    (root / "there" / path.name).write_text(json.dumps(record))
    return root


def test_two_machines_merge_into_one_report(two_machines, tmp_path):
    code, out = run_cli("report", two_machines / "here", two_machines / "there", "--out", tmp_path)
    assert code == 0, out
    assert "2 records from 2 machine(s)" in out
    md = (tmp_path / "report.md").read_text()
    here = json.loads(next((two_machines / "here").glob("*/latency-*.json")).read_text())["environment"]
    first = machine_name(here)  # host, CPU model and ISA tier
    assert f"p50 ms (× fastest): {first}" in md and "p50 ms (× fastest): gpu-box (Other CPU, AVX2)" in md
    header = next(line for line in md.splitlines() if line.startswith("| preset | precision | device |"))
    there = [c.strip() for c in header.split("|")].index("p50 ms (× fastest): gpu-box (Other CPU, AVX2)")
    cells = [[c.strip() for c in line.split("|")] for line in md.splitlines() if line.startswith("| tiny | fp32 |")]
    assert len(cells) == 2 * 2 and all(c[3] == "cpu" and c[there].endswith("(2.00×)") for c in cells)  # fusions × batch
    pngs = {p.name for p in (tmp_path / "report").glob("*.png")}  # one sweep per plot: each named after its sweep
    stamp = json.loads(next((two_machines / "there").glob("*.json")).read_text())["created"].lower()
    there = {f"{metric}-gpu-box-other-cpu-avx2-tiny-cpu-fp32-{stamp}.png" for metric in ("latency", "throughput")}
    assert there <= pngs and len(pngs) == 4
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and "gpu-box (Other CPU, AVX2)" in html and f"report/{min(there)}" in html
    assert "No training records yet: run `fusionprof train" in md  # empty sections say what to run


def test_across_machines_shows_every_cell_two_machines_measured_and_keeps_devices_apart():
    """A cell the first machine never ran (openvino bf16 on an AVX512 EPYC and an AMX Xeon) is still compared; a
    GPU sweep and a CPU sweep of one (fusion, backend, batch) are two cells, not one machine against the other."""
    from fusionprof.records import CPU_TIMING, Timing
    from fusionprof.report import cross_machine_section

    def sweep(cpu, device, precision, backend, p50):
        env = {"host": "vm", "cpu_model": cpu}
        row = LatencyRow("mid", backend, "ok", 1, host=Timing.of([p50] * 10, CPU_TIMING))
        return LatencyRecord("t", env, {"preset": "tiny", "precision": precision, "device": device}, {}, [row])
    records = Records(latency=[sweep("Old CPU", "cpu", "fp32", "torch", 4.0),
                               sweep("EPYC", "cpu", "bf16", "openvino", 3.0),
                               sweep("Xeon", "cpu", "bf16", "openvino", 1.5),
                               sweep("Xeon", "cuda:0", "fp32", "torch", 1.0)])
    [_, (_, header, rows), _] = cross_machine_section(records)
    assert header[:6] == ["preset", "precision", "device", "fusion", "backend", "batch"]
    assert rows == [["tiny", "bf16", "cpu", "mid", "openvino", 1, "–", "3.00 (2.00×)", "1.50 (1.00×)"]]


def test_a_report_over_nothing_says_what_to_run(tmp_path):
    (tmp_path / "empty").mkdir()
    code, out = run_cli("report", tmp_path / "empty", "--out", tmp_path)
    assert code == 0 and "0 records from 0 machine(s)" in out
    assert "No records found: run `fusionprof compare`" in (tmp_path / "report.md").read_text()


def test_a_named_file_that_is_no_record_is_a_one_line_error(tmp_path):
    """A JSON file named on the command line that is no record was skipped without a word: '0 records', exit 0."""
    (tmp_path / "results.json").write_text(json.dumps([{"p50_ms": 3.1}]))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "tokenizer_config.json").write_text("{}")  # inside a folder: some other JSON, skipped
    code, out = run_cli("report", tmp_path / "results.json", "--out", tmp_path / "r")
    assert code == 1 and "results.json: not a fusionprof record (no 'kind' of export, latency, load, train)" in out
    assert len(out.strip().splitlines()) == 1
    code, out = run_cli("report", tmp_path / "folder", "--out", tmp_path / "r")
    assert code == 0 and "0 records" in out, out


def test_unknown_schema_version_is_a_one_line_error(two_machines, tmp_path):
    path = next((two_machines / "there").glob("*.json"))
    record = json.loads(path.read_text())
    record["schema_version"] = 99
    (tmp_path / "future.json").write_text(json.dumps(record))
    code, out = run_cli("report", tmp_path / "future.json", "--out", tmp_path)
    assert code == 1 and "future.json: schema version 99; this fusionprof reads version 1" in out
    assert len(out.strip().splitlines()) == 1


def test_the_precision_table_compares_the_widest_sweep_not_the_newest():
    """The AVX512-BF16 EPYC's seed fp32 sweeps: the study's (3 backends, batch 1 and 8, 2026-12-02) and a later
    interleaved one of two backends at batch 1 (2026-12-03), both of every fusion. The precision table sets the
    study's beside bf16 and int8: the later one timed fewer cells."""
    from pathlib import Path

    from fusionprof.report import _study_sweeps, find_records

    rec = find_records([Path(__file__).parent.parent / "profiles" / "vm"])
    [seed] = [by for (machine, preset, device, _, _), by in _study_sweeps(rec).items()
              if machine == "vm (AMD EPYC, AVX512-BF16)" and preset == "seed" and device == "cpu"]
    assert Path(seed["fp32"].path).name == "latency-seed-cpu-fp32-20261202T013644Z.json"
    assert {"bf16", "int8"} <= set(seed)


def test_an_interleaved_sweep_says_how_far_its_visits_lay_apart(tmp_path):
    """The committed 3-round tiny sweep (2026-12-03): the report says its cells were timed in 3 visits and how far the
    visits' p50s lay apart, from the rows' rounds_p50_ms; a one-round sweep says nothing of visits."""
    from pathlib import Path

    from fusionprof.latency_output import fusion_ranking, table
    from fusionprof.records import fastest_fusions, told_apart, visit_spread

    vm = Path(__file__).parent.parent / "profiles" / "vm"
    raw = json.loads((vm / "latency-tiny-cpu-fp32-20261203T145306Z.json").read_text())
    spreads = sorted(max(r["rounds_p50_ms"]) / min(r["rounds_p50_ms"]) - 1 for r in raw["rows"] if r["status"] == "ok")
    record = LatencyRecord.from_dict(raw)
    visits, median, widest = visit_spread(record.rows)
    assert visits == 3 and len(spreads) == 72 and median == pytest.approx((spreads[35] + spreads[36]) / 2)
    assert max(widest.host.rounds_p50_ms) / min(widest.host.rounds_p50_ms) - 1 == pytest.approx(spreads[-1])
    one_round = LatencyRecord.from_dict(json.loads((vm / "latency-tiny-cpu-fp32-20261203T144857Z.json").read_text()))
    assert visit_spread(one_round.rows) is None
    # its answer: each fusion's fastest cell, told apart from the fastest fusion's only where the visits do not overlap
    # (bottleneck/onnxruntime at batch 1: 1.68-2.22 ms, above all of late/onnxruntime's 1.17-1.35 ms)
    assert [(r.fusion, r.backend, apart) for r, apart in fastest_fusions(record.rows, 1)] == [
        ("late", "onnxruntime", None), ("early", "onnxruntime", False), ("bottleneck", "onnxruntime", True),
        ("mid", "onnxruntime", True)]
    assert told_apart([1.0], [2.0]) is None and told_apart([1.0, 2.0], [1.5, 3.0]) is False
    assert told_apart([1.0, 2.0], [2.5, 3.0]) is True
    assert fusion_ranking(one_round.rows) is None  # one visit a cell: nothing to tell two cells apart by
    ranking = fusion_ranking(record.rows)
    assert ranking.startswith("Fusions by the p50 of their fastest backend: at batch 1 late 1.23 ms (onnxruntime), "
                              "then early 1.30 ≈, bottleneck 1.96, mid 1.98 ms; at batch 32 late 20.15 ms (openvino)")
    assert ranking in table(record.rows) and not any(line.startswith("Fusions by") for line in table(one_round.rows))
    profiles = tmp_path / "profiles" / "vm"
    profiles.mkdir(parents=True)
    for name in ("latency-tiny-cpu-fp32-20261203T145306Z", "latency-tiny-cpu-fp32-20261203T144857Z"):
        (profiles / f"{name}.json").write_text((vm / f"{name}.json").read_text())
    write_report([tmp_path / "profiles"], tmp_path / "profiles")
    said = [line for line in (tmp_path / "profiles" / "report.md").read_text().splitlines()
            if line.startswith("Interleaved:")]
    assert said == [f"Interleaved: each cell timed in 3 visits, one a round through the whole sweep (`--rounds`), its "
                    f"figures over all of them. The p50s of a cell's visits lay {median:.0%} apart (largest over "
                    f"smallest) at the median cell and most at {widest.fusion}/{widest.backend} batch "
                    f"{widest.batch_size} ({min(widest.host.rounds_p50_ms):.2f} to "
                    f"{max(widest.host.rounds_p50_ms):.2f} ms): the machine's pace moving between rounds, and each "
                    "visit's own noise."]
    assert [line for line in (tmp_path / "profiles" / "report.md").read_text().splitlines()
            if line.startswith("Fusions by the p50")] == [ranking]  # the one-round sweep's section says nothing


def test_committed_records_load_through_their_types():
    """Every latency record in profiles/ reads into the dataclasses and writes back what it read (a p99 kept
    from fewer than 100 samples is dropped on reading: it is not a p99)."""
    from pathlib import Path

    paths = sorted(Path(__file__).parent.parent.glob("profiles/**/latency-*.json"))
    raws = {path: json.loads(path.read_text()) for path in paths}
    raws = {path: raw for path, raw in raws.items() if raw.get("kind") == LatencyRecord.kind}  # not the harness's
    assert raws
    for path, raw in raws.items():
        record = LatencyRecord.from_dict(raw, path)
        assert len(record.rows) == len(raw["rows"]) and record.path == str(path)
        for row, written in zip(record.rows, record.to_dict()["rows"], strict=True):
            assert row.host is None or row.host.p50_ms == written["p50_ms"] > 0
            if row.host is not None and row.host.n < 100:
                assert row.host.p99_ms is None and written["p99_ms"] is None
        assert LatencyRecord.from_dict(record.to_dict(), path) == record


def test_an_exports_build_time_counts_what_it_made():
    """The report's "build (s)": an int8 export's quantizations (and the fp32 graph made for it, never one reused
    that has a row of its own), a .pt2's export and compile, an ONNX export."""
    assert build_seconds({"export_seconds": 9.5}) == 9.5
    assert build_seconds({"seconds": {"export": 5.0, "compile": 28.5}}) == 33.5
    qdq = {"quantize_seconds": 2.0, "quantized_from": {"export_seconds": 10.0}}
    assert build_seconds(qdq) == 12.0  # openvino not installed: the QDQ graph, and its fp32 source made for it
    reused = {**qdq, "quantized_from": {"export_seconds": 10.0, "reused": "/m/export.json"}}
    assert build_seconds(reused) == 2.0
    nncf = {**reused, "openvino": {"loads": "qdq", "nncf": {"quantize_seconds": 6.0}}}  # made, then not kept
    assert build_seconds(nncf) == 8.0
    assert build_seconds({}) is None
    engine = {"build_seconds": 40.0}  # TensorRT: its engine, and the ONNX export made for it, not one reused
    assert build_seconds({"export_seconds": 9.5}, engine) == 49.5
    assert build_seconds({"export_seconds": 9.5, "reused": "/m/export.json"}, engine) == 40.0
    assert build_seconds({"export_seconds": 9.5}, {}) is None  # an engine built before its time was recorded


def test_pareto_front():
    points = [(1.0, 0.80), (2.0, 0.90), (1.5, 0.70), (3.0, 0.85), (0.5, 0.60), (4.0, 0.95)]
    assert pareto_front(points) == [(0.5, 0.60), (1.0, 0.80), (2.0, 0.90), (4.0, 0.95)]


@pytest.mark.slow
def test_compare_runs_every_stage_then_skips_them(tmp_path, small_data):
    args = ["compare", "--data", small_data, "--epochs", "1", "--limit-train", "12", "--limit-eval", "6",
            "--batch-sizes", "1,2", "--backends", "torch,onnxruntime", "--out", tmp_path / "m", "--profiles",
            tmp_path / "p", "--quiet", "--load-seconds", "0.2", "--load-queries", "64", "--load-trials", "1",
            "--precisions", "fp32", "--rounds", "2", *QUICK]  # fp32 only: the same stages on every CPU
    code, out = run_cli(*args)
    assert code == 0, out
    [sweep] = (tmp_path / "p").glob("*/latency-tiny-cpu-fp32-*.json")  # interleaved, as asked
    rows = json.loads(sweep.read_text())["rows"]
    assert all(len(r["rounds_p50_ms"]) == 2 for r in rows if r["status"] == "ok") and len(rows) == 16
    for stage in ("train tiny-early", "train tiny-bottleneck", "export tiny-mid onnx", "latency tiny cpu",
                  "traces tiny cpu", "load tiny-mid"):
        assert f"[compare] {stage}" in out
    for scenario in ("server", "offline"):  # under load, every fusion on its fastest backend at batch ≤ 8
        written = sorted((tmp_path / "p").glob(f"*/load-{scenario}-tiny-*.json"))
        assert len(written) == 4, written
        assert all(json.loads(w.read_text())["max_batch"] == 8 for w in written)
    assert "max QPS, p99 ≤ 50 ms" in out and "offline samples/s" in out
    md = (tmp_path / "p" / "report.md").read_text()
    for fusion in ("early", "mid", "late", "bottleneck"):
        assert f"| tiny | {fusion} |" in md
    assert "best p50, batch 1" in out and (tmp_path / "p" / "report.html").exists()
    # and closes with the report's answer for this machine: the Pareto front at each batch end
    assert "which fusion to ship (the report's first table)" in out
    assert "\n  fp32 batch 1: " in out and "\n  fp32 batch 2: " in out
    state = json.loads((tmp_path / "p" / "compare-tiny-cpu.json").read_text())["done"]
    assert all(done["stage_seconds"] > 0 for done in state.values())
    assert "[compare] time by stage: train " in out and ", load " in out
    assert list((tmp_path / "p" / "traces").glob("train-tiny-mid/*.pt.trace.json"))
    code, again = run_cli(*args)
    assert code == 0, again
    assert again.count("done before, skipped") == 4 + 4 + 2 + 4 and "[compare] report:" in again
    # Every stage recorded the weights it read (the checkpoints as they are now), so one retrained since runs it again
    # (that rerun, and a checkpoint gone: test_a_stage_is_skipped_only_when_made_with_what_is_asked_now)
    hashes = {f: checkpoint_hash(tmp_path / "m" / f"tiny-{f}" / "checkpoint.pt") for f in fusion_names()}
    for name, done in json.loads((tmp_path / "p" / "compare-tiny-cpu.json").read_text())["done"].items():
        kind, subject = name.split()[:2]
        read = done["weights"] if kind == "train" else done["settings"]["weights"]
        assert read == (hashes if kind in ("latency", "traces") else hashes[subject.split("-", 1)[1]]), name
    code, fourth = run_cli(*args[:4], "2", *args[5:])  # --epochs 2: not the study the checkpoints were trained for
    first = fusion_names()[0]
    assert code == 1 and fourth.splitlines()[-1] == (
        f"Error: {tmp_path / 'm' / f'tiny-{first}'} was trained otherwise than this study asks (--epochs 2 (the run's: "
        "1)): give the study another --out, or move that run away"), fourth
    assert f"[compare] train tiny-{first}: made before with other epochs, running again" in fourth


def test_a_stage_is_skipped_only_when_made_with_what_is_asked_now(tmp_path):
    """Settings or weights changed since a stage ran (--batch-sizes, a retrained checkpoint): it runs again, and one
    line says what changed; the same settings skip it; a state written before settings were kept runs it again."""
    from fusionprof.compare import Stages

    said, runs = [], []
    path = tmp_path / "compare-tiny-cpu.json"
    run = lambda: runs.append(1) or {"record": str(path)}  # noqa: E731 (an output that exists)
    stage = Stages(path, said.append)
    stage("latency tiny cpu", run, {"sweep": {"batch_sizes": [1, 2]}, "weights": {"mid": "a"}})
    again = Stages(path, said.append)  # the next `compare`, from the state file
    again("latency tiny cpu", run, {"sweep": {"batch_sizes": [1, 2]}, "weights": {"mid": "a"}})
    assert len(runs) == 1 and said[-1] == "[compare] latency tiny cpu: done before, skipped"
    # asked without running it (compare's packages are built ahead only for the export stages that will run)
    assert again.stale("latency tiny cpu", {"sweep": {"batch_sizes": [1, 2]}, "weights": {"mid": "a"}}) is None
    assert again.stale("latency tiny cpu", {"sweep": {"batch_sizes": [1, 2]}, "weights": {"mid": "b"}}) == \
        "made before with other weights"
    assert again.stale("traces tiny cpu", {}) == "not run yet" and len(runs) == 1
    again("latency tiny cpu", run, {"sweep": {"batch_sizes": [1, 64]}, "weights": {"mid": "b"}})
    assert len(runs) == 2 and "[compare] latency tiny cpu: made before with other sweep, weights, running again" in said
    state = json.loads(path.read_text())
    assert state["done"]["latency tiny cpu"]["settings"]["sweep"]["batch_sizes"] == [1, 64]
    del state["done"]["latency tiny cpu"]["settings"]  # a state file of an older fusionprof: settings unknown
    path.write_text(json.dumps(state))
    Stages(path, said.append)("latency tiny cpu", run, {"sweep": {"batch_sizes": [1, 64]}, "weights": {"mid": "b"}})
    assert len(runs) == 3 and said[-3] == ("[compare] latency tiny cpu: made by a fusionprof that did not record its "
                                           "settings, running again")
    # a trained checkpoint replaced since its stage ran (retrained by hand): the stage runs again
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"weights")
    trained = lambda: runs.append(1) or {"checkpoint": str(checkpoint), "weights": checkpoint_hash(checkpoint)}  # noqa: E731
    stage("train tiny-mid", trained, {"epochs": 3})
    stage("train tiny-mid", trained, {"epochs": 3})
    assert len(runs) == 4 and said[-1] == "[compare] train tiny-mid: done before, skipped"
    checkpoint.write_bytes(b"other weights")
    stage("train tiny-mid", trained, {"epochs": 3})
    assert len(runs) == 5 and f"[compare] train tiny-mid: {checkpoint} has been replaced since, running again" in said
    checkpoint.unlink()
    stage("train tiny-mid", lambda: runs.append(1) or {"checkpoint": str(checkpoint)}, {"epochs": 3})
    assert len(runs) == 6 and f"[compare] train tiny-mid: {checkpoint} is gone, running again" in said


def test_compare_says_where_its_time_went():
    from fusionprof.compare import time_spent

    done = {"train tiny-early": {"stage_seconds": 100.4}, "train tiny-mid": {"stage_seconds": 20.0},
            "latency tiny cpu": {"stage_seconds": 59.6}, "traces tiny cpu": {}}
    assert time_spent(done) == ("[compare] time by stage: train 120 s, latency 60 s (total 3.0 min); "
                                "1 stage(s) without a recorded time")


def test_compare_verifies_onnx_on_the_cpu_when_onnxruntime_cannot_run_on_the_gpu(monkeypatch):
    """A CUDA machine with the CPU build of onnxruntime: the exports are checked on the CPU, said once."""
    import onnxruntime

    from fusionprof import compare as compare_module

    monkeypatch.setattr(compare_module, "resolve_device", torch.device)  # cuda:0 without a GPU, for this check
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    said = []
    assert compare_module.export_check_device("onnx", "cuda:0", said.append) == "cpu"
    assert said == ["[compare] onnx exports are verified with onnxruntime on the CPU: CUDAExecutionProvider is not "
                    "in this onnxruntime build (CPUExecutionProvider)"]
    assert compare_module.export_check_device("onnx", "cpu", said.append) == "cpu" and len(said) == 1
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: both)
    assert compare_module.export_check_device("onnx", "cuda:0", said.append) == "cuda:0" and len(said) == 1
    assert compare_module.export_check_device("trt", "cpu", said.append) is None and len(said) == 1  # no GPU


def test_memory_the_allocator_cannot_see_is_not_plotted(tmp_path):
    """The H200 sweep of 2026-11-27 was written before the rule: its torch-cudagraphs cells carry a CUDA max allocated
    that misses the graphs' pools (671 MiB at batch 128 beside eager's 1295). The report plots eager's, not those,
    and says why."""
    from pathlib import Path

    from fusionprof.report import cuda_max_allocated, memory_section

    path = Path(__file__).parent.parent / "profiles/h200/latency-seed-cuda-bf16-20261127T142114Z.json"
    record = LatencyRecord.from_dict(json.loads(path.read_text()), path)
    graphs = [r for r in record.rows if r.backend == "torch-cudagraphs" and r.ok]
    eager = [r for r in record.rows if r.backend == "torch" and r.ok]
    assert graphs and all("cuda_max_allocated_mib" in r.peak_memory for r in graphs)  # in the file, as written
    assert all(cuda_max_allocated(r) is None for r in graphs)
    assert all(cuda_max_allocated(r) == r.peak_memory["cuda_max_allocated_mib"] > 0 for r in eager)
    blocks = memory_section(Records(latency=[record]), tmp_path)
    assert [b[0] for b in blocks] == ["h2", "img", "p"]
    assert blocks[2][1].startswith("Not plotted, because torch's allocator does not see their memory: "
                                   "torch-cudagraphs — a CUDA graph's memory pool")


def test_a_pareto_point_takes_the_accuracy_of_the_model_it_timed_in_its_precision():
    """An int8 sweep's points are at their int8 gate's accuracy (openvino's at its NNCF IR's), not the fp32 training
    run's; a model with no record in that precision, or a random-init one, is no point (never another's figure)."""
    def ckpt(fusion):
        return f"/m/tiny-{fusion}/checkpoint.pt"
    env = {"host": "vm", "cpu_model": "AMD EPYC"}  # one machine trained, exported and timed them
    train = [{"kind": "train", "checkpoint": ckpt(f), "train_config": {"precision": "fp32"},
              "test": {"accuracy": 0.9805}, "environment": env} for f in ("early", "mid")]
    export = [{"kind": "export", "checkpoint": ckpt("early"), "format": "onnx", "precision": "int8", "status": "ok",
               "accuracy": {"exported_accuracy": 0.98}, "environment": env,
               "onnx": {"openvino": {"loads": "nncf", "nncf": {"accuracy": {"exported_accuracy": 0.9790}}}}}]
    rows = [LatencyRow("early", "onnxruntime", "ok", model={"checkpoint": ckpt("early")}),
            LatencyRow("early", "openvino", "ok", model={"checkpoint": ckpt("early")}),
            LatencyRow("mid", "onnxruntime", "ok", model={"checkpoint": ckpt("mid")}),  # no int8 record of mid
            LatencyRow("late", "onnxruntime", "ok", model={})]  # random init
    for precision, expected in (("int8", [0.98, 0.9790, None, None]), ("fp32", [0.9805, 0.9805, 0.9805, None])):
        sweep = Sweep(machine_name(env), LatencyRecord("t", env, {"preset": "tiny", "precision": precision}, {}, rows))
        accuracy = row_accuracy(Records(train=train, export=export), sweep)
        assert [accuracy(r) for r in rows] == expected


def test_an_export_record_older_than_its_precision_field_still_counts_and_a_failed_gate_is_no_figure():
    """Export records written before the top-level ``precision`` field name it in their artifact
    (``models/*/export.json`` do): they are that precision's gate. A backend whose own export failed its gate has no
    accuracy, not ONNX's."""
    env = {"host": "vm", "cpu_model": "AMD EPYC"}
    path = "/m/tiny-mid/checkpoint.pt"
    old_onnx = {"kind": "export", "checkpoint": path, "format": "onnx", "status": "ok", "environment": env,
                "onnx": {"precision": "fp32"}, "accuracy": {"exported_accuracy": 0.97}}
    failed_pt2 = {"kind": "export", "checkpoint": path, "format": "pt2", "precision": "fp32", "status": "failed",
                  "environment": env, "pt2": {"precision": "fp32"}, "accuracy": {"exported_accuracy": 0.6}}
    found = model_accuracy([], [old_onnx], path, "fp32", "onnxruntime", machine=machine_name(env))
    assert found[:2] == (0.97, "onnx export")
    assert model_accuracy([], [old_onnx], path, "bf16", "onnxruntime", machine=machine_name(env)) is None
    assert model_accuracy([], [old_onnx, failed_pt2], path, "fp32", "aoti", machine=machine_name(env)) is None
    assert model_accuracy([], [old_onnx], path, "fp32", "aoti", machine=machine_name(env))[0] == 0.97  # none built


def test_one_checkpoint_path_on_two_machines_is_two_models():
    """A study's /tmp folder holds the EPYC's models one day and the Xeon's the next, under the same paths. A row takes
    the accuracy of the model it timed: by checkpoint hash where both records state one, else a record made on the
    row's machine; where neither tells which, none (never another model's figure)."""
    epyc = {"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": {"avx512_bf16": True}}
    xeon = {"host": "vm", "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": {"amx_bf16": True}}
    path = "/tmp/study/models/tiny-early/checkpoint.pt"

    def export(accuracy, digest, env):
        return {"kind": "export", "checkpoint": path, "checkpoint_hash": digest, "format": "onnx", "precision": "fp32",
                "status": "ok", "accuracy": {"exported_accuracy": accuracy}, "environment": env}

    def train(accuracy, env):  # written before training records named their checkpoint's hash
        return {"kind": "train", "checkpoint": path, "train_config": {"precision": "bf16"},
                "test": {"accuracy": accuracy}, "environment": env}
    records = Records(train=[train(0.9805, epyc), train(0.978, xeon)],
                      export=[export(0.9805, "e", epyc), export(0.978, "x", xeon)])
    third = {"host": "box", "cpu_model": "a third CPU"}
    for precision, row_model, env, expected in (
            ("fp32", {"checkpoint": path, "checkpoint_hash": "x"}, epyc, 0.978),  # the hash decides, not the host
            ("fp32", {"checkpoint": path}, xeon, 0.978),  # an older row: the record made on its machine
            ("fp32", {"checkpoint": path}, epyc, 0.9805),
            ("fp32", {"checkpoint": path}, third, None),  # neither record made on this machine
            ("fp32", {"checkpoint": path, "checkpoint_hash": "other"}, xeon, None),  # no export of that model
            ("bf16", {"checkpoint": path, "checkpoint_hash": "other"}, xeon, 0.978),  # hashless training records
            ("bf16", {"checkpoint": path}, epyc, 0.9805)):
        row = LatencyRow("early", "onnxruntime", "ok", model=row_model)
        sweep = Sweep(machine_name(env, "cpu"), LatencyRecord("t", env, {"preset": "tiny", "precision": precision,
                                                                         "device": "cpu"}, {}, [row]))
        assert row_accuracy(records, sweep)(row) == expected, (precision, row_model, env)


def test_the_precision_tables_of_two_machines_that_trained_in_one_folder_keep_their_own_accuracy():
    """The committed studies of 2026-12-02 (AVX512-BF16 EPYC) and 2026-12-03 (AMX Xeon) both trained into
    /tmp/fusionprof-cpu-lowprec/models: each machine's table shows its own models' accuracy (the report of
    2026-12-03 first showed the EPYC's export gates in the Xeon's table)."""
    from pathlib import Path

    from fusionprof.report import find_records, precision_section

    vm = Path(__file__).parent.parent / "profiles/vm"
    files = [*(vm.parent / f"tiny-{f}/metrics.json" for f in ("early", "bottleneck")),
             *vm.glob("export-tiny-*-onnx-*-20261202*.json"), *vm.glob("export-tiny-*-onnx-*-20261203-amx.json"),
             *vm.glob("train-tiny-*-bf16-20261203-amx.json"),
             *vm.glob("load-accuracy-tiny-*-openvino-*-20261203T221*.json"),
             *(vm / f"latency-tiny-cpu-{p}.json" for p in ("fp32-20261202T012114Z", "bf16-20261202T012358Z",
                                                          "int8-20261202T012608Z", "fp32-20261203T205200Z",
                                                          "bf16-20261203T205302Z", "int8-20261203T205405Z"))]
    blocks = precision_section(find_records(files))
    tables = {b[1].split(" · ")[0]: blocks[i + 1][2] for i, b in enumerate(blocks) if b[0] == "h3"}
    cells = {(machine, row[0], row[1]): row[4] for machine, rows in tables.items() for row in rows}
    epyc, xeon = "vm (AMD EPYC, AVX512-BF16)", "vm (Intel(R) Xeon(R) Processor, AMX)"
    assert cells[(epyc, "early", "fp32")] == "98.05% (onnx export)"
    assert cells[(xeon, "early", "fp32")] == "97.80% (onnx export)"
    assert cells[(epyc, "bottleneck", "bf16")] == "83.40% (training run)"
    # the Xeon's bf16 cells were won by openvino, whose own bf16 answers a LoadGen accuracy run scored
    assert cells[(xeon, "bottleneck", "bf16")] == \
        "86.70% (training run; openvino's own answers: 86.60%, LoadGen accuracy run)"
    assert cells[(xeon, "early", "fp32")] == "97.80% (onnx export)"  # won by onnxruntime: no accuracy run of it
    assert cells[(xeon, "bottleneck", "int8")] == "86.80% (onnx export; openvino runs NNCF's IR: 86.55%)"
    assert cells[(epyc, "bottleneck", "int8")] == "83.70% (onnx export; openvino runs NNCF's IR: 83.25%)"


def test_a_pareto_point_takes_the_accuracy_measured_closest_to_what_its_backend_runs():
    """openvino's bf16 is an inference hint over an fp32 graph: the training run's bf16 accuracy is PyTorch's, so a
    LoadGen accuracy run of that backend, model, precision and device, whose answers were all the backend's own, comes
    first; the newest of several. A run whose answers differed from the backend's, or of another backend, precision,
    device or model, is not taken. Then a PyTorch backend takes its training run, an export's backend its gate."""
    from fusionprof.loadgen import LoadRecord

    env = {"host": "vm", "cpu_model": "Intel Xeon", "cpu_isa": {"amx_bf16": True}}
    path = "/m/tiny-mid/checkpoint.pt"

    def run(accuracy, created="20261203T221107Z", backend="openvino", precision="bf16", device="cpu", digest="h",
            matches=True):
        return LoadRecord(created, "tiny", "mid", backend, precision, device, "offline", 1, 0.0, None,
                          {"checkpoint": path, "checkpoint_hash": digest}, {}, env, {},
                          accuracy={"loadgen_accuracy": accuracy, "matches": matches}, path=f"{created}.json")
    train = [{"kind": "train", "checkpoint": path, "checkpoint_hash": "h", "train_config": {"precision": "bf16"},
              "test": {"accuracy": 0.973}, "environment": env}]
    load = [run(0.971), run(0.972, created="20261203T231107Z"), run(0.5, created="20261204T000000Z", matches=False),
            run(0.4, backend="onnxruntime"), run(0.3, precision="fp32"), run(0.2, device="cuda:0"),
            run(0.1, digest="another model")]
    pt2 = [{"kind": "export", "checkpoint": path, "checkpoint_hash": "h", "format": "pt2", "precision": "bf16",
            "status": "ok", "accuracy": {"exported_accuracy": 0.9725}, "environment": env}]
    rows = [LatencyRow("mid", b, "ok", model={"checkpoint": path, "checkpoint_hash": "h"})
            for b in ("openvino", "onnxruntime", "torch", "aoti", "torch-cudagraphs")]
    sweep = Sweep(machine_name(env), LatencyRecord("t", env, {"preset": "tiny", "precision": "bf16", "device": "cpu"},
                                                   {}, rows))
    accuracy = row_accuracy(Records(train=train, export=pt2, load=load), sweep)
    # without an accuracy run: the PyTorch backends their training run's, aoti the gate of the package it loads
    assert [accuracy(r) for r in rows] == [0.972, 0.4, 0.973, 0.9725, 0.973]
    assert row_accuracy(Records(train=train, export=pt2), sweep)(rows[0]) == 0.9725  # no ONNX gate: another's
    found = model_accuracy(train, [], path, "bf16", "openvino", "h", machine_name(env), load, "cpu")
    assert found[:2] == (0.972, "openvino's own answers, LoadGen accuracy run")
    assert found[2]["_file"] == "20261203T231107Z.json" and found[2]["kind"] == "load"
    assert model_accuracy(train, [], path, "bf16", "openvino", "h", machine_name(env), load, "cuda")[0] == 0.2


def test_a_load_record_missing_a_field_is_a_one_line_error(tmp_path):
    from fusionprof import SCHEMA_VERSION

    run = {"scenario": "server", "accuracy": False, "valid": True, "validity": "VALID", "invalid_reasons": [],
           "loadgen": {}, "batch_sizes": {"1": 3}, "logs": "x"}  # no settings
    record = {"schema_version": SCHEMA_VERSION, "kind": "load", "created": "t", "preset": "tiny", "fusion": "mid",
              "backend": "onnxruntime", "precision": "fp32", "device": "cpu", "scenario": "server", "max_batch": 1,
              "batch_timeout_ms": 0.0, "p99_target_ms": 50.0, "model": {}, "backend_info": {},
              "environment": {"host": "box"}, "config": {}, "runs": [run]}
    path = tmp_path / "in" / "load-server-tiny-mid.json"
    path.parent.mkdir()
    path.write_text(json.dumps(record))
    code, out = run_cli("report", tmp_path / "in", "--out", tmp_path / "out")
    assert code == 1 and out == f"Error: {path}: not a complete load record: its run 0 has no 'settings'\n"


@pytest.mark.parametrize(("flags", "swept"), [((), []), (("avx512_bf16",), ["bf16"]),
                                              (("amx_bf16", "amx_int8"), ["bf16", "int8"]), (("avx_vnni",), ["int8"])])
def test_compare_sweeps_the_low_precisions_the_cpu_has_natively(monkeypatch, flags, swept):
    from fusionprof import compare as compare_module
    from fusionprof.env import CPU_ISA_FLAGS

    monkeypatch.setattr(compare_module, "cpu_isa", lambda: {f: f in flags for f in CPU_ISA_FLAGS})
    said = []
    assert compare_module.low_precisions("cpu", said.append) == swept
    assert len(said) == 2  # one line per low precision: swept with the flags that bring it, or why not
    for line in said:
        precision = line.split()[1].rstrip(":")
        assert ("swept beside fp32" in line) == (precision in swept), line
    assert compare_module.low_precisions("cuda:0", said.append) == [] and len(said) == 2


def test_compare_sweeps_the_precisions_asked_for_whatever_the_flags(monkeypatch):
    from fusionprof import compare as compare_module
    from fusionprof.env import CPU_ISA_FLAGS
    from fusionprof.errors import UserError

    monkeypatch.setattr(compare_module, "cpu_isa", lambda: {f: f == "avx2" for f in CPU_ISA_FLAGS})
    said = []
    assert compare_module.chosen_low_precisions(["fp32"], "cpu", said.append) == [] and said == []
    assert compare_module.chosen_low_precisions(["int8", "fp32", "bf16"], "cpu", said.append) == ["bf16", "int8"]
    assert said == ["[compare] bf16: swept beside fp32 as asked (this CPU has none of avx512_bf16, amx_bf16)",
                    "[compare] int8: swept beside fp32 as asked (this CPU has none of avx512_vnni, avx_vnni, amx_int8)"]
    for wrong in (["int8"], ["fp32", "fp16"], ["fp32", "int4"]):
        with pytest.raises(UserError, match="fp32 is the study's reference"):
            compare_module.chosen_low_precisions(wrong, "cpu", said.append)
    with pytest.raises(UserError, match="compare sweeps low precisions on the CPU"):
        compare_module.chosen_low_precisions(["fp32", "bf16"], "cuda:0", said.append)
    # the default names the flag it lacks and how to sweep the precision anyway
    compare_module.low_precisions("cpu", said.append)
    assert "--precisions fp32,int8 sweeps it" in said[-1] and "AVX2 runs it without VNNI" in said[-1]


@pytest.mark.parametrize("native_bf16", [True, False])
def test_low_precisions_are_timed_at_the_batches_the_precision_table_compares(monkeypatch, native_bf16):
    from fusionprof import compare as compare_module
    from fusionprof.backends.openvino import OpenVino
    from fusionprof.latency import SweepConfig

    # openvino runs bf16 only on a CPU that computes it (AVX512-BF16, AMX): both kinds of CPU, whichever this is
    monkeypatch.setitem(OpenVino.precisions, "cpu", ("fp32", "bf16", "int8") if native_bf16 else ("fp32", "int8"))
    fp32 = SweepConfig(preset="tiny", backends=["torch", "onnxruntime", "openvino"])
    assert fp32.batch_sizes == [1, 2, 4, 8, 16, 32]
    bf16, int8 = compare_module.low_precision_sweeps(fp32, ["bf16", "int8"], torch.device("cpu"), sizes_asked=False,
                                                     log=print)
    assert (bf16.precision, bf16.batch_sizes, bf16.backends) == (
        "bf16", [1, 8], ["torch", "openvino"] if native_bf16 else ["torch"])
    assert (int8.precision, int8.batch_sizes, int8.backends) == ("int8", [1, 8], ["onnxruntime", "openvino"])
    assert fp32.precision == "fp32" and fp32.batch_sizes == [1, 2, 4, 8, 16, 32]  # fp32's sweep is left as it was
    # `--batch-sizes` names the sizes of every precision; sizes without 1 or 8 keep fp32's rather than none
    [asked] = compare_module.low_precision_sweeps(fp32, ["int8"], torch.device("cpu"), sizes_asked=True, log=print)
    assert asked.batch_sizes == [1, 2, 4, 8, 16, 32]
    [large] = compare_module.low_precision_sweeps(SweepConfig(preset="tiny", batch_sizes=[32, 64],
                                                              backends=["onnxruntime"]),
                                                  ["int8"], torch.device("cpu"), sizes_asked=False, log=print)
    assert large.batch_sizes == [32, 64]
    # a precision none of the swept backends runs is left out in one line, not swept over no backend
    said = []
    assert compare_module.low_precision_sweeps(SweepConfig(preset="tiny", backends=["torch"]), ["int8"],
                                               torch.device("cpu"), sizes_asked=False, log=said.append) == []
    assert said == ["[compare] int8: not swept, none of the swept backends (torch) runs it"]


def test_a_failed_int8_gate_is_a_result_and_a_failed_fp32_export_stops_the_study(monkeypatch, tmp_path):
    from fusionprof import compare as compare_module
    from fusionprof.errors import UserError

    def export(checkpoint, fmt, precision, **kw):
        return {"status": "failed", "record_path": f"{checkpoint}.{precision}.json",
                "accuracy": {"exported_accuracy": 0.5}}
    monkeypatch.setattr(compare_module, "export", export)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m" / "tiny-mid").mkdir(parents=True)
    (tmp_path / "m" / "tiny-mid" / "checkpoint.pt").write_bytes(b"weights")  # what an export stage's settings hash
    done, said, checkpoints = {}, [], {"mid": Path("m/tiny-mid/checkpoint.pt")}

    def stage(name, run, settings):
        assert settings["weights"] == checkpoint_hash("m/tiny-mid/checkpoint.pt")
        done[name] = run()
        return done[name]
    with pytest.raises(UserError, match=r"onnx fp32 export of .* failed verification"):
        compare_module.export_stages(stage, "tiny", checkpoints, "cpu", ["onnxruntime"], ["int8"], False, said.append)
    monkeypatch.setattr(compare_module, "export", lambda c, f, p, **kw: {**export(c, f, p), "status": "ok"}
                        if p == "fp32" else export(c, f, p))
    compare_module.export_stages(stage, "tiny", checkpoints, "cpu", ["onnxruntime"], ["int8"], False, said.append)
    assert done["export tiny-mid onnx int8"]["status"] == "failed" and done["export tiny-mid onnx"]["status"] == "ok"
    assert "the int8 export of m/tiny-mid/checkpoint.pt failed its gate" in said[-1]


def test_a_low_precision_winner_no_gate_measured_is_scored_by_its_own_answers(tmp_path, small_data):
    """compare's accuracy stages: per fusion, each backend that won a cell of a low-precision sweep and whose accuracy
    in that precision no gate measured gets a real LoadGen accuracy run; a gated winner (here torch, trained in that
    precision) gets none, and a backend that won no cell none."""
    from fusionprof import compare as compare_module
    from fusionprof.config import model_config, train_config
    from fusionprof.latency import SweepConfig
    from fusionprof.train import train

    models, profiles = tmp_path / "models", tmp_path / "profiles"
    metrics = train(train_config("tiny", data=str(small_data), epochs=1, batch_size=16, models_dir=str(models),
                                 profiles_dir=str(profiles), precision="fp32"),
                    model_config("tiny", fusion="late"), progress=False, log=lambda s: None)
    trained = {"metrics": str(profiles / "tiny-late" / "metrics.json"), "checkpoint": metrics["checkpoint"]}
    done = {"export tiny-late onnx int8": {"status": "failed"}}  # the int8 ONNX missed its gate: no accuracy of it
    assert not compare_module.has_gate(done, "tiny", "late", trained, "onnxruntime", "int8")
    assert compare_module.has_gate({"export tiny-late onnx int8": {"status": "ok"}}, "tiny", "late", trained,
                                   "openvino", "int8")
    assert compare_module.has_gate(done, "tiny", "late", trained, "torch", "fp32")
    assert not compare_module.has_gate(done, "tiny", "late", trained, "torch", "bf16")  # autocast, trained in fp32
    rows = [{"fusion": "late", "backend": b, "batch_size": n, "status": "ok", "p50_ms": ms}
            for b, n, ms in (("onnxruntime", 1, 1.0), ("torch", 1, 2.0), ("torch", 8, 3.0), ("onnxruntime", 8, 4.0),
                             ("openvino", 8, 5.0))]
    cfg = SweepConfig(preset="tiny", precision="int8", models_dir=str(models), profiles_dir=str(profiles))
    ran = {}

    def stage(name, run, settings):
        ran[name] = run()
        return ran[name]
    compare_module.accuracy_stages(stage, rows, cfg, lambda fusion, backend: backend == "torch", False, print)
    assert list(ran) == ["accuracy tiny-late onnxruntime int8"]
    result = ran["accuracy tiny-late onnxruntime int8"]
    record = json.loads(Path(result["accuracy_record"]).read_text())
    assert (record["backend"], record["precision"], record["scenario"]) == ("onnxruntime", "int8", "offline")
    assert result["matches"] and record["accuracy"]["loadgen_accuracy"] == result["loadgen_accuracy"]


@pytest.mark.parametrize("args,message", [
    (["--precisions", "int8"], "--precisions int8: fp32 and any of bf16, int8"),
    # the latency stage's options, which it reads only after minutes of training
    (["--backends", "tvm"], "unknown backend 'tvm'; choose from "),
    (["--batch-sizes", "0,8"], "--batch-sizes must be whole numbers of at least 1"),
    (["--backends", "tensorrt"], "nothing to time here: tensorrt: TensorRT runs on CUDA devices only"),
    (["--device", "cuda:64"], "--device cuda:64: "),
    # a value given twice: refused, naming it (the swept backends and precisions would have quietly dropped it)
    (["--precisions", "fp32,int8,fp32"], "--precisions fp32,int8,fp32: fp32 is given twice"),
    (["--backends", "torch,torch"], "--backends torch,torch: torch is given twice"),
    (["--batch-sizes", "8,1,8"], "--batch-sizes 8,1,8: 8 is given twice"),
])
def test_a_wrong_option_is_refused_before_anything_is_trained(args, message, tmp_path):
    code, out = run_cli("compare", *args, "--out", tmp_path / "m", "--profiles", tmp_path / "p")
    assert code == 1 and out.splitlines()[-1].startswith(f"Error: {message}"), out
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


def test_compare_puts_each_fusion_under_load_on_its_fastest_backend_at_the_batching_size():
    from fusionprof.compare import LoadPlan, fastest_backend, summarize

    def row(fusion, backend, batch, p50, status="ok"):
        return {"fusion": fusion, "backend": backend, "batch_size": batch, "p50_ms": p50, "status": status}
    rows = [row("mid", "torch", 8, 20.0), row("mid", "onnxruntime", 8, 12.0), row("mid", "openvino", 8, 5.0, "WRONG"),
            row("mid", "onnxruntime", 16, 40.0), row("mid", "torch", 16, 30.0), row("late", "torch", 4, 3.0),
            row("late", "onnxruntime", 32, 1.0)]
    assert fastest_backend(rows, "mid", 8) == "onnxruntime"  # the wrong one is never chosen, nor batch 16's best
    assert fastest_backend(rows, "late", 8) == "torch"  # the largest swept batch up to 8
    assert fastest_backend(rows, "early", 8) is None
    lines = summarize({"mid": {"test_accuracy": 0.9, "train_seconds": 60}}, rows,
                      {"mid": {"max_qps": 123.4, "offline_samples_per_s": 456.7}}, LoadPlan())
    assert "max QPS, p99 ≤ 50 ms" in lines[0] and "123.4" in lines[1] and "456.7" in lines[1]
    assert len(lines) == 2 and "+" not in lines[1]  # nothing was measured beside a busy neighbour
    # interleaved (--rounds): a fusion whose best cell's visits overlap the fastest fusion's is marked ≈
    cells = {("late", 1): (1.5, [1.4, 1.5, 1.6]), ("mid", 1): (2.0, [1.9, 2.0, 2.3]), ("early", 1): (2.5, [1.55, 2.5]),
             ("late", 8): (12.0, [11.0, 12.0, 13.0]), ("mid", 8): (10.0, [9.5, 10.0, 10.5]), ("early", 8): (15.0, None)}
    timed = [{**row(f, "onnxruntime", b, p50), "rounds_p50_ms": visits} for (f, b), (p50, visits) in cells.items()]
    acc = {f: {"test_accuracy": 0.9, "train_seconds": 60} for f in ("early", "mid", "late")}
    early, mid, late, legend = summarize(acc, timed)[1:]
    assert "2.50 ms (onnxruntime) ≈" in early and "15.00 ms (onnxruntime) ≈" not in early  # one visit: not judged
    assert "≈" not in mid + late and legend.startswith("≈ not told apart from the fastest fusion at that batch")
    assert "≈" not in "".join(summarize(acc, [{**r, "rounds_p50_ms": None} for r in timed]))
    lines = summarize({"mid": {"test_accuracy": 0.9, "train_seconds": 60}}, rows,
                      {"mid": {"max_qps": 123.4, "invalid_qps": 1150.25, "offline_samples_per_s": 456.7}}, LoadPlan())
    assert "123.4 (1150.2 INVALID)" in lines[1] and lines[2].startswith("max QPS: the largest Server rate")
    head, row = lines[0], lines[1]  # right-aligned columns: each cell ends where its heading does
    assert head.index("max QPS") + len("max QPS, p99 ≤ 50 ms") == row.index("123.4 (") + len("123.4 (1150.2 INVALID)")
    assert len(head) == len(row)
    busy = {"seconds": 9.0, "other_processes_cores": 0.9, "steal_share": 0.0, "cores": 2}
    quiet = {**busy, "other_processes_cores": 0.01}
    rows[5]["contention"] = busy  # late's best at batch 4 was timed beside a busy neighbour, mid's load runs too
    lines = summarize({"mid": {"test_accuracy": 0.9, "train_seconds": 60, "contention": quiet},
                       "late": {"test_accuracy": 0.8, "train_seconds": 30, "contention": busy}}, rows,
                      {"mid": {"max_qps": 123.4, "offline_samples_per_s": 456.7, "contention": busy}}, LoadPlan())
    assert "123.4 +" in lines[1] and "456.7 +" in lines[1] and " 60 " in lines[1] and " 60 +" not in lines[1]
    assert "3.00 ms (torch) +" in lines[2] and " 30 +" in lines[2] and "1.00 ms (onnxruntime) +" not in lines[2]
    assert lines[3].startswith("+ measured beside a busy neighbour")


def test_report_reads_the_default_folders_that_exist_and_says_when_there_are_none(two_machines, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run_cli("report")
    assert code == 1 and out == ("Error: nothing to report here: no profiles/ or models/ folder; name the folders or "
                                 "files that hold the records (fusionprof report DIR ...)\n")
    (tmp_path / "profiles").mkdir()  # a study that exported nothing has no models/: not an error
    [sweep] = (two_machines / "there").glob("*.json")
    (tmp_path / "profiles" / sweep.name).write_bytes(sweep.read_bytes())
    code, out = run_cli("report")
    assert code == 0 and out.startswith("1 records from 1 machine(s) → profiles/report.md"), out
    code, out = run_cli("report", "nowhere")  # a folder named and missing is still an error
    assert code == 1 and out == "Error: nowhere: no such file or folder\n"


def test_the_report_opens_with_each_machines_pareto_front_told_apart_or_not(tmp_path):
    """`Which fusion to ship`: per machine, preset, device and precision, the sweep that scored the most fusions,
    its Pareto front at the smallest and largest batch, fastest first; ≈ where its visits did not tell a choice's
    latency apart from the one before it."""
    from fusionprof.records import Timing
    from fusionprof.report import Records, shortlist, shortlist_lines, shortlist_section, to_markdown

    env = {"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": {"avx2": True}}
    accuracy = {"early": 0.95, "mid": 0.97, "late": 0.96}
    train = [{"kind": "train", "checkpoint": f"/m/tiny-{f}/checkpoint.pt", "checkpoint_hash": f, "environment": env,
              "train_config": {"precision": "fp32"}, "test": {"accuracy": a}} for f, a in accuracy.items()]

    def row(fusion, batch, visits):
        host = Timing.of([v for v in visits for _ in range(3)], "host")
        host.rounds_p50_ms = visits
        return LatencyRow(fusion, "torch", "ok", batch_size=batch, host=host,
                          model={"checkpoint": f"/m/tiny-{fusion}/checkpoint.pt", "checkpoint_hash": fusion})
    study = [row("early", 1, [0.9, 1.0, 1.1]), row("mid", 1, [1.0, 1.05, 1.12]),  # overlapping visits: ≈
             row("late", 1, [1.9, 2.0, 2.1]),  # slower and less accurate than mid: off the front
             row("early", 8, [4.9, 5.0, 5.1]), row("mid", 8, [6.9, 7.0, 7.1]), row("late", 8, [7.9, 8.0, 8.1])]
    config = {"preset": "tiny", "precision": "fp32", "device": "cpu"}
    sweeps = [LatencyRecord("20261204T010000Z", env, config, {}, study, path="/p/vm/latency-study.json"),
              # newer but of one fusion: the study's sweep, which scored three, answers for this machine
              LatencyRecord("20261204T020000Z", env, config, {}, [row("mid", 1, [0.5, 0.5, 0.5])], path="/p/one.json")]
    answer = shortlist(Records(train=train, latency=sweeps))
    common = {"machine": "vm (AMD EPYC, AVX2)", "preset": "tiny", "device": "cpu", "precision": "fp32",
              "record": "latency-study.json"}
    assert answer == [
        {**common, "batch": 1, "front": "early (torch) 1.00 ms, 95.00%; mid (torch) 1.05 ms ≈, 97.00%"},
        {**common, "batch": 8, "front": "early (torch) 5.00 ms, 95.00%; mid (torch) 7.00 ms, 97.00%"}]
    blocks = shortlist_section(answer)
    assert to_markdown(blocks).startswith("## Which fusion to ship")
    [table] = [b for b in blocks if b[0] == "table"]
    assert table[2][0] == ["vm (AMD EPYC, AVX2)", "tiny · fp32 · cpu", 1, answer[0]["front"], "latency-study.json"]
    # compare closes with the entries of its own machine, preset and device, fp32 first
    from fusionprof.compare import study_answer

    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"environment": env}))
    other = {**common, "machine": "vm (NVIDIA H200)", "device": "cuda:0", "batch": 1, "front": "mid (torch) 1 ms"}
    bf16 = {**common, "precision": "bf16", "batch": 1, "front": "late (openvino) 0.90 ms, 96.00%"}
    assert study_answer([bf16, *answer, other], sweep, "tiny", "cpu")[1:] == [
        "  fp32 batch 1: early (torch) 1.00 ms, 95.00%; mid (torch) 1.05 ms ≈, 97.00%",
        "  fp32 batch 8: early (torch) 5.00 ms, 95.00%; mid (torch) 7.00 ms, 97.00%",
        "  bf16 batch 1: late (openvino) 0.90 ms, 96.00%"]
    assert study_answer([other], sweep, "tiny", "cpu") == []
    on_gpu = tmp_path / "gpu-sweep.json"
    on_gpu.write_text(json.dumps({"environment": {"host": "vm", "gpus": [{"name": "NVIDIA H200"}]}}))
    assert study_answer([other], on_gpu, "tiny", "cuda")[1:] == ["  fp32 batch 1: mid (torch) 1 ms"]  # as cuda:0
    # `fusionprof report` prints every machine's, each named
    assert shortlist_lines([bf16, other])[1:] == [
        "  vm (AMD EPYC, AVX2) · tiny · cpu", "    bf16 batch 1: late (openvino) 0.90 ms, 96.00%",
        "  vm (NVIDIA H200) · tiny · cuda:0", "    fp32 batch 1: mid (torch) 1 ms"]
    # no training record, so no accuracy of what was timed: no answer, and the section says what to run
    assert shortlist(Records(latency=sweeps)) == []
    [(_, text)] = [b for b in shortlist_section([]) if b[0] == "p"]
    assert "Needs a latency sweep of trained models" in text


def test_the_answer_marks_an_order_its_one_visit_sweep_could_not_judge():
    """A sweep of one visit per cell cannot tell two choices' latencies apart: its front is marked `?` there, never
    left unmarked as if told apart (the AVX512-BF16 EPYC's bf16 answer: late 1.90 ms, then early 2.13 ms, each cell
    at CV 27–30 %, in one visit)."""
    from fusionprof.records import Timing
    from fusionprof.report import shortlist, shortlist_lines, shortlist_section, to_markdown

    env = {"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": {"avx512_bf16": True}}
    accuracy = {"early": 0.9805, "late": 0.9655}
    train = [{"kind": "train", "checkpoint": f"/m/tiny-{f}/checkpoint.pt", "checkpoint_hash": f, "environment": env,
              "train_config": {"precision": "bf16"}, "test": {"accuracy": a}} for f, a in accuracy.items()]

    def row(fusion, p50):
        return LatencyRow(fusion, "torch", "ok", batch_size=1, host=Timing.of([p50] * 30, "host"),
                          model={"checkpoint": f"/m/tiny-{fusion}/checkpoint.pt", "checkpoint_hash": fusion})
    sweep = LatencyRecord("20261202T012358Z", env, {"preset": "tiny", "precision": "bf16", "device": "cpu"}, {},
                          [row("late", 1.90), row("early", 2.13)], path="/p/vm/latency-one-visit.json")
    [entry] = shortlist(Records(train=train, latency=[sweep]))
    assert entry["front"] == "late (torch) 1.90 ms, 96.55%; early (torch) 2.13 ms ?, 98.05%"
    assert "?" in shortlist_lines([entry])[0]
    assert "?: " in to_markdown(shortlist_section([entry]))


def test_the_answer_says_how_many_test_pairs_its_accuracies_rest_on():
    """A front trades latency for accuracy, so it says how many test pairs its accuracies were measured on and their
    95 % interval: compare's closing answer on 120 pairs put mid's 50.83 % after early's 49.17 % as accuracy bought,
    while the report's only word on noise was a fixed "on 2000 pairs ±0.7 points"."""
    from fusionprof.records import Timing
    from fusionprof.report import shortlist, shortlist_section, to_markdown

    env = {"host": "vm", "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": {"amx_bf16": True}}
    accuracy = {"early": 59 / 120, "mid": 61 / 120}
    train = [{"kind": "train", "checkpoint": f"/m/tiny-{f}/checkpoint.pt", "checkpoint_hash": f, "environment": env,
              "train_config": {"precision": "fp32"}, "test": {"accuracy": a, "pairs": 120}}
             for f, a in accuracy.items()]

    def row(fusion, visits):
        host = Timing.of([v for v in visits for _ in range(3)], "host")
        host.rounds_p50_ms = visits
        return LatencyRow(fusion, "torch", "ok", batch_size=1, host=host,
                          model={"checkpoint": f"/m/tiny-{fusion}/checkpoint.pt", "checkpoint_hash": fusion})
    sweep = LatencyRecord("20261204T130534Z", env, {"preset": "tiny", "precision": "fp32", "device": "cpu"}, {},
                          [row("early", [1.10, 1.11, 1.12]), row("mid", [1.55, 1.59, 1.62])], path="/p/latency.json")
    [entry] = shortlist(Records(train=train, latency=[sweep]))
    assert entry["front"] == ("early (torch) 1.11 ms, 49.17%; mid (torch) 1.59 ms, 50.83% "
                              "(120 test pairs: 95 % interval ±8.9 points)")
    assert "2000 pairs" not in to_markdown(shortlist_section([entry]))


def test_an_answer_that_scored_one_fusion_says_it_compared_none():
    """`Which fusion to ship` from a sweep in which one fusion had a known accuracy (the AVX2 EPYC's: mid alone, on aoti
    and torch) says so, rather than read as mid beating the other three."""
    from fusionprof.records import Timing
    from fusionprof.report import shortlist

    env = {"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": {"avx2": True}}
    train = [{"kind": "train", "checkpoint": "/m/tiny-mid/checkpoint.pt", "checkpoint_hash": "mid", "environment": env,
              "train_config": {"precision": "fp32"}, "test": {"accuracy": 0.9775, "pairs": 2000}}]

    def row(fusion, backend, p50, trained=True):
        return LatencyRow(fusion, backend, "ok", batch_size=1, host=Timing.of([p50] * 30, "host"),
                          model={"checkpoint": f"/m/tiny-{fusion}/checkpoint.pt", "checkpoint_hash": fusion}
                          if trained else {"weights": "untrained"})
    sweep = LatencyRecord("20261127T121709Z", env, {"preset": "tiny", "precision": "fp32", "device": "cpu"}, {},
                          [row("mid", "aoti", 8.69), row("mid", "torch", 11.39), row("early", "torch", 7.0, False)],
                          path="/p/latency.json")
    [entry] = shortlist(Records(train=train, latency=[sweep]))
    assert entry["front"] == "mid (aoti) 8.69 ms, 97.75% (no other fusion of this sweep has a test accuracy on record)"


def test_a_sweep_says_how_many_of_its_cells_were_noisy(tmp_path):
    """The spec's warning above a CV of 10 %, which `fusionprof latency`'s table gives (`!`), in the report too: the
    AVX512-BF16 EPYC's trained fp32 sweep (2026-12-02) ranked early/onnxruntime's 2.33 ms at batch 1 (CV 16 %) with
    no word on noise anywhere in the report."""
    from pathlib import Path

    name = "latency-tiny-cpu-fp32-20261202T012114Z.json"
    raw = json.loads((Path(__file__).parent.parent / "profiles" / "vm" / name).read_text())
    timed = [r for r in raw["rows"] if "n" in r]
    noisy = [r for r in timed if r["cv"] > 0.10]
    worst = max(noisy, key=lambda r: r["cv"])
    (tmp_path / "vm").mkdir()
    (tmp_path / "vm" / name).write_text(json.dumps(raw))
    write_report([tmp_path], tmp_path)
    said = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("Noisy:")]
    assert said == [f"Noisy: {len(noisy)} of {len(timed)} cells had a coefficient of variation above 10% (largest: "
                    f"{worst['fusion']}/{worst['backend']} batch {worst['batch_size']}, CV {worst['cv']:.0%}): a "
                    "few slow calls, or a machine whose pace moved while they were timed; their p50s are less sure "
                    "than the others'."]


def test_a_gpu_cell_is_noisy_when_its_device_resident_timing_is(tmp_path):
    """On a GPU the tables quote the device-resident p50: the H200's eager mid at batch 8 (2026-12-04) had a steady
    host timing (CV 6 %) and a device-resident CV of 26 %, and was not flagged."""
    from pathlib import Path

    from fusionprof.records import LatencyRow, noisy_cells

    name = "latency-seed-cuda-bf16-20261204T154007Z.json"
    raw = json.loads((Path(__file__).parent.parent / "profiles" / "h200" / name).read_text())
    rows = [LatencyRow.from_dict(r) for r in raw["rows"]]
    mid8 = next(r for r in rows if (r.fusion, r.backend, r.batch_size) == ("mid", "torch", 8))
    assert not mid8.host.cv_warning and mid8.device_resident.cv_warning and mid8.noisy
    expected = [r for r in raw["rows"] if max(r["cv"], r["device_resident"]["cv"]) > 0.10]
    noisy, worst = noisy_cells(rows)
    assert len(noisy) == len(expected) == 8 and len([r for r in expected if r["cv"] > 0.10]) == 5
    assert (worst.fusion, worst.backend, worst.batch_size) == ("late", "torch", 32)
    assert LatencyRow.from_dict(raw["rows"][0]).to_dict()["cv_warning"] is False  # bottleneck torch 1: steady both
    (tmp_path / "h200").mkdir()
    (tmp_path / "h200" / name).write_text(json.dumps(raw))
    write_report([tmp_path], tmp_path)
    [said] = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("Noisy:")]
    assert said.startswith("Noisy: 8 of 32 cells had a coefficient of variation above 10% (largest: late/torch batch "
                           "32, CV 27%)")
