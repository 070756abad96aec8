"""A busy neighbour in the record: `contention.watch` against a real busy process, and what a latency sweep, a
LoadGen run and the report make of it."""

import csv
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import psutil
import pytest
import torch
from click.testing import CliRunner
from test_load import QUICK, SleepingBackend, _load_record, _server_run, sample_inputs

from fusionprof import contention
from fusionprof.cli import cli
from fusionprof.config import model_config, train_config
from fusionprof.load import describe
from fusionprof.load_report import OTHERS, load_section
from fusionprof.loadgen import BatchingSUT, LoadRecord, LoadSettings, run_loadgen
from fusionprof.report import write_report
from fusionprof.train import train


@contextmanager
def busy_process():
    """Another process spinning on a core for as long as the block runs (our child: ``contention.neighbours``)."""
    with contention.neighbours(1):
        time.sleep(0.3)  # up and spinning
        yield


@contextmanager
def stranger_process():
    """A spinning process that is no descendant of ours (a shell starts it and exits: it is handed to init)."""
    started = subprocess.run(["sh", "-c", f"'{sys.executable}' -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    stranger = psutil.Process(int(started.stdout))
    try:
        time.sleep(0.3)
        assert stranger.pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        yield stranger
    finally:
        stranger.kill()


def test_watch_counts_other_processes_and_not_our_own_threads():
    with busy_process(), contention.watch() as beside:
        time.sleep(1.5)
    assert beside["seconds"] == pytest.approx(1.5, abs=0.2) and beside["cores"] >= 1
    assert beside["other_processes_cores"] >= 0.6 and contention.busy(beside)  # one core spun the whole time
    a = torch.randn(512, 512)
    with contention.watch() as ours:  # torch's pool threads busy on every core: this process's, not a neighbour's
        end = time.perf_counter() + 1.0
        while time.perf_counter() < end:
            a @ a
    assert ours["other_processes_cores"] < 0.5


def test_busy_describe_and_combine():
    quiet = {"seconds": 3.0, "other_processes_cores": 0.02, "steal_share": 0.0, "cores": 2}
    loud = {"seconds": 1.0, "other_processes_cores": 1.0, "steal_share": 0.1, "cores": 2}
    assert not contention.busy(quiet) and contention.busy(loud)
    assert contention.busy({**quiet, "steal_share": 0.08})  # the hypervisor's other guests are neighbours too
    assert not contention.busy({}) and contention.describe({}) == ""  # a record from before it was watched
    assert contention.describe(loud) == "others 1.00 cores, 10.0% stolen"
    both = contention.combine([quiet, loud, {}])  # weighted by time; an unwatched one left out
    assert both == {"seconds": 4.0, "other_processes_cores": round((0.06 + 1.0) / 4, 2), "steal_share": 0.025,
                    "cores": 2}
    assert contention.combine([{}, {}]) == {}


def test_a_latency_cell_timed_beside_a_busy_process_says_so(tmp_path):
    quick = ["--min-seconds", "1", "--min-calls", "5", "--warmup-seconds", "0", "--warmup-calls", "1"]
    threads = torch.get_num_threads()
    with busy_process():
        result = CliRunner().invoke(cli, ["latency", "--fusion", "late", "--backends", "torch", "--batch-sizes", "1",
                                          "--models", str(tmp_path / "none"), "--out", str(tmp_path), "--quiet",
                                          "--threads", "1", *quick])
    assert result.exit_code == 0, result.output
    # --threads 1 held for the sweep only: it once stayed, and later sweeps in the process ran on one thread
    assert torch.get_num_threads() == threads
    [path] = tmp_path.glob("*/latency-*.json")
    [row] = json.loads(path.read_text())["rows"]
    assert row["contention"]["other_processes_cores"] >= 0.6 and row["contention"]["seconds"] >= 1
    assert "+ other processes were busy while that cell was timed (worst: others" in result.output
    [line] = [ln for ln in result.output.splitlines() if ln.startswith("late") and "torch" in ln]
    assert line.endswith(" +")  # the cell's own line is marked
    [csv_row] = csv.DictReader(path.with_suffix(".csv").open())
    assert float(csv_row["other_processes_cores"]) == row["contention"]["other_processes_cores"]
    report = write_report([tmp_path], tmp_path / "report")
    assert "Timed beside a busy neighbour: 1 of 1 cells" in (tmp_path / "report" / "report.md").read_text(), report


def test_a_loadgen_run_beside_a_busy_process_says_so_and_the_report_marks_it(tmp_path):
    with BatchingSUT(SleepingBackend(2.0).run, sample_inputs) as sut, busy_process():
        loud = run_loadgen(sut, 64, LoadSettings("server", target_qps=50, p99_ms=50, **QUICK), tmp_path / "loud")
    assert loud.contention["other_processes_cores"] >= 0.6 and loud.contention["seconds"] >= 1.5
    assert "[busy neighbour: others " in describe(loud)
    quiet = {"seconds": 2.0, "other_processes_cores": 0.01, "steal_share": 0.0, "cores": 2}
    record = LoadRecord.from_dict(_load_record("mid", 1, [loud.to_dict(), {**_server_run(40, True, 9.0),
                                                                           "contention": quiet}], max_qps=50),
                                  tmp_path / "r.json")
    assert record.contention["seconds"] == pytest.approx(loud.contention["seconds"] + 2.0)
    old = LoadRecord.from_dict(_load_record("late", 1, [_server_run(40, True, 9.0)], max_qps=40), tmp_path / "o.json")
    assert old.contention == {}  # written before runs were watched
    server, best = [b for b in load_section([record, old], tmp_path) if b[0] == "table"][:2]
    column, loud_cores = server[1].index(OTHERS), loud.contention["other_processes_cores"]
    assert sorted(row[column] for row in server[2]) == ["0.01", f"{loud_cores:.2f} (busy)", "–"]
    assert best[2][0][best[1].index(OTHERS)].endswith(" (busy)") and best[2][1][best[1].index(OTHERS)] == "–"


def test_recommend_says_a_choice_was_measured_beside_a_busy_neighbour(tmp_path):
    loud = {"seconds": 10.0, "other_processes_cores": 0.98, "steal_share": 0.0, "cores": 2}
    quiet = {**loud, "other_processes_cores": 0.01}
    for name, fusion, load in (("a", "mid", loud), ("b", "late", quiet)):
        record = _load_record(fusion, 1, [{**_server_run(40, True, 9.0), "contention": load}], max_qps=40)
        path = tmp_path / "box" / f"load-server-{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record))
    result = CliRunner().invoke(cli, ["recommend", "--p99-ms", "50", "--profiles", str(tmp_path)])
    assert result.exit_code == 0, result.output
    mid = [line for line in result.output.splitlines() if "tiny/mid" in line]
    late = [line for line in result.output.splitlines() if "tiny/late" in line]
    assert mid and late and all("(measured beside a busy neighbour)" in line for line in mid)
    assert not any("neighbour" in line for line in late)


def test_a_process_tree_counts_its_children_as_its_own():
    """A training run's DataLoader workers (and torchrun's other local ranks) are the run's work, not a neighbour's."""
    with busy_process():
        with contention.watch() as process:
            time.sleep(1.0)
        with contention.watch(contention.tree_of_this_run(torchrun=False)) as tree:
            time.sleep(1.0)
    assert process["other_processes_cores"] >= 0.6 and tree["other_processes_cores"] < 0.3
    with contention.watch(contention.tree_of_this_run(torchrun=False)) as reaped:  # a child that ends in the block
        subprocess.run([sys.executable, "-c", "import time\nend = time.time() + 1\nwhile time.time() < end: pass"],
                       check=True)
    assert reaped["other_processes_cores"] < 0.3


def test_training_beside_a_busy_process_says_so(tmp_path, small_data):
    # workers=0: DataLoader workers would leave torch's SIGCHLD handler in the test process, and a later child's exit
    # after a profiled run then killed pytest with SIGSEGV (SI_KERNEL); a run's own workers: the tree test above
    cfg = train_config("tiny", data=str(small_data), epochs=1, batch_size=16, workers=0,
                       models_dir=str(tmp_path / "models"), profiles_dir=str(tmp_path / "profiles"))
    said = []
    with stranger_process():  # not our child: a run's own children are its own
        metrics = train(cfg, model_config("tiny", fusion="late"), progress=False, log=said.append)
    [epoch] = metrics["history"]
    assert epoch["contention"]["other_processes_cores"] >= 0.4 and contention.busy(metrics["contention"])
    assert any(line.startswith("epoch 1/1") and "[busy neighbour: others " in line for line in said)
    write_report([tmp_path / "profiles"], tmp_path / "report")
    assert "Trained beside a busy neighbour" in (tmp_path / "report" / "report.md").read_text()


@pytest.mark.skipif(len(psutil.Process().cpu_affinity() or []) < 2, reason="needs two CPUs to pin apart")
def test_a_process_on_other_cpus_is_no_neighbour():
    me = psutil.Process()
    allowed, before = me.cpu_affinity(), {child.pid for child in me.children()}
    try:
        me.cpu_affinity([allowed[0]])  # this process may run on one CPU only
        with contention.neighbours(1):
            [spinner] = [child for child in me.children() if child.pid not in before]
            seen = {}
            for cpu in (allowed[1], allowed[0]):  # on the other CPU, then on ours
                spinner.cpu_affinity([cpu])
                time.sleep(0.2)
                with contention.watch() as seen[cpu]:
                    time.sleep(1.0)
    finally:
        me.cpu_affinity(allowed)
    assert seen[allowed[1]]["cores"] == 1 and seen[allowed[1]]["other_processes_cores"] < 0.3
    assert seen[allowed[0]]["other_processes_cores"] >= 0.6
