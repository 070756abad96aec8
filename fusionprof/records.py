"""The latency records fusionprof writes and reads back: dataclasses, one schema version, one pair of
``to_dict`` / ``from_dict`` each, so the sweep that writes a field and the report that reads it share its name.

A ``LatencyRecord`` is one sweep: its environment, config, yardstick and rows. A ``LatencyRow`` is one
(fusion, backend, batch size) cell, or one line per backend that did not run; its ``Timing`` (copy-inclusive,
and device-resident on CUDA) is a sample series and its summary. The JSON layout is the one schema version 1
has always had (a row's copy-inclusive timing flat in the row), so every committed record still loads.

Training (``metrics.json``) and export (``export.json``) records stay dicts, built by ``train.py`` and
``export.py``; the report reads them as they are, after ``check_schema``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.backends import format_of
from fusionprof.env import device_label, machine_name
from fusionprof.errors import UserError
from fusionprof.measure import CV_WARNING, DRIFT_WARNING, P99_MIN_SAMPLES, Warmup, halves_p50, p99_note, summarize

HOST_TIMING = "host→device copy + run + device→host copy"
CPU_TIMING = "host clock around the call (on the CPU: no copies)"
DEVICE_TIMING = "CUDA events, inputs and outputs on the device"
PARITY_FAILED = "failed: parity"


def check_schema(record: dict, source: object) -> None:
    """A one-line error for a record of another schema version (or none): its fields may mean other things."""
    if record.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{source}: schema version {record.get('schema_version')!r}; this fusionprof reads "
                        f"version {SCHEMA_VERSION}")


def _known(cls, d: dict) -> dict:
    """The entries of ``d`` that are fields of ``cls`` (a record may carry keys an older version wrote)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class Timing:
    """One series of latency samples (ms) and its summary. p99 only from ``P99_MIN_SAMPLES`` samples up."""

    n: int
    p50_ms: float
    p90_ms: float
    p99_ms: float | None
    mean_ms: float
    std_ms: float | None  # None from one sample: no spread to measure
    cv: float | None
    min_ms: float
    max_ms: float
    samples_ms: list[float]
    timing: str  # what the clock covered
    p99_note: str | None = None  # why p99 is empty
    halves_p50_ms: list[float] | None = None  # p50 of the first and the second half of the calls (None: too few)
    rounds_p50_ms: list[float] | None = None  # an interleaved sweep's: the p50 of each visit (None: one visit)
    rounds_calls: list[int] | None = None  # and the calls of each visit, in call order (what a resumed sweep splits)
    # The warm-up before the samples, over all visits (None: a record written before warm-ups were recorded): its
    # calls and seconds, and whether the warm-up cap (``Protocol.max_warmup_seconds``) ended one short of the minimums
    warmup_calls: int | None = None
    warmup_seconds: float | None = None
    warmup_capped: bool | None = None

    @classmethod
    def of(cls, samples_ms: list[float], timing: str, warmups: Sequence[Warmup] = ()) -> Timing:
        warmed = {"warmup_calls": sum(w.calls for w in warmups), "warmup_seconds": sum(w.seconds for w in warmups),
                  "warmup_capped": any(w.capped for w in warmups)} if warmups else {}
        return cls(**summarize(samples_ms), samples_ms=samples_ms, timing=timing, **warmed)

    def warmup(self) -> Warmup | None:
        """The warm-up as one: its calls and seconds over all visits (None: not recorded)."""
        if self.warmup_calls is None:
            return None
        return Warmup(self.warmup_calls, self.warmup_seconds, bool(self.warmup_capped))

    @property
    def cv_warning(self) -> bool:
        """A CV above the warning line; a single sample (CV unknown) is marked apart, not as steady or noisy."""
        return self.cv is not None and self.cv > CV_WARNING

    @property
    def drift(self) -> float | None:
        """How far the cell's level moved while it was timed: the second half's p50 over the first's, less 1."""
        if self.halves_p50_ms is None:
            return None
        first, second = self.halves_p50_ms
        return second / first - 1 if first > 0 else math.nan

    @property
    def drift_warning(self) -> bool:
        """The level moved, either way, by more than the warning line: one half's p50 over 1.1× the other's. Not
        for a cell of an interleaved sweep: its visits lie minutes apart by design, and its p50 spans them."""
        if self.halves_p50_ms is None or self.rounds_p50_ms is not None:
            return False
        return max(self.halves_p50_ms) > (1 + DRIFT_WARNING) * min(self.halves_p50_ms)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "drift": self.drift}

    @classmethod
    def from_dict(cls, d: dict) -> Timing:
        timing = cls(**_known(cls, d))
        if "halves_p50_ms" not in d:  # written before halves were compared: its samples say it
            timing.halves_p50_ms = halves_p50(timing.samples_ms)
        if timing.n < 2:  # written before the rule: a CV of 0 from one sample
            timing.std_ms = timing.cv = None
        if timing.n < P99_MIN_SAMPLES and timing.p99_ms is not None:  # written before the rule: not a p99
            timing.p99_ms = None
            timing.p99_note = p99_note(timing.n)
        return timing


@dataclass
class LatencyRow:
    """One cell of a sweep; a backend that did not run has one row with its status and no timing."""

    fusion: str
    backend: str
    status: str  # "ok", PARITY_FAILED (timed, kept, never ranked) or "unavailable: <why>"
    batch_size: int | None = None
    host: Timing | None = None  # copy-inclusive: the headline
    device_resident: Timing | None = None  # CUDA only
    first_call_of_fresh_backend_ms: float | None = None  # before parity or anything else ran it
    first_call_batch_size: int | None = None
    load_seconds: float | None = None
    seq_len: int | None = None
    flops_per_sample: float | None = None
    # achieved GFLOP/s (on CUDA the device-resident one, as the yardstick's) / the sweep's matmul yardstick
    share_of_matmul_yardstick: float | None = None
    mfu: float | None = None  # achieved / the datasheet's tensor-core peak: a known GPU in bf16 / fp16 only
    parity_passed: bool | None = None
    peak_memory: dict = field(default_factory=dict)
    contention: dict = field(default_factory=dict)  # other processes' CPU use while timed (empty: not watched)
    model: dict = field(default_factory=dict)  # which weights: trained (and the checkpoint) or untrained
    backend_info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Timed and right: the only rows that enter a best, a plot or a Pareto front."""
        return self.status == "ok"

    @property
    def throughput_samples_per_s(self) -> float:
        """Sequential calls' throughput: batch / mean latency (the median would leave out the slow calls that the
        calls' rate pays for too)."""
        return self.batch_size / (self.host.mean_ms / 1e3)

    @property
    def beside_busy_neighbour(self) -> bool:
        """Other processes kept a share of the CPUs busy while this cell was timed (flagged, not hidden)."""
        return contention.busy(self.contention)

    @property
    def noisy(self) -> bool:
        """A CV above the warning line in either timing: the copy-inclusive one or, on a GPU, the device-resident one
        (the GPU figures the tables quote; a launch-bound eager cell can be steady from the host and not on the GPU)."""
        return any(t is not None and t.cv_warning for t in (self.host, self.device_resident))

    @property
    def worst_cv(self) -> float | None:
        """The larger CV of the two timings (None: neither has one)."""
        cvs = [t.cv for t in (self.host, self.device_resident) if t is not None and t.cv is not None]
        return max(cvs, default=None)

    @property
    def achieved_gflops(self) -> float:
        return self.flops_per_sample * self.throughput_samples_per_s / 1e9

    @property
    def above_yardstick(self) -> bool:
        """The model ran faster than the yardstick matmul: the yardstick is no peak here (flagged, not hidden)."""
        return self.share_of_matmul_yardstick is not None and self.share_of_matmul_yardstick > 1

    def device_resident_gflops(self) -> float | None:
        """Achieved GFLOP/s of the device-resident mean (no copies): what the GPU itself sustains."""
        if self.device_resident is None:
            return None
        return self.flops_per_sample * self.batch_size / (self.device_resident.mean_ms / 1e3) / 1e9

    def to_dict(self) -> dict:
        head = {"fusion": self.fusion, "backend": self.backend, "batch_size": self.batch_size, "status": self.status}
        if self.host is None:
            return head
        rest = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in head}
        rest.pop("host")
        device_resident = rest.pop("device_resident")
        return {**head, "parity_passed": rest.pop("parity_passed"), **self.host.to_dict(),
                "throughput_samples_per_s": self.throughput_samples_per_s, "achieved_gflops": self.achieved_gflops,
                "cv_warning": self.noisy, "drift_warning": self.host.drift_warning,
                "above_yardstick": self.above_yardstick,
                **({"device_resident_gflops": self.device_resident_gflops()} if device_resident else {}),
                **({"device_resident": device_resident.to_dict()} if device_resident else {}), **rest}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyRow:
        if "share_of_matmul_rate" in d:  # its name in records written before the yardstick was measured twice
            d = {**d, "share_of_matmul_yardstick": d["share_of_matmul_rate"]}
        row = cls(**{k: v for k, v in _known(cls, d).items() if k not in ("host", "device_resident")})
        row.host = Timing.from_dict(d) if "n" in d else None
        row.device_resident = Timing.from_dict(d["device_resident"]) if d.get("device_resident") else None
        return row


def busy_neighbour_cells(rows: list[LatencyRow]) -> tuple[list[LatencyRow], LatencyRow | None]:
    """The timed rows measured beside a busy neighbour, and the one where other processes took the most."""
    busy = [r for r in rows if r.host is not None and r.beside_busy_neighbour]
    return busy, max(busy, key=lambda r: r.contention["other_processes_cores"], default=None)


def drifted_cells(rows: list[LatencyRow]) -> tuple[list[LatencyRow], LatencyRow | None]:
    """The timed rows whose p50 moved while they were timed (``Timing.drift_warning``), and the one that moved most."""
    moved = [r for r in rows if r.host is not None and r.host.drift_warning]
    return moved, max(moved, key=lambda r: max(r.host.halves_p50_ms) / min(r.host.halves_p50_ms), default=None)


def noisy_cells(rows: list[LatencyRow]) -> tuple[list[LatencyRow], LatencyRow | None]:
    """The timed rows whose CV is above the warning line in either timing (``LatencyRow.noisy``), and the one with the
    largest CV."""
    noisy = [r for r in rows if r.host is not None and r.noisy]
    return noisy, max(noisy, key=lambda r: r.worst_cv, default=None)


def visit_spread(rows: list[LatencyRow]) -> tuple[int, float, LatencyRow] | None:
    """For an interleaved sweep: the most visits of a cell, the median cell's spread of its visits' p50s (largest
    over smallest, less 1), and the row whose visits spread most; None for a sweep of one visit per cell."""
    timed = [r for r in rows if r.host is not None and r.host.rounds_p50_ms and len(r.host.rounds_p50_ms) > 1]
    if not timed:
        return None

    def spread(r: LatencyRow) -> float:
        return max(r.host.rounds_p50_ms) / min(r.host.rounds_p50_ms) - 1
    visits = max(len(r.host.rounds_p50_ms) for r in timed)
    return visits, statistics.median(spread(r) for r in timed), max(timed, key=spread)


def told_apart(faster: list[float] | None, slower: list[float] | None) -> bool | None:
    """Whether an interleaved sweep told two cells apart: every visit p50 of the slower above every one of the faster
    (their ranges do not overlap). None where either was timed in one visit: nothing to judge it by."""
    if len(faster or []) < 2 or len(slower or []) < 2:
        return None
    return min(slower) > max(faster)


def fastest_fusions(rows: list[LatencyRow], batch: int) -> list[tuple[LatencyRow, bool | None]]:
    """Each fusion's fastest right cell at ``batch`` (its best backend), fastest first, each with whether it was told
    apart from the first (``told_apart``; the first: None)."""
    best: dict[str, LatencyRow] = {}
    for r in rows:
        if r.ok and r.host is not None and r.batch_size == batch and (
                r.fusion not in best or r.host.p50_ms < best[r.fusion].host.p50_ms):
            best[r.fusion] = r
    ranked = sorted(best.values(), key=lambda r: r.host.p50_ms)
    return [(r, None if i == 0 else told_apart(ranked[0].host.rounds_p50_ms, r.host.rounds_p50_ms))
            for i, r in enumerate(ranked)]


# A sweep cut short (a time limit, a crash in a runtime) keeps the rows it measured: after each backend they are
# written to a file of this suffix beside its record-to-be, a record of its own kind (the report names it, never plots
# it; `recommend` reads finished sweeps only), deleted when the sweep's record is written.
PARTIAL_SUFFIX = ".partial.json"
PARTIAL_KIND = "latency_partial"


@dataclass
class LatencyRecord:
    """One sweep on one machine: every row, and what it ran on and with."""

    kind: ClassVar[str] = "latency"
    created: str
    environment: dict
    config: dict
    reference_matmul: dict
    rows: list[LatencyRow]
    path: str | None = field(default=None, compare=False)  # where it was written or read: not part of the record

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "created": self.created,
                "environment": self.environment, "config": self.config, "reference_matmul": self.reference_matmul,
                "rows": [r.to_dict() for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict, path: object = None) -> LatencyRecord:
        check_schema(d, path)
        try:
            return cls(created=d["created"], environment=d["environment"], config=d["config"],
                       reference_matmul=d["reference_matmul"], rows=[LatencyRow.from_dict(r) for r in d["rows"]],
                       path=None if path is None else str(path))
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: not a complete latency record ({type(e).__name__}: {e})") from None


def int8_gate_of(record: dict, backend: str) -> tuple[dict, str]:
    """The accuracy gate of the int8 model ``backend`` runs, from an int8 export record, and that model's name:
    NNCF's IR where ``openvino`` loads it, else the QDQ graph (the record's own gate)."""
    openvino = record.get("onnx", {}).get("openvino", {})
    if backend == "openvino" and openvino.get("loads") == "nncf":
        return openvino["nncf"]["accuracy"], "NNCF IR"
    return record["accuracy"], "QDQ ONNX"


def export_precision(record: dict) -> str | None:
    """The precision an export record built: its own field, or — in records written before it had one — its
    artifact's (``onnx.precision``, ``pt2.precision``)."""
    return record.get("precision") or (record.get("pt2") or record.get("onnx") or {}).get("precision")


def model_accuracy(train: list[dict], export: list[dict], checkpoint: str | Path | None, precision: str,
                   backend: str | None = None, checkpoint_hash: str | None = None, machine: str | None = None,
                   load: Sequence = (), device: str | None = None) -> tuple[float, str, dict] | None:
    """The test accuracy of ``checkpoint``'s model in ``precision``, what measured it, and the record that says so.
    The measurement closest to what ``backend`` runs comes first: its own answers on ``device`` where a LoadGen
    accuracy run in ``load`` has them (``backend_accuracy``); for a backend that runs the PyTorch model itself
    (``torch``, ``torch-cudagraphs``), its training run's when that ran in ``precision``; the passed gate of the export
    it loads in that precision (at int8 that of the model it loads: NNCF's IR on openvino); else ONNX's gate, another
    format's, the training run's. None for a random-init model (no checkpoint), one no record measured in
    ``precision`` (a run whose test logits were not finite measured nothing), or a backend whose own export of it
    failed its gate: never another model's, precision's or graph's figure. Which records are of that model:
    ``records_of_model`` (``checkpoint_hash`` and ``machine`` are what the timing record says of it). Records are
    dicts as ``find_records`` keeps them (``_file``: where each was read); ``load`` holds load records. Of several
    records of one kind that would do, the newest (``newest_first``)."""
    if not checkpoint:
        return None
    if backend and (own := backend_accuracy(load, checkpoint, precision, backend, checkpoint_hash, machine, device)):
        return own
    trained = newest_first(r for r in records_of_model(train, checkpoint, checkpoint_hash, machine)
                           if r.get("train_config", {}).get("precision") == precision
                           and r["test"]["accuracy"] is not None)  # None: its logits were not finite, nothing measured
    training = (trained[0]["test"]["accuracy"], "training run", trained[0]) if trained else None
    loads = format_of(backend) if backend else None
    if backend and loads is None and training:
        return training
    built = [r for r in records_of_model(export, checkpoint, checkpoint_hash, machine)
             if export_precision(r) == precision]
    exports = sorted(newest_first(r for r in built if r.get("status") == "ok"),  # stable: the newest of a format first
                     key=lambda r: (r["format"] != loads, r["format"] != "onnx"))
    if loads and all(r["format"] != loads for r in exports) and \
            any((r.get("format"), r.get("status")) == (loads, "failed") for r in built):
        return None  # the graph this backend loads failed its gate: another format's figure is not its accuracy
    if exports:
        gate, model = int8_gate_of(exports[0], backend or "") if precision == "int8" else (exports[0]["accuracy"], "")
        how = "NNCF IR of the int8 export" if model == "NNCF IR" else f"{exports[0]['format']} export"
        return gate["exported_accuracy"], how, exports[0]
    return training


def backend_accuracy(load: Sequence, checkpoint: str | Path, precision: str, backend: str,
                     checkpoint_hash: str | None = None, machine: str | None = None,
                     device: str | None = None) -> tuple[float, str, dict] | None:
    """The test accuracy ``backend`` answered with, running ``checkpoint``'s model in ``precision`` (on ``device``,
    if given): of the load records (``LoadRecord``) of that model (``records_of_model``), the newest LoadGen accuracy
    run in which every answer LoadGen logged was the backend's own decision on the evaluation batches (``matches``).
    An export's gate scores the exported graph on onnxruntime and a training run scores PyTorch; this is the engine
    that ran, in the precision it ran (openvino's bf16 inference hint, say). None where no such run is on record."""
    runs = [{**(r.model or {}), "environment": r.environment, "record": r} for r in load
            if (r.backend, r.precision) == (backend, precision) and (r.accuracy or {}).get("matches")
            and (device is None or device_label(r.device) == device_label(device))]
    ours = sorted((o["record"] for o in records_of_model(runs, checkpoint, checkpoint_hash, machine)),
                  key=lambda r: r.created)
    if not ours:
        return None
    newest = ours[-1]
    return newest.accuracy["loadgen_accuracy"], f"{backend}'s own answers, LoadGen accuracy run", \
        {**newest.to_dict(), "_file": newest.path}


def newest_first(records: Iterable[dict]) -> list[dict]:
    """Training or export records, the newest first by ``created`` (``env.STAMP_FORMAT``, which sorts as text); one
    written before records had it counts as the oldest."""
    return sorted(records, key=lambda r: r.get("created") or "", reverse=True)


def records_of_model(records: list[dict], checkpoint: str | Path, checkpoint_hash: str | None = None,
                     machine: str | None = None) -> list[dict]:
    """The training or export records of the model a timing record ran: those of its checkpoint path, and — since
    one path holds different models on different days (a study's ``/tmp`` folder trained on Monday's EPYC and again
    on Tuesday's Xeon) — of its ``checkpoint_hash`` where the record states one too, else made on its ``machine``
    (``env.machine_name``; ``None``: any). A record of another hash is another model, and a record of no hash made
    on another machine may be: neither is taken."""
    at = [r for r in records if Path(r.get("checkpoint") or "") == Path(checkpoint)]
    if checkpoint_hash and (same := [r for r in at if r.get("checkpoint_hash") == checkpoint_hash]):
        return same
    return [r for r in at if not (checkpoint_hash and r.get("checkpoint_hash"))
            and (machine is None or machine_name(r.get("environment") or {}) == machine)]
