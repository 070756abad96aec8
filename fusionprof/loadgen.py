"""MLPerf LoadGen around any ``run(images, input_ids, attention_mask) -> logits``: the dynamic batcher that is the
system under test, one LoadGen run with its logs parsed, and the bisection that finds the largest VALID rate.

Knows nothing of checkpoints or datasets (``load.py`` brings those), so the harness benchmark drives the same SUT
with a backend that does nothing.

The batcher: LoadGen's issue thread only appends to a queue (it must never block, or LoadGen's own schedule slips);
one worker thread takes up to ``max_batch`` queued samples, waiting at most ``timeout_ms`` after the oldest one
arrived for more, runs them as one batch and completes each sample with its logit. ``max_batch=1`` is no batching.
It times each sample inside itself: queued (LoadGen handed it over → its batch was taken) and served (its batch's
inputs gathered and run), so a run says where its latency went; the rest of LoadGen's figure is LoadGen's own
issue and completion, and threads waking.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import mlperf_loadgen as lg
import numpy as np

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.errors import UserError
from fusionprof.measure import PERCENTILE_METHOD, p99_note

SCENARIOS = {"server": lg.TestScenario.Server, "offline": lg.TestScenario.Offline,
             "single-stream": lg.TestScenario.SingleStream}
LOG_FILES = ("mlperf_log_summary.txt", "mlperf_log_detail.txt")
ACCURACY_LOG = "mlperf_log_accuracy.json"
# While a LoadGen run is on, the worker hands the GIL over to LoadGen's issue callback after this long at most
# (Python's default, 5 ms, would put up to 5 ms of GIL wait on a request that arrives while the worker is busy
# gathering a batch in Python).
GIL_SWITCH_INTERVAL_S = 0.0002
# LoadGen's early stopping calls a Server p99 VALID only after about 460 queries all under the target (more when
# some are over it): fewer queries than this per run can never be VALID, whatever the latency.
SERVER_MIN_QUERIES = 1024
DECIDE_AT_MOST = 4  # find-max reruns a rate LoadGen could not decide with at most this many times the queries


@dataclass
class LoadSettings:
    """What one LoadGen run is asked to do (mapped onto ``lg.TestSettings`` by ``test_settings``)."""

    scenario: str
    target_qps: float | None = None  # server: the offered Poisson rate
    p99_ms: float | None = None  # server: the latency target LoadGen judges p99 against
    expected_qps: float | None = None  # offline: sizes the one big query (too low: it ends before min_duration)
    expected_latency_ms: float | None = None  # single-stream: sizes the query schedule
    min_duration_s: float = 10.0
    min_query_count: int = 100
    accuracy: bool = False  # AccuracyOnly: every sample once, every response logged

    def check(self) -> None:
        """One-line errors for settings LoadGen would misread or reject later (an infinite one overflows LoadGen's
        integer nanoseconds)."""
        if self.scenario not in SCENARIOS:
            raise UserError(f"unknown scenario {self.scenario!r}; choose from {', '.join(SCENARIOS)}")
        server = self.scenario == "server" and not self.accuracy  # LoadGen needs a rate and a target to judge
        for option, value, required in (("--qps", self.target_qps, server), ("--p99-ms", self.p99_ms, server),
                                        ("--min-duration", self.min_duration_s, True),
                                        ("offline's expected rate", self.expected_qps, False),
                                        ("single-stream's expected latency", self.expected_latency_ms, False)):
            if required or value is not None:
                check_above_zero(option, value)


def check_above_zero(option: str, value: float | None) -> None:
    """A one-line error unless ``value`` is a finite number above 0."""
    if value is None or not value > 0:
        raise UserError(f"{option} must be above 0, got {'nothing' if value is None else f'{value:g}'}")
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value:g}")


def test_settings(s: LoadSettings) -> lg.TestSettings:
    settings = lg.TestSettings()
    settings.scenario = SCENARIOS[s.scenario]
    settings.mode = lg.TestMode.AccuracyOnly if s.accuracy else lg.TestMode.PerformanceOnly
    settings.min_duration_ms = int(s.min_duration_s * 1e3)
    settings.min_query_count = s.min_query_count
    if s.target_qps:
        settings.server_target_qps = s.target_qps
    if s.p99_ms:
        settings.server_target_latency_ns = int(s.p99_ms * 1e6)
    if s.expected_qps:
        settings.offline_expected_qps = s.expected_qps
    if s.expected_latency_ms:
        settings.single_stream_expected_latency_ns = max(1, int(s.expected_latency_ms * 1e6))
    return settings


# --------------------------------------------------------------------------- the system under test


class BatchingSUT:
    """Queue → batch → ``run`` → ``QuerySamplesComplete``, on one worker thread. Use as a context manager.

    ``inputs(sample_indices)`` builds a batch's host tensors; ``run(*inputs)`` returns one logit per sample."""

    def __init__(self, run: Callable, inputs: Callable[[np.ndarray], tuple], max_batch: int = 1,
                 timeout_ms: float = 0.0):
        if max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {max_batch}")
        if not 0 <= timeout_ms < math.inf:  # NaN too
            raise UserError(f"--batch-timeout-ms must be 0 or more and finite, got {timeout_ms:g}")
        self.run, self.inputs = run, inputs
        self.max_batch, self.timeout_s = max_batch, timeout_ms / 1e3
        self.queue: deque = deque()  # (LoadGen's response id, sample index, arrival time)
        self.ready = threading.Condition()
        self.stopping = False
        self.batch_sizes: Counter = Counter()  # how many batches of each size ran
        self.queued: list[float] = []  # per sample, seconds: handed over by LoadGen → its batch taken
        self.served: list[float] = []  # per sample, seconds: its batch's inputs gathered and run
        self.error: BaseException | None = None
        self.handle = None

    def __enter__(self) -> BatchingSUT:
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.worker = threading.Thread(target=self._serve, name="sut-worker", daemon=True)
        self.worker.start()
        self.handle = lg.ConstructSUT(self.issue, self.flush)
        return self

    def __exit__(self, *exc) -> None:
        with self.ready:
            self.stopping = True
            self.ready.notify()
        self.worker.join()
        lg.DestroySUT(self.handle)
        sys.setswitchinterval(self.switch_interval)

    def issue(self, query_samples) -> None:
        """LoadGen's issue thread: enqueue and return."""
        now = time.perf_counter()
        with self.ready:
            self.queue.extend((q.id, q.index, now) for q in query_samples)
            self.ready.notify()

    def flush(self) -> None:
        """Nothing is held back: the worker drains the queue on its own."""

    def reset(self) -> None:
        """Forget the batches and times of the previous run (between runs, when no query is in flight)."""
        self.batch_sizes.clear()
        self.queued.clear()
        self.served.clear()

    def breakdown(self) -> dict:
        """p50 / p99 of each sample's time queued, served and both together (in the SUT) since ``reset``, in ms;
        empty when no sample ran. Percentiles of parts do not add up to the percentile of the whole. The p99 is None
        below ``P99_MIN_SAMPLES`` samples (``p99_note`` says why), as every p99 fusionprof reports."""
        if not self.served:
            return {}
        queued, served = np.array(self.queued) * 1e3, np.array(self.served) * 1e3
        note = p99_note(len(served))
        return {"samples": len(served), "p99_note": note} | {
            name: {"p50": float(np.percentile(ms, 50, method=PERCENTILE_METHOD)),
                   "p99": None if note else float(np.percentile(ms, 99, method=PERCENTILE_METHOD))}
            for name, ms in (("queued_ms", queued), ("served_ms", served), ("in_sut_ms", queued + served))}

    def _next_batch(self) -> list | None:
        with self.ready:
            while not self.queue and not self.stopping:
                self.ready.wait()
            if not self.queue:
                return None
            deadline = self.queue[0][2] + self.timeout_s  # the oldest sample waits at most timeout_ms
            while len(self.queue) < self.max_batch and not self.stopping and self.error is None:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.ready.wait(left)
            return [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]

    def _serve(self) -> None:
        while True:
            try:
                batch = self._next_batch()
            except Exception as e:  # the batcher itself failed: kept, and from now on no batch waits to fill,
                self.error = self.error or e  # so every query is still answered and LoadGen does not hang
                continue
            if batch is None:
                return
            ids, indices, arrivals = zip(*batch, strict=True)
            taken = time.perf_counter()
            try:
                logits = np.ascontiguousarray(self.run(*self.inputs(np.asarray(indices))), np.float32).reshape(-1)
                if len(logits) != len(batch):
                    raise RuntimeError(f"the backend returned {len(logits)} logits for {len(batch)} samples")
            except BaseException as e:  # kept and re-raised after the run: LoadGen must not hang
                self.error = self.error or e
                logits = np.full(len(batch), np.nan, np.float32)
            self.served += [time.perf_counter() - taken] * len(batch)
            self.queued += [taken - arrived for arrived in arrivals]
            self.batch_sizes[len(batch)] += 1
            base = logits.ctypes.data  # LoadGen copies the bytes (accuracy mode) before QuerySamplesComplete returns
            lg.QuerySamplesComplete([lg.QuerySampleResponse(rid, base + 4 * i, 4) for i, rid in enumerate(ids)])


# --------------------------------------------------------------------------- one LoadGen run


@dataclass
class LoadRun:
    """One LoadGen run as LoadGen judged it. ``valid`` is LoadGen's verdict; figures are for VALID runs only."""

    scenario: str
    accuracy: bool
    valid: bool | None  # None in accuracy mode (LoadGen gives no verdict there)
    validity: str  # "VALID", "INVALID" or "accuracy"
    invalid_reasons: list[str]
    settings: dict  # LoadGen's effective settings (detail log ``effective_*``)
    loadgen: dict  # every ``result_*`` and early-stopping field LoadGen logged, as logged (also for INVALID)
    batch_sizes: dict[int, int]  # batch size → number of batches the SUT ran
    logs: str  # the folder that holds LoadGen's summary and detail logs
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    contention: dict = field(default_factory=dict)  # other processes' CPU use during the run (``contention.watch``)
    breakdown: dict = field(default_factory=dict)  # where each sample's time went inside the SUT (``BatchingSUT``)

    def figure(self, key: str, scale: float = 1.0) -> float | None:
        """A LoadGen result field (``scale``d), or None when the run is not VALID: an INVALID run has no figures."""
        value = self.loadgen.get(key)
        return value * scale if self.valid and value is not None else None

    @property
    def p99_ms(self) -> float | None:
        return self.figure("result_99.00_percentile_latency_ns", 1e-6)

    @property
    def p50_ms(self) -> float | None:
        return self.figure("result_50.00_percentile_latency_ns", 1e-6)

    @property
    def p90_ms(self) -> float | None:
        return self.figure("result_90.00_percentile_latency_ns", 1e-6)

    @property
    def p99_target_ms(self) -> float | None:
        """Server: the p99 target LoadGen judged this run against, as it logged it (None where it did not)."""
        ns = self.settings.get("target_latency_ns")
        return ns * 1e-6 if ns else None

    @property
    def samples_per_s(self) -> float | None:
        """Offline: LoadGen's samples/s. Server: completed samples/s. Single-stream: queries/s."""
        for key in ("result_samples_per_second", "result_completed_samples_per_sec",
                    "result_qps_without_loadgen_overhead"):
            if key in self.loadgen:
                return self.figure(key)
        return None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_sizes"] = {str(k): v for k, v in sorted(self.batch_sizes.items())}
        d.update(p50_ms=self.p50_ms, p90_ms=self.p90_ms, p99_ms=self.p99_ms, samples_per_s=self.samples_per_s)
        return d


def run_loadgen(sut: BatchingSUT, n_samples: int, settings: LoadSettings, log_dir: Path) -> LoadRun:
    """One LoadGen test against ``sut`` over ``n_samples`` samples (all resident: loading them is free)."""
    settings.check()
    log_dir.mkdir(parents=True, exist_ok=True)
    output = lg.LogOutputSettings()
    output.outdir, output.copy_summary_to_stdout = str(log_dir), False
    log_settings = lg.LogSettings()
    log_settings.log_output, log_settings.enable_trace = output, False
    qsl = lg.ConstructQSL(n_samples, n_samples, lambda indices: None, lambda indices: None)
    sut.reset()
    try:
        with contention.watch() as others:
            lg.StartTestWithLogSettings(sut.handle, qsl, test_settings(settings), log_settings)
    finally:
        lg.DestroyQSL(qsl)
    if sut.error is not None:
        raise sut.error
    (log_dir / "mlperf_log_trace.json").unlink(missing_ok=True)  # empty with tracing off
    if not settings.accuracy:
        (log_dir / ACCURACY_LOG).unlink(missing_ok=True)  # empty outside accuracy mode
    run = parse_logs(log_dir, settings, dict(sut.batch_sizes))
    run.contention, run.breakdown = others, sut.breakdown()
    return run


def read_detail(path: Path) -> tuple[dict, list[str], list[str]]:
    """LoadGen's detail log: its ``:::MLLOG`` entries as key → value, and its errors and warnings."""
    values, errors, warnings = {}, [], []
    for line in path.read_text().splitlines():
        if not line.startswith(":::MLLOG"):
            continue
        entry = json.loads(line.split(" ", 1)[1])
        values[entry["key"]] = entry["value"]
        if entry["metadata"].get("is_error"):
            errors.append(f"{entry['key']}: {entry['value']}")
        elif entry["metadata"].get("is_warning") and "Logging allocation" not in str(entry["value"]):
            warnings.append(f"{entry['key']}: {entry['value']}")
    return values, errors, warnings


def invalid_reasons(detail: dict) -> list[str]:
    """Why LoadGen called a run INVALID, in its own words."""
    checks = {"result_perf_constraints_met": "latency constraint not met (the percentile is over the target)",
              "result_min_duration_met": "min duration not met", "result_min_queries_met": "min queries not met",
              "early_stopping_met": "early stopping not satisfied"}
    reasons = [text for key, text in checks.items() if detail.get(key) is False]
    recommendation = str(detail.get("result_invalid_reason", "")).strip()
    if recommendation:
        reasons.append(f"LoadGen: {recommendation}")
    return reasons


def parse_logs(log_dir: Path, settings: LoadSettings, batch_sizes: dict[int, int]) -> LoadRun:
    detail, errors, warnings = read_detail(log_dir / "mlperf_log_detail.txt")
    effective = {k.removeprefix("effective_"): v for k, v in detail.items() if k.startswith("effective_")}
    results = {k: v for k, v in detail.items() if k.startswith(("result_", "early_stopping"))}
    if settings.accuracy:
        valid, validity, reasons = None, "accuracy", []
    else:
        validity = detail.get("result_validity", "INVALID")
        valid = validity == "VALID" and not errors
        reasons = invalid_reasons(detail) + errors if not valid else []
    return LoadRun(settings.scenario, settings.accuracy, valid, validity if valid is not False else "INVALID",
                   reasons, effective, results, batch_sizes, str(log_dir), errors, warnings)


def read_accuracy_log(path: Path, n_samples: int) -> np.ndarray:
    """The logit each sample was answered with, from LoadGen's accuracy log (float32 bytes as hex)."""
    logits = np.full(n_samples, np.nan, np.float32)
    for entry in json.loads(path.read_text()):
        logits[entry["qsl_idx"]] = np.frombuffer(bytes.fromhex(entry["data"]), np.float32)[0]
    return logits


# --------------------------------------------------------------------------- the largest VALID rate


def next_rate(valid_below: float, invalid_above: float | None, tolerance: float = 0.1) -> float | None:
    """The next offered rate of the search, or None when it has converged.

    ``valid_below``: the largest rate found VALID so far (0: none yet); ``invalid_above``: the smallest found
    INVALID (None: none yet, so double). Stops when the two are within ``tolerance`` of each other."""
    if invalid_above is None:
        return valid_below * 2
    if invalid_above - valid_below <= tolerance * invalid_above:
        return None
    return (valid_below + invalid_above) / 2


def queries_to_decide(run: LoadRun) -> int | None:
    """How many queries a run needs for LoadGen to decide, when its only failing check is early stopping (latency
    within the target, duration and query count met, but too few queries to be sure of the percentile): LoadGen's
    own "would need to run at least N more queries", added to those it ran. None for any other run, and for one
    that would need more than ``DECIDE_AT_MOST`` times the queries it ran (a p99 that close to the target is as
    good as over it, and the run would take minutes)."""
    results = run.loadgen
    undecided = run.valid is False and results.get("early_stopping_met") is False and all(
        results.get(k) is True for k in ("result_perf_constraints_met", "result_min_duration_met",
                                         "result_min_queries_met"))
    more = re.search(r"at least (\d+) more queries", str(results.get("early_stopping_result", "")))
    ran = int(results.get("result_query_count") or 0)
    if not (undecided and more and ran) or ran + int(more.group(1)) > DECIDE_AT_MOST * ran:
        return None
    return ran + int(more.group(1))


def find_max_qps(trial: Callable[..., LoadRun], first_qps: float, max_trials: int = 8,
                 tolerance: float = 0.1) -> tuple[LoadRun | None, list[LoadRun]]:
    """Bisect the offered rate: the VALID run at the largest rate tried (None if none was), and every trial.

    ``trial(qps, min_queries=None)`` runs LoadGen once. A run LoadGen could not decide (early stopping wanted more
    queries, every other check met) is no upper bound: that rate runs once more with the queries LoadGen asked for
    (within ``max_trials``), and only that run's verdict counts."""
    runs: list[LoadRun] = []
    best: LoadRun | None = None
    valid_below, invalid_above = 0.0, None
    qps: float | None = first_qps
    while qps is not None and len(runs) < max_trials:
        run = trial(qps)
        runs.append(run)
        if (needed := queries_to_decide(run)) is not None and len(runs) < max_trials:
            run = trial(qps, min_queries=needed)
            runs.append(run)
        if run.valid:
            valid_below, best = qps, run
        else:
            invalid_above = qps
        qps = next_rate(valid_below, invalid_above, tolerance)  # nothing VALID yet: it halves
    return best, runs


# --------------------------------------------------------------------------- the record


@dataclass
class LoadRecord:
    """One ``fusionprof load``: what ran (fusion, backend, precision, device, batching), its LoadGen runs, and
    the headline: the largest VALID Server rate (find-max), or the accuracy check. Written and read here."""

    kind: ClassVar[str] = "load"
    created: str
    preset: str
    fusion: str
    backend: str
    precision: str
    device: str
    scenario: str
    max_batch: int
    batch_timeout_ms: float
    p99_target_ms: float | None
    model: dict  # which weights (trained checkpoint or untrained)
    backend_info: dict
    environment: dict
    config: dict
    runs: list[LoadRun] = field(default_factory=list)
    max_qps: float | None = None  # find-max: the largest offered rate LoadGen called VALID (None: none was)
    accuracy: dict | None = None  # accuracy mode: LoadGen's logged answers against the backend's own
    # parity of the backend against the PyTorch model before any timed run (``gate_text``); None: a record written
    # before load checked it
    gate: dict | None = None
    # the (batch, caption length) shapes called once before any timed run: every one the batcher can form (None: a
    # record written before load warmed them all; it warmed one)
    warm_up: dict | None = None
    path: str | None = None  # where it was read from or written to (not stored)

    @property
    def batching(self) -> str:
        return "no batching" if self.max_batch == 1 else f"batch≤{self.max_batch} wait≤{self.batch_timeout_ms:g}ms"

    @property
    def serving(self) -> str:
        """The batching and how the backend's threads ran: what tells two runs of one backend apart."""
        threads = threads_label(self.backend_info)
        return f"{self.batching}, {threads}" if threads else self.batching

    @property
    def invalid_qps(self) -> float | None:
        """Find-max: the smallest offered rate above ``max_qps`` that LoadGen called INVALID (None: none was, or no
        search). The rate this setting sustains lies between the two, as finely as the search's trials resolved it
        (one LoadGen run per rate)."""
        return self.missed_above(self.max_qps or 0.0) if self.config.get("find_max_qps") else None

    def missed_above(self, qps: float, p99_ms: float = math.inf) -> float | None:
        """The smallest rate above ``qps`` that its Server runs tried and found over the target: INVALID, or VALID with
        a p99 above ``p99_ms`` (a tighter target than LoadGen judged). None: none was tried. A rate run again with the
        queries LoadGen asked for counts by its last run."""
        last = {run.settings.get("target_qps", 0.0): run for run in self.runs if not run.accuracy}
        missed = [rate for rate, run in last.items() if not run.valid or (run.p99_ms or 0.0) > p99_ms]
        return min((rate for rate in missed if rate > qps), default=None)

    @property
    def contention(self) -> dict:
        """What other processes took of the CPUs over all its LoadGen runs (empty: written before it was watched)."""
        return contention.combine([run.contention for run in self.runs])

    def to_dict(self) -> dict:
        d = {"schema_version": SCHEMA_VERSION, "kind": self.kind}
        d.update({f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("runs", "path")})
        d["batching"] = self.batching
        d["invalid_qps"] = self.invalid_qps  # for readers of the file; recomputed from the runs when read
        d["runs"] = [run.to_dict() for run in self.runs]
        return d

    @classmethod
    def from_dict(cls, d: dict, path: object = None) -> LoadRecord:
        """The record ``d``; one missing a field, or a run of it missing one, is a one-line error naming the file."""
        names = {f.name for f in fields(cls)} - {"runs", "path"}
        run_fields = {f.name for f in fields(LoadRun)}
        try:
            _require(d, cls, path, "it")
            record = cls(**{k: v for k, v in d.items() if k in names}, path=str(path) if path else None)
            for i, run in enumerate(d.get("runs", [])):
                _require(run, LoadRun, path, f"its run {i}")
                run = {k: v for k, v in run.items() if k in run_fields}
                run["batch_sizes"] = {int(k): v for k, v in run.get("batch_sizes", {}).items()}
                record.runs.append(LoadRun(**run))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{path}: not a complete load record ({type(e).__name__}: {e})") from None
        return record


def _require(d: dict, cls: type, path: object, what: str) -> None:
    """A one-line error naming the file and the first field of ``cls`` without a default that ``d`` lacks."""
    for f in fields(cls):
        if f.init and f.default is MISSING and f.default_factory is MISSING and f.name not in d:
            raise UserError(f"{path}: not a complete load record: {what} has no {f.name!r}")


def ms_or_dash(ms: float | None) -> str:
    """A figure in ms as tables show it: "–" where there is none (a p99 from too few samples)."""
    return "–" if ms is None else f"{ms:.2f}"


def gate_text(gate: dict | None, tolerance: bool = True) -> str:
    """A load record's parity gate in words: passed or FAILED, the largest |Δ logit| against the PyTorch fp32 model,
    and (``tolerance``) what it was held to; "not checked" for a record written before load checked it."""
    if gate is None:
        return "not checked"
    verdict = f"{'passed' if gate['passed'] else 'FAILED'}: max |Δ logit| {gate['max_abs_error']:.2g}"
    if not tolerance:
        return verdict
    tol = gate["tolerance"]
    if "max_abs" in tol:  # int8: a bound on |Δ| and the match decisions agreeing
        return (f"{verdict} (≤ {tol['max_abs']:g}), decisions agreeing {gate['decision_agreement']:.1%} "
                f"(≥ {tol['decision_agreement']:.0%})")
    return f"{verdict} (tolerance {tol['atol']:g} + {tol['rtol']:g}·|logit|{', ' + tol['why'] if 'why' in tol else ''})"


def thread_count(backend_info: dict) -> int | None:
    """How many threads a backend ran, as it described itself: its own pool's where it has one, else torch's (None:
    it did not say)."""
    return next((backend_info[k] for k in ("intra_op_threads", "inference_threads", "torch_threads")
                 if backend_info.get(k)), None)


def threads_label(backend_info: dict) -> str:
    """How a backend's threads ran, as it described itself: whether they spin or sleep between calls (where the
    runtime says: onnxruntime's pool spins by default) and how many (``thread_count``)."""
    spin = backend_info.get("spin_wait")
    threads = thread_count(backend_info)
    return ", ".join(([] if spin is None else ["spin-wait" if spin else "sleeping threads"])
                     + ([f"{threads} thread{'s' if threads != 1 else ''}"] if threads else []))
