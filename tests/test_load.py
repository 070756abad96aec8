"""`fusionprof load` and `fusionprof recommend`: the batching SUT's latencies against a backend that sleeps a known
time, LoadGen's INVALID verdict kept as a verdict, one-line errors, accuracy mode against a trained checkpoint,
and recommendations from hand-written records."""

import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_run

from fusionprof import SCHEMA_VERSION
from fusionprof.cli import cli
from fusionprof.errors import UserError
from fusionprof.load import describe
from fusionprof.loadgen import BatchingSUT, LoadSettings, find_max_qps, next_rate, run_loadgen
from fusionprof.measure import P99_MIN_SAMPLES
from fusionprof.recommend import recommend
from fusionprof.records import CPU_TIMING, LatencyRow, Timing

SLEEP_MS = 5.0
QUICK = dict(min_duration_s=1.5, min_query_count=40)


class SleepingBackend:
    """Answers a batch after a known time, whatever its size: what a batch costs is then known exactly."""

    def __init__(self, ms: float):
        self.seconds = ms / 1e3

    def run(self, images, *rest) -> np.ndarray:
        deadline = time.perf_counter() + self.seconds
        time.sleep(max(0.0, self.seconds - 1e-3))  # a VM wakes a sleeper 0.3-0.5 ms late: spin the last millisecond
        while time.perf_counter() < deadline:
            pass
        return np.zeros(len(images), np.float32)


def ms(run, field: str) -> float:
    return run.loadgen[field] / 1e6


def harness_floor_ms(tmp_path, scenario: str = "server", **settings) -> float:
    """The timing tests check the harness to 1 ms above what doing nothing costs here: the same LoadGen run with a
    backend that returns at once. That floor is LoadGen's issue thread and the batcher's worker waking up: 0.01 ms
    back to back (single-stream), ~0.5 ms on a quiet 2-core VM when they sleep between queries (Server at 20 QPS),
    more when other processes take every core. Skip, saying how much, where it is over 1.5 ms: too busy to check."""
    settings = settings or dict(target_qps=20, p99_ms=50)
    with BatchingSUT(lambda x: np.zeros(len(x), np.float32), sample_inputs) as sut:
        probe = run_loadgen(sut, 64, LoadSettings(scenario, **QUICK, **settings), tmp_path / "no-op")
    floor_ms = ms(probe, "result_50.00_percentile_latency_ns")
    if floor_ms > 1.5:
        pytest.skip(f"a no-op backend's median latency is {floor_ms:.1f} ms here ({scenario}; load average "
                    f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores): too busy to check timing to 1 ms")
    return floor_ms


def sample_inputs(indices: np.ndarray) -> tuple:
    return (indices,)


@pytest.mark.parametrize("scenario, settings", [("single-stream", dict(expected_latency_ms=SLEEP_MS / 2)),
                                                ("server", dict(target_qps=20, p99_ms=50))])
@pytest.mark.parametrize("max_batch, timeout_ms", [(1, 0.0), (8, 3.0)])
def test_sleeping_backend_gives_its_latency(tmp_path, scenario, settings, max_batch, timeout_ms):
    """At low load a request waits for nothing but the batch timeout (it never fills), then the backend's sleep."""
    floor_ms = harness_floor_ms(tmp_path, scenario, **settings)
    with BatchingSUT(SleepingBackend(SLEEP_MS).run, sample_inputs, max_batch, timeout_ms) as sut:
        run = run_loadgen(sut, 64, LoadSettings(scenario, **QUICK, **settings), tmp_path)
    expected = floor_ms + SLEEP_MS + timeout_ms
    # never faster than the work (a sample that joins a waiting batch waits less than the timeout; timer slack 0.2)
    assert ms(run, "result_min_latency_ns") >= SLEEP_MS - 0.2
    assert ms(run, "result_50.00_percentile_latency_ns") == pytest.approx(expected, abs=1.0)
    assert sum(size * n for size, n in run.batch_sizes.items()) == run.loadgen["result_query_count"]
    for name in ("mlperf_log_summary.txt", "mlperf_log_detail.txt"):
        assert (tmp_path / name).exists()
    # the batcher's own times: a sample waits the batch timeout (or nothing), then is served in the backend's 5 ms;
    # its whole time in the SUT is inside LoadGen's figure for it, so no percentile of it is larger
    inside = run.breakdown
    assert inside["samples"] == run.loadgen["result_query_count"]
    assert inside["served_ms"]["p50"] == pytest.approx(SLEEP_MS, abs=0.3)
    assert inside["queued_ms"]["p50"] == pytest.approx(timeout_ms + floor_ms / 2, abs=1.0)
    quantiles = (("p50", "result_50.00_percentile_latency_ns"),) + (  # a p99 from 100 samples up only
        (("p99", "result_99.00_percentile_latency_ns"),) if inside["samples"] >= P99_MIN_SAMPLES else ())
    for q, field in quantiles:
        assert inside["queued_ms"][q] < inside["in_sut_ms"][q] <= ms(run, field)
    p99 = inside["served_ms"]["p99"]
    assert f"served {inside['served_ms']['p50']:.2f} / {'–' if p99 is None else f'{p99:.2f}'} ms" in describe(run)


def test_the_batchers_p99_needs_as_many_samples_as_every_p99(tmp_path):
    """The SUT's own queued / served times have a p99 only from P99_MIN_SAMPLES samples, as every p99 fusionprof
    reports: from 25 it is the largest sample or so, not a percentile. The line and the report say "–"."""
    with BatchingSUT(SleepingBackend(1.0).run, sample_inputs) as sut:
        run = run_loadgen(sut, 16, LoadSettings("single-stream", expected_latency_ms=1.0, min_duration_s=0.02,
                                                min_query_count=25), tmp_path)
    inside = run.breakdown
    assert inside["samples"] < P99_MIN_SAMPLES and "needs at least 100 samples" in inside["p99_note"]
    assert all(inside[part]["p99"] is None and inside[part]["p50"] > 0 for part in ("queued_ms", "served_ms",
                                                                                      "in_sut_ms"))
    assert f"queued {inside['queued_ms']['p50']:.2f} / – ms" in describe(run)


def test_queueing_is_counted_and_batching_absorbs_it(tmp_path):
    """Offline hands every sample over at once: unbatched, the n-th waits n sleeps; batched, 8 share one."""
    harness_floor_ms(tmp_path)
    backend = SleepingBackend(SLEEP_MS)
    rates = {}
    for max_batch in (1, 8):
        with BatchingSUT(backend.run, sample_inputs, max_batch) as sut:
            run = run_loadgen(sut, 64, LoadSettings("offline", expected_qps=1e3 / SLEEP_MS * max_batch * 1.5,
                                                    **QUICK), tmp_path / str(max_batch))
        assert run.valid, run.invalid_reasons
        rates[max_batch] = run.samples_per_s
        assert max(run.batch_sizes) == max_batch
        # every sample is served in one 5 ms call and all arrived at once: the one 99 % through the queue waited
        # for the batches ahead of it, 8 times fewer of them when 8 share each
        inside = run.breakdown
        assert inside["served_ms"]["p50"] == pytest.approx(SLEEP_MS, abs=0.3)
        batches_ahead = 0.99 * inside["samples"] / max_batch
        assert inside["queued_ms"]["p99"] == pytest.approx(batches_ahead * SLEEP_MS, rel=0.15)
    assert rates[1] == pytest.approx(1e3 / SLEEP_MS, rel=0.15)
    assert rates[8] > 5 * rates[1]


def test_overload_is_invalid_and_has_no_figures(tmp_path):
    """A 5 ms backend offered 1000 QPS cannot keep p99 under 10 ms: INVALID, with LoadGen's reasons, no number."""
    with BatchingSUT(SleepingBackend(SLEEP_MS).run, sample_inputs) as sut:
        run = run_loadgen(sut, 64, LoadSettings("server", target_qps=1000, p99_ms=10, **QUICK), tmp_path)
    assert run.valid is False and run.validity == "INVALID"
    assert any("latency constraint not met" in reason for reason in run.invalid_reasons)
    assert run.p99_ms is None and run.p50_ms is None and run.samples_per_s is None
    assert run.loadgen["result_99.00_percentile_latency_ns"] > 10e6  # LoadGen's raw figure is kept, apart
    record = run.to_dict()
    assert record["p99_ms"] is None and record["validity"] == "INVALID"
    # the batcher's own times say why: 5 ms calls, and a queue that grew (1000 QPS into 200 a second, for seconds).
    # A served p99 of 9.6-9.8 ms was measured here with two other processes spinning on the 2 cores (one scheduler
    # time slice on top of the call) and 12.0 ms in a CI run: the tail of the calls is the machine's, the queue's
    # hundredfold lead is the overload's
    inside = run.breakdown
    assert inside["served_ms"]["p50"] == pytest.approx(SLEEP_MS, abs=0.5)
    assert inside["served_ms"]["p99"] < 4 * SLEEP_MS < 100 * SLEEP_MS < inside["queued_ms"]["p99"]
    line = describe(run)
    assert line.startswith("INVALID (") and f"[in the SUT p50 / p99: queued {inside['queued_ms']['p50']:.2f}" in line


def test_backend_errors_surface_after_the_run(tmp_path):
    def broken(*inputs):
        raise RuntimeError("no such kernel")

    with BatchingSUT(broken, sample_inputs) as sut, pytest.raises(RuntimeError, match="no such kernel"):
        run_loadgen(sut, 16, LoadSettings("single-stream", expected_latency_ms=1, min_duration_s=0.2,
                                          min_query_count=5), tmp_path)


def test_a_batcher_error_surfaces_instead_of_hanging_loadgen(tmp_path):
    """The worker's own wait failing (an infinite timeout overflows the clock) is raised after the run: every query
    was still answered, so LoadGen finished. Run in a thread: a hang fails the test instead of stopping the suite."""
    outcome = {}

    def attempt():
        with BatchingSUT(lambda x: np.zeros(len(x), np.float32), sample_inputs, max_batch=4) as sut:
            sut.timeout_s = float("inf")  # past the constructor's check: what any failure in the batcher does
            try:
                run_loadgen(sut, 16, LoadSettings("server", target_qps=100, p99_ms=50, min_duration_s=0.3,
                                                  min_query_count=10), tmp_path)
            except OverflowError as e:
                outcome["error"] = e

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "LoadGen hung after the batcher's worker failed"
    assert isinstance(outcome.get("error"), OverflowError)


def _mllog(key, value, is_error=False, is_warning=False) -> str:
    """One detail-log line as LoadGen writes it."""
    return ":::MLLOG " + json.dumps({"key": key, "value": value, "time_ms": 1.0, "namespace": "mlperf::logging",
                                     "event_type": "POINT_IN_TIME", "metadata": {
                                         "is_error": is_error, "is_warning": is_warning, "file": "logging.cc"}})


def test_a_run_loadgen_logged_an_error_in_is_invalid_and_says_which(tmp_path):
    """LoadGen's is_error entries are faults of the run itself (samples never or twice completed, clocks drifting
    over 1 %, a run ended early), and MLPerf's submission checker rejects a run that has any: a run LoadGen called
    VALID with one is INVALID here, the error named among its reasons and kept in its errors; warnings change
    nothing."""
    from fusionprof.loadgen import parse_logs

    incomplete = "Encountered incomplete samples at the end of a series of queries. count: 3"
    lines = [_mllog("result_validity", "VALID"), _mllog("result_perf_constraints_met", True),
             _mllog("effective_target_qps", 100.0), _mllog("result_99.00_percentile_latency_ns", 20e6),
             _mllog("warning_generic_message", "PerfClock and system_clock differ by more than 0.1%!", is_warning=True)]
    (tmp_path / "mlperf_log_detail.txt").write_text("\n".join(lines) + "\n")
    settings = LoadSettings("server", target_qps=100, p99_ms=50)
    clean = parse_logs(tmp_path, settings, {1: 10})
    assert clean.valid and clean.errors == [] and clean.p99_ms == pytest.approx(20.0) and len(clean.warnings) == 1
    lines.append(_mllog("error_runtime", incomplete, is_error=True))
    (tmp_path / "mlperf_log_detail.txt").write_text("\n".join(lines) + "\n")
    run = parse_logs(tmp_path, settings, {1: 10})
    assert run.valid is False and run.validity == "INVALID" and run.p99_ms is None
    assert run.errors == run.invalid_reasons == [f"error_runtime: {incomplete}"]
    assert run.to_dict()["errors"] == [f"error_runtime: {incomplete}"]


@pytest.mark.parametrize("settings, message", [
    (dict(scenario="server", target_qps=10, p99_ms=math.inf), "--p99-ms must be a finite number, got inf"),
    (dict(scenario="server", target_qps=math.inf, p99_ms=50), "--qps must be a finite number, got inf"),
    (dict(scenario="offline", min_duration_s=math.inf), "--min-duration must be a finite number, got inf"),
    (dict(scenario="server", target_qps=math.nan, p99_ms=50), "--qps must be above 0, got nan"),
    (dict(scenario="server", target_qps=10), "--p99-ms must be above 0, got nothing"),
])
def test_settings_must_be_finite(settings, message):
    with pytest.raises(UserError) as error:
        LoadSettings(**settings).check()
    assert str(error.value) == message
    with pytest.raises(UserError, match="--batch-timeout-ms must be 0 or more and finite, got inf"):
        BatchingSUT(lambda x: x, sample_inputs, max_batch=4, timeout_ms=math.inf)


def test_bisection_converges_on_the_largest_valid_rate():
    assert next_rate(100.0, None) == 200.0 and next_rate(100.0, 200.0) == 150.0 and next_rate(95.0, 100.0) is None
    capacity = 137.0

    class Verdict:
        def __init__(self, qps):
            self.valid, self.settings, self.loadgen = qps <= capacity, {"target_qps": qps}, {}

    best, runs = find_max_qps(Verdict, first_qps=50.0, max_trials=12, tolerance=0.05)
    assert best.settings["target_qps"] <= capacity < min(r.settings["target_qps"] for r in runs if not r.valid)
    assert best.settings["target_qps"] >= 0.95 * capacity * 0.95
    best, runs = find_max_qps(lambda qps: Verdict(qps * 1e6), first_qps=50.0, max_trials=4)
    assert best is None and len(runs) == 4  # nothing VALID: it halves, then gives up


def test_a_rate_loadgen_could_not_decide_runs_again_with_the_queries_it_asked_for():
    """INVALID only because early stopping wanted more queries (13 of 1900 over the target, p99 within it): no upper
    bound. The rate runs again with LoadGen's count; a hopeless one (more than 4× the queries) does not."""
    capacity, calls = 150.0, []

    class Run:
        def __init__(self, qps, min_queries=None):
            calls.append((qps, min_queries))
            undecided = qps <= capacity * 1.3 and min_queries is None and qps > capacity
            self.settings, self.valid = {"target_qps": qps}, qps <= capacity * 1.3 and not undecided
            self.loadgen = {"result_perf_constraints_met": qps <= capacity * 1.3, "result_min_duration_met": True,
                            "result_min_queries_met": True, "early_stopping_met": self.valid,
                            "result_query_count": 1900, "early_stopping_result":
                            " * Run unsuccessful.  * Processed 1900 queries.  * Would need to run at least "
                            f"{509 if qps <= capacity * 1.3 else 24564} more queries,  with the run being successful"}

    best, runs = find_max_qps(Run, first_qps=180.0, max_trials=3)
    assert calls[:2] == [(180.0, None), (180.0, 2409)] and runs[1].valid  # decided, VALID: the search goes up
    assert best.settings["target_qps"] == 180.0 and calls[2] == (360.0, None) and len(runs) == 3
    from fusionprof.loadgen import queries_to_decide
    assert queries_to_decide(runs[0]) == 2409 and queries_to_decide(runs[1]) is None
    assert queries_to_decide(runs[2]) is None  # over the target: INVALID, whatever more queries would say
    runs[0].loadgen["early_stopping_result"] = " * Would need to run at least 24564 more queries"
    assert queries_to_decide(runs[0]) is None  # 14× the queries it ran: as good as over the target


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


MID_ORT = ["--fusion", "mid", "--backend", "onnxruntime"]


@pytest.mark.parametrize("args, message", [
    ([*MID_ORT, "--scenario", "server", "--qps", "0"], "--qps must be above 0, got 0"),
    ([*MID_ORT, "--scenario", "server", "--qps", "10,-5"], "--qps must be above 0, got -5"),
    ([*MID_ORT, "--scenario", "server", "--qps", "10", "--batch-timeout-ms", "-1"],
     "--batch-timeout-ms must be 0 or more"),
    ([*MID_ORT, "--scenario", "server", "--qps", "10", "--max-batch", "0"], "--max-batch must be at least 1"),
    ([*MID_ORT, "--scenario", "burst"], "unknown scenario 'burst'; choose from server, offline, single-stream"),
    ([*MID_ORT, "--scenario", "server"], "needs --qps Q,... or --find-max-qps"),
    ([*MID_ORT, "--scenario", "server", "--find-max-qps", "--accuracy"],
     "--accuracy checks the answers of one run; --find-max-qps searches for a rate: run them separately"),
    ([*MID_ORT, "--scenario", "server", "--qps", "100,50,100"],
     "--qps 100 is given twice: each rate is one LoadGen run"),
    ([*MID_ORT, "--scenario", "server", "--qps", "100,100.0000001"], "--qps 100 is given twice"),  # one log folder
    ([*MID_ORT, "--scenario", "server", "--accuracy", "--qps", "10,20"],
     "--accuracy checks the answers of one run at one rate; --qps gives 2: give one"),
    ([*MID_ORT, "--scenario", "offline", "--qps", "5"], "--qps and --find-max-qps are for --scenario server"),
    (["--fusion", "mid", "--backend", "nope", "--scenario", "offline"], "unknown backend 'nope'"),
    (["--fusion", "nope", "--backend", "onnxruntime", "--scenario", "offline"], "unknown fusion 'nope'"),
    ([*MID_ORT, "--scenario", "offline", "--device", "cuda:64"], "--device cuda:64"),
    ([*MID_ORT, "--scenario", "server", "--qps", "inf"], "--qps must be a finite number, got inf"),
    ([*MID_ORT, "--scenario", "server", "--qps", "10", "--p99-ms", "inf"], "--p99-ms must be a finite number, got inf"),
    ([*MID_ORT, "--scenario", "offline", "--min-duration", "inf"], "--min-duration must be a finite number, got inf"),
    ([*MID_ORT, "--scenario", "offline", "--batch-timeout-ms", "inf"],
     "--batch-timeout-ms must be 0 or more and finite, got inf"),
    ([*MID_ORT, "--scenario", "single-stream", "--max-batch", "4", "--batch-timeout-ms", "2"],
     "--max-batch 4 with --scenario single-stream would only add --batch-timeout-ms to every query"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, message):
    code, out = run_cli("load", *args, "--out", tmp_path)
    assert code != 0 and out.startswith("Error: ") and message in out and out.count("\n") == 1, out
    assert not list(tmp_path.rglob("*.json"))  # nothing written, nothing loaded


def test_an_unavailable_backend_is_a_one_line_error(tmp_path):
    from fusionprof.backends import BACKENDS
    from fusionprof.runtime import resolve_device

    unavailable = [name for name in BACKENDS.names() if not BACKENDS.get(name).available(resolve_device("cpu"))[0]]
    if not unavailable:
        pytest.skip("every backend runs here")
    code, out = run_cli("load", "--fusion", "mid", "--backend", unavailable[0], "--scenario", "offline")
    assert code != 0 and out.startswith(f"Error: backend {unavailable[0]} is unavailable: ") and out.count("\n") == 1


# --------------------------------------------------------------------------- recommend, from hand-written records


def _env(host="box"):
    return {"host": host, "cpu_model": "Test CPU", "gpus": []}


def _server_run(qps, valid, p99_ms):
    return {"scenario": "server", "accuracy": False, "valid": valid, "validity": "VALID" if valid else "INVALID",
            "invalid_reasons": [] if valid else ["latency constraint not met"], "settings": {"target_qps": qps},
            "loadgen": {"result_99.00_percentile_latency_ns": p99_ms * 1e6, "result_validity":
                        "VALID" if valid else "INVALID"}, "batch_sizes": {"1": 10}, "logs": "x"}


def _checkpoint(fusion):
    return f"/m/tiny-{fusion}/checkpoint.pt"


def _load_record(fusion, max_batch, runs, backend="onnxruntime", scenario="server", max_qps=None, precision="fp32",
                 backend_info=None, p99_target_ms=50.0, trained=True):
    return {"schema_version": SCHEMA_VERSION, "kind": "load", "created": "t", "preset": "tiny", "fusion": fusion,
            "backend": backend, "precision": precision, "device": "cpu", "scenario": scenario, "max_batch": max_batch,
            "batch_timeout_ms": 2.0, "p99_target_ms": p99_target_ms,
            "model": {"weights": "trained", "checkpoint": _checkpoint(fusion)} if trained else {"weights": "untrained"},
            "backend_info": backend_info or {}, "environment": _env(),
            "config": {"find_max_qps": max_qps is not None}, "runs": runs, "max_qps": max_qps}


def _train_record(fusion, accuracy, precision="fp32"):
    return {"schema_version": SCHEMA_VERSION, "kind": "train", "preset": "tiny", "fusion": fusion,
            "checkpoint": _checkpoint(fusion), "train_config": {"precision": precision}, "environment": _env(),
            "test": {"accuracy": accuracy}}


def _write(folder, name, record):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def records(tmp_path):
    for fusion, acc in (("mid", 0.97), ("late", 0.91)):
        _write(tmp_path, f"tiny-{fusion}/metrics.json", _train_record(fusion, acc))
    _write(tmp_path, "box/load-server-mid-1.json", _load_record("mid", 1, [
        _server_run(40, True, 20.0), _server_run(80, False, 90.0)]))
    _write(tmp_path, "box/load-server-mid-8.json", _load_record("mid", 8, [
        _server_run(40, True, 25.0), _server_run(160, True, 45.0), _server_run(320, False, 70.0)], max_qps=160))
    offline = {**_server_run(None, True, 0), "scenario": "offline",
               "loadgen": {"result_samples_per_second": 250.0, "result_validity": "VALID"}}
    _write(tmp_path, "box/load-offline-mid-8.json", _load_record("mid", 8, [offline], scenario="offline"))
    _write(tmp_path, "box/load-server-late-1.json", _load_record("late", 1, [
        _server_run(300, True, 10.0), _server_run(600, True, 60.0)]))
    _write(tmp_path, "box/latency-tiny-cpu.json", _latency_record([
        _latency_row("mid", "torch", 1, [4.0] * 150 + [6.0] * 10),
        _latency_row("mid", "torch", 8, [2.0] * 200, model={"checkpoint": _checkpoint("mid")}),
        {"fusion": "late", "backend": "tensorrt", "batch_size": 1, "status": "unavailable: no GPU"},
        _latency_row("late", "torch", 1, [1.0] * 20)]))  # too few calls for a p99
    return tmp_path


def _latency_row(fusion, backend, batch, samples_ms, **fields):
    """A row as the sweep writes it: the summary of ``samples_ms`` (p99 only from 100 samples up)."""
    return LatencyRow(fusion, backend, "ok", batch, host=Timing.of(samples_ms, CPU_TIMING), flops_per_sample=1e6,
                      **fields).to_dict()


def _latency_record(rows):
    return {"schema_version": SCHEMA_VERSION, "kind": "latency", "created": "t", "environment": _env(),
            "config": {"preset": "tiny", "device": "cpu", "precision": "fp32"}, "reference_matmul": {}, "rows": rows}


def test_recommend_picks_the_most_headroom_that_meets_the_targets(records):
    result = recommend(records, p99_ms=50, qps=100, min_accuracy=0.95)
    [best] = result.chosen  # late serves more but is not accurate enough; unbatched mid never served 100 VALID
    assert (best.fusion, best.batching) == ("mid", "batch≤8 wait≤2ms")
    assert best.max_qps == 160 and best.p99_ms == 45.0 and best.accuracy == 0.97
    assert best.source.endswith("load-server-mid-8.json") and best.accuracy_source.endswith("tiny-mid/metrics.json")
    assert best.accuracy_source.startswith("training run: ")
    result = recommend(records, p99_ms=50, qps=100)  # without the accuracy floor late's headroom wins
    assert [c.fusion for c in result.chosen] == ["late", "mid"] and result.chosen[0].max_qps == 300
    assert {c.fusion for c in result.front} == {"mid", "late"}


def test_a_search_says_between_which_rates_the_limit_lies(records, tmp_path):
    """The largest VALID rate and the smallest INVALID one above it, in the record, the load report and recommend's
    choices; a rate run again with the queries LoadGen asked for counts by its last run (180: VALID after all)."""
    from fusionprof.load_report import load_section
    from fusionprof.loadgen import LoadRecord

    runs = [_server_run(180, False, 45.0), _server_run(180, True, 46.0), _server_run(360, False, 90.0),
            _server_run(270, False, 60.0), _server_run(225, True, 48.0)]
    path = _write(tmp_path, "box/load-server-early-8.json", _load_record("early", 8, runs, max_qps=225))
    record = LoadRecord.from_dict(json.loads(path.read_text()), path)
    assert record.invalid_qps == 270 and record.to_dict()["invalid_qps"] == 270
    assert LoadRecord.from_dict(_load_record("early", 8, runs[:2] + runs[3:]), path).invalid_qps is None  # no search
    best = next(b for b in load_section([record], tmp_path) if b[0] == "table" and "INVALID above" in b[1])
    assert [row[best[1].index("max VALID QPS")] for row in best[2]] == ["225.0"]
    assert [row[best[1].index("INVALID above")] for row in best[2]] == ["270.0"]
    by = {c.fusion: c for c in recommend(records, p99_ms=50, qps=100).chosen}
    assert (by["early"].max_qps, by["early"].invalid_qps) == (225, 270)
    assert (by["late"].max_qps, by["late"].invalid_qps) == (300, 600)  # VALID, but its p99 (60 ms) missed 50 ms
    assert (by["mid"].max_qps, by["mid"].invalid_qps) == (160, 320)
    out = CliRunner().invoke(cli, ["recommend", "--p99-ms", "50", "--qps", "100", "--profiles", str(records)]).output
    assert "max 225 QPS (270 missed the target)" in out and "max 300 QPS (600 missed the target)" in out


def test_recommend_without_a_rate_uses_latency_records_too(records):
    result = recommend(records, p99_ms=8)
    assert [(c.fusion, c.backend, c.p99_ms) for c in result.chosen] == [("mid", "torch", 6.0)]
    assert "latency" in result.chosen[0].source and "one request at a time" in result.chosen[0].batching


def test_recommend_names_a_gpu_hosts_cpu_figures_by_its_cpu_and_finds_the_models_accuracy(tmp_path):
    """A CPU sweep on a GPU host: its choice is named by the CPU it ran on (not the GPU it did not use), and the
    model trained on that host's GPU (a record without a checkpoint hash: matched by machine) still gives it an
    accuracy."""
    gpu_host = {"host": "box", "cpu_model": "Test CPU", "gpus": [{"name": "NVIDIA H200"}]}
    _write(tmp_path, "tiny-mid/metrics.json", {**_train_record("mid", 0.97), "environment": gpu_host,
                                               "train_config": {"precision": "fp32", "device": "cuda:0"}})
    _write(tmp_path, "box/latency-tiny-cpu.json", {**_latency_record([_latency_row(
        "mid", "torch", 1, [4.0] * 100, model={"checkpoint": _checkpoint("mid")})]), "environment": gpu_host})
    [choice] = recommend(tmp_path, p99_ms=10).chosen
    assert (choice.machine, choice.device, choice.accuracy) == ("box (Test CPU)", "cpu", 0.97)


def test_recommend_holds_an_old_records_p99_to_the_minimum_samples_rule(tmp_path):
    """A record written before the rule carries a "p99" of 11 calls (the largest sample): the report shows none,
    and recommend must not rank by it either."""
    row = _latency_row("mid", "torch", 1, [3.0] * 11)
    row.update(p99_ms=3.0, p99_note=None)  # as an old sweep wrote it
    _write(tmp_path, "box/latency-old.json", _latency_record([row, _latency_row("late", "torch", 1, [5.0] * 100)]))
    assert [(c.fusion, c.p99_ms) for c in recommend(tmp_path, p99_ms=10).chosen] == [("late", 5.0)]


def test_recommend_says_plainly_when_nothing_qualifies(records, tmp_path):
    code, out = run_cli("recommend", "--p99-ms", "1", "--qps", "100", "--profiles", records)
    assert code == 0 and "no measured choice meets p99 ≤ 1 ms at 100 QPS" in out
    assert "fusionprof load --fusion mid --backend onnxruntime --scenario server --find-max-qps --p99-ms 1" in out
    (tmp_path / "empty").mkdir()
    code, out = run_cli("recommend", "--p99-ms", "50", "--qps", "100", "--profiles", tmp_path / "empty")
    assert code == 0 and "no load record can answer p99 ≤ 50 ms at 100 QPS" in out
    code, out = run_cli("recommend", "--p99-ms", "50", "--qps", "100", "--min-accuracy", "0.99", "--profiles", records)
    assert "none timed a model with a recorded test accuracy ≥ 0.99 in its precision" in out
    code, out = run_cli("recommend", "--p99-ms", "50", "--min-accuracy", "95", "--profiles", records)  # a percentage
    assert code != 0 and out.strip().splitlines()[-1] == ("Error: Invalid value for '--min-accuracy': must be between "
                                                          "0 and 1, got 95.0")
    code, out = run_cli("recommend", "--p99-ms", "50", "--qps", "100", "--device", "cuda:0", "--profiles", records)
    assert "no measured choice meets p99 ≤ 50 ms at 100 QPS on cuda:0" in out
    code, out = run_cli("recommend", "--p99-ms", "50", "--qps", "100", "--profiles", records)
    assert code == 0 and "late on onnxruntime" in out and "Pareto front" in out and "load-server-late-1.json" in out


def test_recommend_refuses_a_profiles_folder_that_does_not_exist(tmp_path):
    """A mistyped --profiles must not answer "nothing measured yet, run load" with exit 0."""
    code, out = run_cli("recommend", "--p99-ms", "50", "--profiles", tmp_path / "profils")
    assert code == 1 and out.strip() == f"Error: --profiles {tmp_path / 'profils'}: no such folder; give the folder " \
                                        "that holds the records"


def test_recommend_refuses_a_device_name_no_record_can_have(tmp_path):
    """``--device gpu`` is a usage error, not "nothing measured on gpu" with a suggestion to load on it."""
    for bad in ("gpu", "cuda:x", "cuda0"):
        code, out = run_cli("recommend", "--p99-ms", "50", "--device", bad, "--profiles", tmp_path)
        assert code == 2 and "is not a device name: use cpu or cuda:N" in out and "Traceback" not in out, out
    code, out = run_cli("recommend", "--p99-ms", "50", "--device", "cuda:1", "--profiles", tmp_path)
    assert code == 0, out


def test_recommend_keeps_each_threading_apart_and_its_best_run(tmp_path):
    """Spinning and sleeping onnxruntime threads, or another thread count, are other choices, each named; of two
    records of one choice the larger VALID rate counts, not the newer file (names sort by their time stamp)."""
    _write(tmp_path, "tiny-mid/metrics.json", _train_record("mid", 0.97))
    spin, sleep = {"intra_op_threads": 2, "spin_wait": True}, {"intra_op_threads": 2, "spin_wait": False}
    one_thread = {**spin, "intra_op_threads": 1}
    for stamp, info, qps, p99 in (("201407Z", spin, 655.6, 38.81), ("202009Z", sleep, 520.6, 32.45),
                                  ("203000Z", spin, 480.0, 30.0), ("204000Z", one_thread, 300, 20)):
        _write(tmp_path, f"box/load-server-mid-{stamp}.json",
               _load_record("mid", 16, [_server_run(qps, True, p99)], backend_info=info, max_qps=qps))
    result = recommend(tmp_path, p99_ms=50, qps=200)
    assert [(c.batching, c.max_qps) for c in result.chosen] == [
        ("batch≤16 wait≤2ms, spin-wait, 2 threads", 655.6), ("batch≤16 wait≤2ms, sleeping threads, 2 threads", 520.6),
        ("batch≤16 wait≤2ms, spin-wait, 1 thread", 300)]
    assert result.chosen[0].source.endswith("201407Z.json") and result.chosen[0].p99_ms == pytest.approx(38.81)
    code, out = run_cli("recommend", "--p99-ms", "50", "--qps", "200", "--profiles", tmp_path)
    assert code == 0 and "(fp32, batching: batch≤16 wait≤2ms, spin-wait, 2 threads)" in out.splitlines()[0]
    assert "[batch≤16 wait≤2ms, sleeping threads, 2 threads]" in out


def test_recommends_the_accuracy_of_the_model_it_timed_in_its_precision(tmp_path):
    """An int8 model is held to its own export gate (0.98 here), not its fp32 training run's 0.9805; openvino's int8
    to the gate of the NNCF IR it runs; a random-init model's accuracy is unknown, and unknown never passes."""
    _write(tmp_path, "tiny-early/metrics.json", _train_record("early", 0.9805))
    gate = {"exported_accuracy": 0.98}
    _write(tmp_path, "box/export-int8.json", {
        "schema_version": SCHEMA_VERSION, "kind": "export", "checkpoint": _checkpoint("early"), "fusion": "early",
        "format": "onnx", "precision": "int8", "status": "ok", "accuracy": gate, "environment": _env(),
        "onnx": {"openvino": {"loads": "nncf", "nncf": {"accuracy": {"exported_accuracy": 0.9805}}}}})
    trained = {"model": {"checkpoint": _checkpoint("early")}}
    for precision, rows in (("int8", [_latency_row("early", "onnxruntime", 1, [1.26] * 100, **trained),
                                      _latency_row("early", "openvino", 1, [4.07] * 100, **trained)]),
                            ("fp32", [_latency_row("early", "onnxruntime", 1, [3.36] * 100, **trained),
                                      _latency_row("early", "torch", 1, [0.5] * 100)])):  # random init
        record = _latency_record(rows)
        record["config"]["precision"] = precision
        _write(tmp_path, f"box/latency-{precision}.json", record)
    result = recommend(tmp_path, p99_ms=5, min_accuracy=0.9802)
    assert [(c.backend, c.precision, c.accuracy) for c in result.chosen] == [("onnxruntime", "fp32", 0.9805),
                                                                              ("openvino", "int8", 0.9805)]
    assert result.chosen[1].accuracy_source == f"NNCF IR of the int8 export: {tmp_path / 'box/export-int8.json'}"
    every = {(c.backend, c.precision): c.accuracy for c in recommend(tmp_path, p99_ms=5).chosen}
    assert every == {("torch", "fp32"): None, ("onnxruntime", "int8"): 0.98, ("onnxruntime", "fp32"): 0.9805,
                     ("openvino", "int8"): 0.9805}


def test_recommend_holds_a_backend_to_its_own_answers_where_an_accuracy_run_has_them(tmp_path):
    """openvino's bf16 runs an fp32 graph with a bf16 inference hint: its accuracy is what it answered in a LoadGen
    accuracy run (0.962), not the PyTorch training run's 0.973, which still stands for the torch backend."""
    _write(tmp_path, "tiny-mid/metrics.json", _train_record("mid", 0.973, precision="bf16"))
    accuracy_run = {**_load_record("mid", 1, [], backend="openvino", scenario="offline", precision="bf16"),
                    "accuracy": {"pairs": 2000, "answered": 2000, "loadgen_accuracy": 0.962,
                                 "backend_accuracy": 0.962, "matches": True}}
    path = _write(tmp_path, "box/load-accuracy-tiny-mid-openvino-bf16.json", accuracy_run)
    trained = {"model": {"checkpoint": _checkpoint("mid")}}
    record = _latency_record([_latency_row("mid", "openvino", 1, [2.0] * 100, **trained),
                              _latency_row("mid", "torch", 1, [4.0] * 100, **trained)])
    record["config"]["precision"] = "bf16"
    _write(tmp_path, "box/latency-bf16.json", record)
    result = recommend(tmp_path, p99_ms=5, min_accuracy=0.97)
    assert [(c.backend, c.accuracy) for c in result.chosen] == [("torch", 0.973)]
    chosen = {c.backend: c for c in recommend(tmp_path, p99_ms=5).chosen}
    assert chosen["openvino"].accuracy == 0.962
    assert chosen["openvino"].accuracy_source == f"openvino's own answers, LoadGen accuracy run: {path}"


def test_recommend_counts_only_runs_loadgen_judged_at_the_asked_target(tmp_path):
    """A run VALID against a 100 ms target says nothing of 50 ms, whatever p99 it measured; a run's own logged target
    (LoadGen's effective setting) is the one it was judged at."""
    loose = _load_record("mid", 8, [_server_run(300, True, 30.0)], p99_target_ms=100.0, max_qps=300)
    _write(tmp_path, "box/load-server-mid-loose.json", loose)
    result = recommend(tmp_path, p99_ms=50, qps=100)
    assert result.chosen == [] and "1 VALID run(s) measured a p99 within it, but LoadGen judged them against a " \
                                   "looser p99 target" in result.message
    judged = {**_server_run(200, True, 30.0), "settings": {"target_qps": 200, "target_latency_ns": 40_000_000}}
    _write(tmp_path, "box/load-server-mid-judged.json",
           _load_record("mid", 8, [judged], p99_target_ms=100.0, max_qps=200, backend="openvino"))
    assert [(c.backend, c.max_qps) for c in recommend(tmp_path, p99_ms=50, qps=100).chosen] == [("openvino", 200)]
    assert recommend(tmp_path, p99_ms=35, qps=100).chosen == []


def test_recommends_a_pareto_front_of_what_it_ranks_by(tmp_path):
    """With a rate, the front is accuracy against the VALID rate: a choice serving more at the same accuracy beats
    one with a lower p99 at a lower rate (without a rate the lower p99 wins)."""
    for fusion in ("mid", "late"):
        _write(tmp_path, f"tiny-{fusion}/metrics.json", _train_record(fusion, 0.97))
    _write(tmp_path, "box/load-server-mid.json", _load_record("mid", 8, [_server_run(160, True, 20.0)], max_qps=160))
    _write(tmp_path, "box/load-server-late.json", _load_record("late", 8, [_server_run(300, True, 45.0)], max_qps=300))
    assert [c.fusion for c in recommend(tmp_path, p99_ms=50, qps=100).front] == ["late"]
    assert [c.fusion for c in recommend(tmp_path, p99_ms=50).front] == ["mid"]


# --------------------------------------------------------------------------- a trained checkpoint, end to end


@pytest.mark.slow
def test_the_trained_accuracy_beside_an_accuracy_run_is_of_the_model_it_ran(tmp_path):
    """The run name's metrics.json can be another machine's training into the same path (a study's /tmp folder on
    the EPYC one day, on the Xeon the next): an accuracy run of the Xeon's model once quoted the EPYC's 97.1 %."""
    from fusionprof.load import trained_accuracy

    ckpt = tmp_path / "models" / "tiny-mid" / "checkpoint.pt"
    metrics = tmp_path / "profiles" / "tiny-mid" / "metrics.json"
    metrics.parent.mkdir(parents=True)
    here = {"host": "vm", "cpu_model": "Intel(R) Xeon(R) Processor", "cpu_isa": {"amx_bf16": True}}
    there = {"host": "vm", "cpu_model": "AMD EPYC", "cpu_isa": {"avx512_bf16": True}}
    source = {"weights": "trained", "checkpoint": str(ckpt), "checkpoint_hash": "h"}
    for written, expected in (({"environment": there}, None),  # no hash, another machine: maybe another model
                              ({"environment": here}, 0.973),  # this machine's, written before records named it
                              ({"environment": there, "checkpoint_hash": "h"}, 0.973),  # the hash decides
                              ({"environment": here, "checkpoint_hash": "g"}, None)):  # retrained since
        metrics.write_text(json.dumps({"checkpoint": str(ckpt), "test": {"accuracy": 0.973}, **written}))
        assert trained_accuracy(source, str(tmp_path / "profiles"), here) == expected, written
    assert trained_accuracy({"weights": "untrained"}, str(tmp_path / "profiles"), here) is None


def test_accuracy_mode_equals_the_checkpoints_accuracy(tmp_path, small_data):
    from fusionprof.config import model_config, train_config
    from fusionprof.train import train

    models, profiles = tmp_path / "models", tmp_path / "profiles"
    train(train_config("tiny", data=str(small_data), epochs=1, batch_size=16, models_dir=str(models),
                       profiles_dir=str(profiles), precision="fp32"),
          model_config("tiny", fusion="early"), progress=False, log=lambda s: None)
    code, out = run_cli("load", "--fusion", "early", "--backend", "onnxruntime", "--scenario", "offline",
                        "--accuracy", "--min-duration", "0.5", "--models", models, "--out", profiles, "--quiet")
    assert code == 0, out
    [path] = profiles.glob("*/load-accuracy-tiny-early-onnxruntime-fp32-*.json")
    record = json.loads(path.read_text())
    acc = record["accuracy"]
    assert acc["answered"] == acc["pairs"] > 0
    assert acc["matches"] and acc["loadgen_accuracy"] == acc["backend_accuracy"] and "equal" in out
    assert record["model"]["weights"] == "trained" and record["runs"][0]["validity"] == "accuracy"
    metrics = json.loads((profiles / "tiny-early" / "metrics.json").read_text())
    assert acc["trained_test_accuracy"] == metrics["test"]["accuracy"]  # this model's own training record
    assert record["config"]["spin_wait"] is True and record["backend_info"]["spin_wait"] is True  # the default
    # the server finds a rate on the same checkpoint, and every trial keeps LoadGen's logs
    code, out = run_cli("load", "--fusion", "early", "--backend", "onnxruntime", "--scenario", "server",
                        "--find-max-qps", "--p99-ms", "200", "--max-batch", "4", "--batch-timeout-ms", "2",
                        "--min-duration", "1", "--min-queries", "40", "--no-spin-wait", "--models", models,
                        "--out", profiles, "--quiet")
    assert code == 0, out
    [path] = profiles.glob("*/load-server-tiny-early-onnxruntime-fp32-*.json")
    record = json.loads(path.read_text())
    assert record["kind"] == "load" and record["schema_version"] == SCHEMA_VERSION
    assert record["environment"]["host"] == path.parent.name and record["batching"] == "batch≤4 wait≤2ms"
    # with --no-spin-wait onnxruntime's pool threads sleep between calls, as the session itself says
    assert record["config"]["spin_wait"] is False and record["backend_info"]["spin_wait"] is False
    for run in record["runs"]:
        assert (path.with_suffix("") / run["logs"].split(path.stem + "/")[1] / "mlperf_log_detail.txt").exists()
        assert (run["p99_ms"] is None) == (not run["valid"])


def test_int8_under_load_runs_the_quantized_export_the_sweep_runs(tmp_path, small_data):
    """``load --precision int8``: the statically quantized graph, calibrated and checked as the latency sweep makes
    it, answering LoadGen with its own decisions; a backend without int8 is a one-line error."""
    from fusionprof.config import model_config, train_config
    from fusionprof.train import train

    models, profiles = tmp_path / "models", tmp_path / "profiles"
    train(train_config("tiny", data=str(small_data), epochs=1, batch_size=16, models_dir=str(models),
                       profiles_dir=str(profiles), precision="fp32"),
          model_config("tiny", fusion="late"), progress=False, log=lambda s: None)
    code, out = run_cli("load", "--fusion", "late", "--backend", "torch", "--scenario", "offline", "--precision",
                        "int8", "--models", models, "--out", profiles, "--quiet")
    assert code != 0 and out == "Error: torch runs fp32 or bf16 on cpu, not int8\n"
    code, out = run_cli("load", "--fusion", "late", "--backend", "onnxruntime", "--scenario", "offline", "--accuracy",
                        "--precision", "int8", "--min-duration", "0.5", "--models", models, "--out", profiles,
                        "--quiet")
    assert code == 0, out
    [path] = profiles.glob("*/load-accuracy-tiny-late-onnxruntime-int8-*.json")
    record = json.loads(path.read_text())
    acc = record["accuracy"]
    assert record["precision"] == "int8" and record["backend_info"]["model"].endswith(".int8.onnx")
    assert acc["answered"] == acc["pairs"] > 0 and acc["matches"]


def _timed_row(fusion, backend, batch, mean_ms):
    timing = dict(n=100, p50_ms=mean_ms, p90_ms=mean_ms, p99_ms=mean_ms, mean_ms=mean_ms, std_ms=0.0, cv=0.0,
                  min_ms=mean_ms, max_ms=mean_ms, samples_ms=[mean_ms], timing="host")
    return {"fusion": fusion, "backend": backend, "batch_size": batch, "status": "ok", **timing}


def test_load_section_compares_offline_with_batches_the_batcher_forms_and_names_threads(tmp_path):
    """Offline at max batch 8 is set beside the sweep's best at batch ≤ 8 of that machine and device (not batch 32's,
    nor another machine's); labels say spin or sleep and threads; SingleStream runs get their own table."""
    from fusionprof.load_report import load_section
    from fusionprof.loadgen import LoadRecord
    from fusionprof.records import LatencyRecord

    spin = {"intra_op_threads": 2, "spin_wait": True}
    offline = {**_server_run(None, True, 0), "scenario": "offline",
               "loadgen": {"result_samples_per_second": 900.0, "result_validity": "VALID"}}
    single = {**_server_run(None, True, 0), "scenario": "single-stream",
              "loadgen": {"result_50.00_percentile_latency_ns": 2e6, "result_90.00_percentile_latency_ns": 3e6,
                          "result_99.00_percentile_latency_ns": 4.5e6, "result_qps_without_loadgen_overhead": 480.0,
                          "result_validity": "VALID"}}
    loads = [LoadRecord.from_dict(_load_record("mid", 8, [offline], scenario="offline", backend_info=spin), "o.json"),
             LoadRecord.from_dict(_load_record("mid", 1, [single], scenario="single-stream",
                                               backend_info={**spin, "spin_wait": False}), "s.json")]

    def sweep(host, device, rows):
        return LatencyRecord.from_dict({
            "schema_version": SCHEMA_VERSION, "kind": "latency", "created": "t", "environment": _env(host),
            "config": {"preset": "tiny", "device": device, "precision": "fp32"}, "reference_matmul": {},
            "rows": rows})
    latency = [sweep("box", "cpu", [_timed_row("mid", "onnxruntime", 4, 8.0), _timed_row("mid", "onnxruntime", 8, 10.0),
                                    _timed_row("mid", "onnxruntime", 32, 20.0), _timed_row("mid", "torch", 8, 5.0)]),
               sweep("box", "cuda:0", [_timed_row("mid", "onnxruntime", 8, 1.0)]),
               sweep("other", "cpu", [_timed_row("mid", "onnxruntime", 8, 2.0)])]
    tables = [b for b in load_section(loads, tmp_path, latency) if b[0] == "table"]
    [offline_row] = tables[0][2]
    assert offline_row[2] == "onnxruntime fp32 (batch≤8 wait≤2ms, spin-wait, 2 threads)"
    assert offline_row[3] == "900.0" and offline_row[5] == "800.0 (batch 8)"  # 8 / 10 ms; batch 32 ran 1600/s
    [single_row] = tables[1][2]
    assert tables[1][1][3:7] == ["p50 ms", "p90 ms", "p99 ms", "QPS"]
    assert single_row[0] == "box (Test CPU)" and single_row[2] == "onnxruntime fp32 (no batching, sleeping threads, " \
                                                                  "2 threads)"
    assert single_row[3:8] == ["2.00", "3.00", "4.50", "480.0", "VALID"]


def test_offline_is_set_beside_a_sweep_of_its_own_thread_count_and_names_that_sweep(tmp_path):
    """An Offline run on 1 thread is no match for a 2-thread sweep's samples/s (the AVX2 EPYC's tiny/mid: 386.5 beside
    588.7 from a sweep at 2 threads): the column takes only sweeps whose backend ran as many threads, and names the
    record its figure came from, since a machine's sweeps of several days are looked through."""
    from fusionprof.load_report import load_section
    from fusionprof.loadgen import LoadRecord
    from fusionprof.records import LatencyRecord

    offline = {**_server_run(None, True, 0), "scenario": "offline",
               "loadgen": {"result_samples_per_second": 386.5, "result_validity": "VALID"}}
    one_thread = {"intra_op_threads": 1, "torch_threads": 1}
    load = LoadRecord.from_dict(_load_record("mid", 16, [offline], scenario="offline", backend_info=one_thread),
                                tmp_path / "load-offline.json")

    def sweep(name, threads, mean_ms):
        row = {**_timed_row("mid", "onnxruntime", 16, mean_ms),
               "backend_info": {"intra_op_threads": threads, "torch_threads": threads, "spin_wait": True}}
        record = {"schema_version": SCHEMA_VERSION, "kind": "latency", "created": name, "environment": _env(),
                  "config": {"preset": "tiny", "device": "cpu", "precision": "fp32"}, "reference_matmul": {},
                  "rows": [row]}
        return LatencyRecord.from_dict(record, _write(tmp_path, f"box/latency-{name}.json", record))
    latency = [sweep("two-threads", 2, 16 / 588.7 * 1e3), sweep("one-thread", 1, 16 / 400.0 * 1e3)]
    [table] = [b for b in load_section([load], tmp_path, latency) if b[0] == "table"]
    [row] = table[2]
    assert row[3] == "386.5" and row[5] == "400.0 (batch 16, latency-one-thread.json)"
    # no sweep at its thread count: nothing to set beside it
    [table] = [b for b in load_section([load], tmp_path, latency[:1]) if b[0] == "table"]
    assert table[2][0][5] == "–"


def test_the_server_table_says_whether_a_tail_was_queueing_or_serving(tmp_path):
    """The batcher's p99s, queued / served, for every run that has them (an INVALID one's say why); – for a run
    recorded before."""
    from fusionprof.load_report import INSIDE, load_section
    from fusionprof.loadgen import LoadRecord

    inside = {"samples": 100, "queued_ms": {"p50": 0.1, "p99": 31.5}, "served_ms": {"p50": 4.0, "p99": 6.25},
              "in_sut_ms": {"p50": 4.2, "p99": 36.0}}
    runs = [{**_server_run(40, True, 40.0), "breakdown": inside}, {**_server_run(80, False, 90.0), "breakdown": inside},
            _server_run(20, True, 9.0)]
    record = LoadRecord.from_dict(_load_record("mid", 8, runs, max_qps=40), tmp_path / "r.json")
    assert record.runs[0].breakdown == inside and record.runs[2].breakdown == {}
    blocks = load_section([record], tmp_path)
    server = next(b for b in blocks if b[0] == "table")
    assert [row[server[1].index(INSIDE)] for row in server[2]] == ["–", "31.50 / 6.25", "31.50 / 6.25"]  # by rate
    assert any(b[0] == "p" and b[1].startswith(INSIDE) for b in blocks)


def test_load_plots_draw_one_series_per_setting_however_many_searches(tmp_path):
    """A benchmark's repeated searches of one setting are one bar (their median, their range drawn) and one legend
    entry, a busy neighbour's searches another; 39 searches lay out without matplotlib giving up on the figure."""
    import warnings

    from fusionprof.load_report import _bar_note, _grouped, _setting, load_section
    from fusionprof.loadgen import LoadRecord

    loud = {"seconds": 10.0, "other_processes_cores": 0.9, "steal_share": 0.0, "cores": 2}
    records = []
    for i in range(13):
        for max_batch, busy in ((1, False), (16, False), (16, True)):
            qps = 100.0 * max_batch ** 0.5 + i
            runs = [{**_server_run(qps, True, 30.0), **({"contention": loud} if busy else {})},
                    _server_run(2 * qps, False, 80.0)]
            records.append(LoadRecord.from_dict(_load_record("mid", max_batch, runs, max_qps=qps),
                                                tmp_path / f"{i}-{max_batch}-{busy}.json"))
    groups = _grouped(records, _setting, lambda r: r.max_qps)
    assert list(groups) == ["onnxruntime fp32 (no batching)", "onnxruntime fp32 (batch≤16 wait≤2ms)",
                            "onnxruntime fp32 (batch≤16 wait≤2ms) beside a busy neighbour"]
    assert [len(v) for v in groups.values()] == [13, 13, 13] and groups["onnxruntime fp32 (no batching)"][3] == 103.0
    assert _bar_note([300.0, None, 100.0, 200.0]) == "200 (median of 3; 1 none VALID)"  # never "median of 4"
    assert _bar_note([250.0]) == "250"
    # another model (a seed search of mid) is another bar, and a GPU's setting says so
    from fusionprof.load_report import _bar, _label

    seed = LoadRecord.from_dict({**_load_record("mid", 1, [], max_qps=9.0), "preset": "seed"}, tmp_path / "s.json")
    on_gpu = LoadRecord.from_dict({**_load_record("mid", 1, [], max_qps=9.0), "device": "cuda"}, tmp_path / "g.json")
    assert _bar(seed) == "seed/mid onnxruntime fp32 (no batching)" != _bar(records[0])
    assert _label(on_gpu) == "onnxruntime fp32 on cuda:0 (no batching)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Tight layout not applied" when a legend of 39 entries filled the figure
        images = [b[1] for b in load_section(records, tmp_path) if b[0] == "img"]
    assert [Path(name).name for name in images] == ["load-max-qps-box-test-cpu.png", "load-p99-box-test-cpu.png"]
    assert all((tmp_path / name).stat().st_size > 10_000 for name in images)


def test_load_section_reports_invalid_runs_as_invalid(records, tmp_path):
    from fusionprof.load_report import find_load_records, load_section

    out = tmp_path / "report-out"
    blocks = load_section(find_load_records([records]), out)
    server, best, offline = [b for b in blocks if b[0] == "table"]
    invalid = [row for row in server[2] if row[5].startswith("INVALID")]
    assert len(invalid) == 2 and all(row[6] == row[7] == "–" for row in invalid)  # no figure for INVALID runs
    assert [row[4] for row in best[2]] == ["160.0"] and offline[2][0][3] == "250.0"
    images = [b[1] for b in blocks if b[0] == "img"]
    assert len(images) == 3 and all((out / image).stat().st_size > 0 for image in images)


def test_the_accuracy_run_table_gives_percentages_as_the_rest_of_the_report_does(tmp_path):
    """LoadGen's and the backend's accuracy read "96.20%" as every accuracy in the report does (they were raw
    fractions, 0.962), and a run with unanswered pairs has no LoadGen accuracy: "–", not "None"."""
    from fusionprof.load_report import find_load_records, load_section

    for name, loadgen_accuracy, answered in (("all", 0.962, 2000), ("some", None, 1999)):
        _write(tmp_path, f"box/load-accuracy-{name}.json", {
            **_load_record("mid", 1, [], backend="openvino", scenario="offline", precision="bf16"),
            "accuracy": {"pairs": 2000, "answered": answered, "loadgen_accuracy": loadgen_accuracy,
                         "backend_accuracy": 0.962, "matches": loadgen_accuracy is not None}})
    [table] = [b for b in load_section(find_load_records([tmp_path]), tmp_path / "out") if b[0] == "table"]
    header, rows = table[1], table[2]
    assert [(row[header.index("LoadGen accuracy")], row[header.index("backend accuracy")], row[-1]) for row in rows] \
        == [("96.20%", "96.20%", "load-accuracy-all.json"), ("–", "96.20%", "load-accuracy-some.json")]


# --------------------------------------------------------------------------- the gate before any timed run


@pytest.mark.slow  # exports the trained checkpoint and runs LoadGen on it
def test_load_serves_only_what_passes_the_gate_and_records_it(tmp_path, trained_mid, monkeypatch):
    """load once served whatever it built: no parity check, and an artifact rebuilt under profiles/ identical to
    one whose export had FAILED its gate was timed and reported VALID. Now parity runs before any timed run and the
    record keeps it; a failing backend, or a checkpoint whose export failed its gate, is a one-line refusal."""
    import fusionprof.export
    from fusionprof.export import TOLERANCES
    from fusionprof.load_report import GATE, load_section
    from fusionprof.loadgen import LoadRecord

    models, profiles = tmp_path / "models", tmp_path / "profiles"
    checkpoint = copy_run(trained_mid[0], models)
    load = ["load", *MID_ORT, "--scenario", "offline", "--min-duration", "0.3", "--min-queries", "20",
            "--models", models, "--out", profiles, "--quiet"]
    code, out = run_cli(*load)
    assert code == 0, out
    [path] = profiles.glob("*/load-offline-tiny-mid-onnxruntime-fp32-*.json")
    gate = json.loads(path.read_text())["gate"]
    assert gate["passed"] and gate["tolerance"] == TOLERANCES["fp32"] and gate["export_record"] is None
    assert 0 < gate["max_abs_error"] == max(s["max_abs_error"] for s in gate["shapes"]) < 1e-4
    assert [s["batch"] for s in gate["shapes"]] == [1, 3, 8]
    assert f"mid/onnxruntime/fp32 against the PyTorch model: passed: max |Δ logit| {gate['max_abs_error']:.2g} " \
           "(tolerance 0.0001 + 0.001·|logit|)" in out

    # an older record (no gate) still reads, and the report tells the two apart
    old = json.loads(path.read_text())
    del old["gate"]
    records = [LoadRecord.from_dict(json.loads(path.read_text()), path), LoadRecord.from_dict(old, "old.json")]
    assert records[1].gate is None
    [offline] = [b for b in load_section(records, tmp_path / "report") if b[0] == "table"]
    assert [row[offline[1].index(GATE)] for row in offline[2]] == [
        f"passed: max |Δ logit| {gate['max_abs_error']:.2g}", "not checked"]

    # the same artifact, failing parity now (a tolerance nothing meets): refused, nothing timed or written
    with monkeypatch.context() as mp:
        mp.setitem(fusionprof.export.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0})
        code, out = run_cli(*load)
    assert code == 1 and out.count("\n") == 1, out
    assert out.startswith("Error: mid on onnxruntime fp32 fails parity with the PyTorch model (FAILED: max |Δ logit| ")
    assert out.endswith("load does not serve it\n")
    assert len(list(profiles.glob("*/load-*.json"))) == 1

    # the checkpoint's own export failed its gate: refused before anything is built, though the tolerance is back
    with monkeypatch.context() as mp:
        mp.setitem(fusionprof.export.TOLERANCES, "fp32", {"atol": 0.0, "rtol": 0.0})
        code, out = run_cli("export", "--checkpoint", checkpoint, "--quiet")
    assert code == 1 and json.loads((checkpoint.parent / "export.json").read_text())["parity"]["passed"] is False
    code, out = run_cli(*load)
    assert code == 1 and out == (f"Error: {checkpoint.parent / 'export.json'}: this checkpoint's onnx fp32 export "
                                 "failed its parity gate; load does not serve that model (fix it, or export it again "
                                 "once it passes)\n")
    assert len(list(profiles.glob("*/load-*.json"))) == 1
    # exported again, passing: served, and the record names the export record it read
    code, out = run_cli("export", "--checkpoint", checkpoint, "--quiet")
    assert code == 0, out
    code, out = run_cli(*load)
    assert code == 0, out
    newest = max(profiles.glob("*/load-*.json"))
    assert json.loads(newest.read_text())["gate"]["export_record"] == {
        "path": str(checkpoint.parent / "export.json"), "status": "ok"}


@pytest.fixture
def shape_counting_backend():
    """onnxruntime, registered for one test under another name, noting which thread first ran each (batch, caption
    length): LoadGen's runs are served on the batcher's worker thread, everything before them on the main one."""
    from fusionprof.backends.base import BACKENDS, register_backend

    first_seen: dict[tuple[int, int], str] = {}
    ran: dict[str, set] = {}

    @register_backend("onnxruntime-shapes")
    class ShapeCounting(BACKENDS.get("onnxruntime")):
        def run(self, images, input_ids, attention_mask):
            shape, thread = (images.shape[0], input_ids.shape[1]), threading.current_thread().name
            first_seen.setdefault(shape, thread)
            ran.setdefault(thread, set()).add(shape)
            return super().run(images, input_ids, attention_mask)

    try:
        yield first_seen, ran
    finally:
        del BACKENDS._members["onnxruntime-shapes"]


@pytest.mark.slow  # exports the trained checkpoint and runs LoadGen on it
def test_every_shape_the_batcher_forms_is_warmed_before_anything_is_timed(tmp_path, trained_mid,
                                                                          shape_counting_backend):
    """load warmed one shape, while the batcher forms every batch size up to --max-batch at every caption length
    (a batch is trimmed to its longest caption): a backend that compiles or captures per shape did so inside the
    timed LoadGen runs. Now every such shape runs once first, and no timed run meets a shape it has not."""
    from fusionprof.checkpoint import load_model
    from fusionprof.load import test_library

    first_seen, ran = shape_counting_backend
    models, profiles = tmp_path / "models", tmp_path / "profiles"
    checkpoint = copy_run(trained_mid[0], models)
    code, out = run_cli("load", "--fusion", "mid", "--backend", "onnxruntime-shapes", "--scenario", "offline",
                        "--max-batch", "4", "--batch-timeout-ms", "2", "--min-duration", "0.3", "--min-queries", "40",
                        "--models", models, "--out", profiles, "--quiet")
    assert code == 0, out
    library, _ = test_library("tiny", load_model(checkpoint)[0].cfg, {"checkpoint": str(checkpoint)}, False)
    lengths = sorted(set(library.caption_lengths().tolist()))
    assert len(lengths) > 1  # captions of several lengths: shapes beyond the one warmed before
    formed = {(batch, length) for batch in range(1, 5) for length in lengths}
    [path] = profiles.glob("*/load-offline-tiny-mid-onnxruntime-shapes-fp32-*.json")
    warmed = json.loads(path.read_text())["warm_up"]
    assert (warmed["shapes"], warmed["caption_lengths"], warmed["batch_sizes"]) == (4 * len(lengths), lengths, [1, 4])
    assert f"warmed {4 * len(lengths)} shapes (batch 1-4 × {len(lengths)} caption lengths)" in out
    assert formed <= ran["MainThread"]  # each run before LoadGen's
    timed = ran["sut-worker"]
    assert len(timed) > 1 and timed <= formed  # the batcher formed several shapes, all among those
    assert not [shape for shape, thread in first_seen.items() if thread == "sut-worker"]  # none met first when timed


def test_a_tensorrt_engine_for_load_covers_the_largest_batch_the_batcher_forms():
    """load asked the sweep's artifacts with the sweep's default batch sizes: a TensorRT engine whose profile stops at
    32, which a --max-batch 64 batcher overruns. (Built on a GPU only: checked here is what it is built over.)"""
    from fusionprof.latency import SweepConfig, _plan_batches
    from fusionprof.load import LoadConfig, sweep_config

    def plan(max_batch):
        return _plan_batches(sweep_config(LoadConfig("mid", "tensorrt", "server", max_batch=max_batch)))

    assert max(plan(64)) == 64 and max(plan(48)) == 48
    assert plan(1) == plan(16) == plan(32) == _plan_batches(SweepConfig())  # the sweep's own engine, reused


def test_recommend_says_when_its_list_spans_models_or_machines_and_narrows_by_preset(tmp_path):
    """A tiny and a seed model, on two machines: not one model on one computer, and the answer says so."""
    seed = _latency_record([_latency_row("mid", "torch", 1, [2.0] * 150)])
    seed["config"].update(preset="seed", device="cuda:0")
    seed["environment"] = {**_env(), "gpus": [{"name": "NVIDIA H200"}]}
    _write(tmp_path, "gpu/latency-seed.json", seed)
    _write(tmp_path, "box/latency-tiny.json", _latency_record([_latency_row("late", "torch", 1, [3.0] * 150)]))
    mixed = recommend(tmp_path, p99_ms=10)
    assert [(c.preset, c.fusion) for c in mixed.chosen] == [("seed", "mid"), ("tiny", "late")]
    assert mixed.message.startswith("seed/mid on torch")
    assert "spans 2 presets (seed, tiny: other models) and 2 machines" in mixed.message
    assert mixed.message.endswith("narrow it with --preset and --device")
    out = CliRunner().invoke(cli, ["recommend", "--p99-ms", "10", "--preset", "tiny", "--profiles", str(tmp_path)])
    assert out.exit_code == 0 and out.output.startswith("tiny/late on torch") and "spans" not in out.output
    assert "seed/mid" not in out.output
