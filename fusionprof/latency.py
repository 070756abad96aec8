"""``fusionprof latency``: fusions × backends × batch sizes, one protocol, every sample kept.

Uses the trained checkpoint (``find_checkpoint``: ``models/<preset>-<fusion>/``, else the newest run of that preset
and fusion under any ``--run-name``) and its verified ONNX export when they exist,
an untrained model of the preset otherwise (latency does not depend on the weights; the record says which).
Copy-inclusive latency (host inputs → host logits, the same copies for every backend) is the headline;
on CUDA the device-resident latency (CUDA events, inputs already on the GPU) is measured beside it.
Profiler traces come from a separate, short run (``trace_inference``), never from the timed one.

The sweep is split the way optimum-benchmark splits one: artifacts (``load_artifacts``: what to load or export),
scenario (``prepare_backend`` / ``visit_cell``: what to call, at which shapes, how often, in what order), tracker
(``measure``: one sampling loop for the host clock and CUDA events, peak memory), output (``latency_output``:
the JSON record, the CSV, the table). The record's types live in ``records``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionprof import contention
from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, EAGER, Artifacts, Backend, backend_names, create_backend
from fusionprof.backends.trt import build_engine, optimization_profile
from fusionprof.checkpoint import checkpoint_hash, find_checkpoint, load_model
from fusionprof.config import model_config, to_dict
from fusionprof.env import fingerprint, utc_stamp
from fusionprof.errors import UserError, first_line
from fusionprof.export import (
    PARITY_MAX_BATCH,
    AccuracyGate,
    checkpoint_calibration,
    export_int8_onnx,
    export_onnx,
    gate_ir,
    int8_artifacts,
    onnx_name,
    parity,
    plan_name,
    profile_batches,
    pt2_name,
    verified_export,
    verified_onnx,
)
from fusionprof.latency_output import write_record
from fusionprof.measure import (
    Protocol,
    Warmup,
    cuda_event_timer,
    datasheet_tflops,
    host_timer,
    matmul_rate,
    peak_memory,
    sample_with_warmup,
    yardstick,
)
from fusionprof.models import FusionModel, build_model, forward_flops, fusion_names
from fusionprof.models.model import example_inputs
from fusionprof.profiling import run_profiled, trace_dir
from fusionprof.pt2 import PackagesAhead, build_jobs, build_pt2
from fusionprof.quantize import calibration_sample
from fusionprof.records import (
    CPU_TIMING,
    DEVICE_TIMING,
    HOST_TIMING,
    PARITY_FAILED,
    PARTIAL_KIND,
    PARTIAL_SUFFIX,
    LatencyRecord,
    LatencyRow,
    Timing,
)
from fusionprof.runtime import (
    DTYPES,
    INFERENCE_PRECISIONS,
    check_precision,
    largest_peaks,
    out_of_memory,
    resolve_device,
    torch_threads,
)


@dataclass
class SweepConfig:
    preset: str = "tiny"
    fusions: list[str] = field(default_factory=fusion_names)  # every registered method
    backends: list[str] = field(default_factory=backend_names)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    device: str = "cpu"
    precision: str = "fp32"
    seq_len: int | None = None  # None: the preset's maximum caption length
    threads: int | None = None
    models_dir: str = "models"
    profiles_dir: str = "profiles"
    protocol: Protocol = field(default_factory=Protocol)
    # Visits per cell. Above 1 every cell of the sweep is timed in turn, the protocol's sampling split over the
    # rounds and the order reversed each round: a change in the machine's pace falls on every cell alike rather
    # than on the few timed while it lasted, and each row keeps the p50 of each round.
    rounds: int = 1


# Visits per cell where none are asked for: three for the tiny preset, one for the bigger ones. Timed in three
# interleaved visits, a tiny sweep's cells stood closer to their place in other sweeps of the same settings, relative
# to each sweep's pace (benchmarks/repeatability.py, two records in profiles/vm/, the second with a shorter revisit
# warm-up since dropped: median miss 5.8 % and 8.3 % against 9.3 % and 10.6 %, p90 15.7 % and 17.2 % against 21.1 %
# and 25.5 %), for 0.6 GB more memory in compare's sweep; a seed sweep that holds every backend at once took 9.9 GB.
DEFAULT_ROUNDS = {"tiny": 3}


def default_rounds(preset: str) -> int:
    return DEFAULT_ROUNDS.get(preset, 1)


# --------------------------------------------------------------------------- artifacts: what to load or export


def random_init_model(preset: str, fusion: str) -> FusionModel:
    """The untrained model a sweep times where there is no checkpoint (seed 0; latency does not depend on the
    weights), in eval mode; the benchmarks time the same one."""
    torch.manual_seed(0)
    mcfg = model_config(preset, fusion=fusion, pretrained=False)
    mcfg.vocab_size = max(mcfg.vocab_size, 1000)
    return build_model(mcfg).eval()


def load_artifacts(cfg: SweepConfig, fusion: str, work_dir: Path, log=print,
                   later: list[PackageBuild] | None = None) -> tuple[Artifacts, dict]:
    """The model (trained if a checkpoint exists) and the exports the chosen backends load (ONNX, a ``.pt2``): the
    checkpoint's own where their verification passed, else ones written under ``work_dir`` (a trained model's NNCF
    IR held to the accuracy gate, as ``fusionprof export`` holds it). An export that cannot be built here is left
    out, with the reason in ``Artifacts.failed``. A ``--seq-len`` longer than the model's text encoder reads is
    refused first, before minutes of exports. ``later``: a ``.pt2`` to build is appended there rather than built
    (``build_packages`` builds them side by side, and sets ``Artifacts.pt2`` or its failure)."""
    checkpoint = find_checkpoint(cfg.models_dir, cfg.preset, fusion)
    if checkpoint is not None:
        model, train_cfg = load_model(checkpoint)
        source = {"weights": "trained", "checkpoint": str(checkpoint), "checkpoint_hash": checkpoint_hash(checkpoint)}
        calibration = checkpoint_calibration(checkpoint, model, train_cfg)
        accuracy_gate = partial(AccuracyGate, model, train_cfg, checkpoint, False)  # made only if needed
    else:  # said, so that a mistyped --models does not pass for the trained model
        log(f"{Path(cfg.models_dir) / f'{cfg.preset}-{fusion}'}: no checkpoint, so an untrained {cfg.preset} "
            f"{fusion} (random init) is timed: latency does not depend on the weights, but it has no accuracy")
        model = random_init_model(cfg.preset, fusion)
        source = {"weights": "untrained (random init; latency does not depend on the weights)"}
        calibration = partial(calibration_sample, model.cfg, None, 0)  # the embedded dataset's validation split
        accuracy_gate = None  # random weights have no accuracy to keep
    seq_len = cfg.seq_len or model.cfg.max_text_len
    if seq_len > (positions := model.text_encoder.max_positions):  # before any export (minutes) and any row
        raise UserError(f"--seq-len {seq_len}: the {cfg.preset} text encoder reads at most {positions} tokens")
    artifacts = Artifacts(model)
    device = resolve_device(cfg.device)
    weights = {"checkpoint_hash": source["checkpoint_hash"]} if checkpoint else {"weights": "untrained, seed 0"}
    for artifact in _exports_needed(cfg, device):
        precision = graph_precision(artifact, cfg.precision)
        name = ARTIFACT_NAMES[artifact](precision, device.type)
        path = checkpoint.parent / name if checkpoint else None
        # a checkpoint's own export is reused only if its verification passed, for this very checkpoint
        if not (path and path.exists() and verified_export(checkpoint, checkpoint.parent, ARTIFACT_FORMATS[artifact],
                                                           precision, device.type)):
            path = work_dir / artifact / f"{cfg.preset}-{fusion}" / name
            made_from = {**weights, **({"profile_batches": _plan_batches(cfg)} if artifact == "plan" else {}),
                         **({"nncf_ir": IR_GATED} if accuracy_gate and precision == "int8" else {})}
            if path.exists() and _made_from(path) != made_from:  # an earlier sweep's, of other weights or shapes
                log(f"{path} was made from another model, for other batch sizes or by an older sweep: exporting it "
                    "again")
                path.unlink()
            if not path.exists() and artifact == "pt2" and later is not None:
                later.append(PackageBuild(fusion, artifacts, path, precision, device, made_from))
                continue
            if not path.exists():
                log(f"exporting {cfg.preset}/{fusion} to {path}")
                try:
                    _export(artifact, artifacts, path, precision, cfg, device, calibration, checkpoint,
                            accuracy_gate)
                except UserError as e:  # e.g. an AOTInductor build that crashed its process: that backend's rows say
                    artifacts.failed[artifact] = str(e)
                    continue
                write_json(_made_from_path(path), made_from)
        setattr(artifacts, artifact, path)
        if artifact == "onnx" and cfg.precision == "int8":  # and NNCF's IR beside it, where the export kept one
            artifacts.ir = int8_artifacts(artifacts.model, path).ir
    return artifacts, source


@dataclass
class PackageBuild:
    """A ``.pt2`` that ``load_artifacts`` left for ``build_packages``: whose, where, how, and what it is made from."""

    fusion: str
    artifacts: Artifacts
    path: Path
    precision: str
    device: torch.device
    made_from: dict


def build_packages(builds: list[PackageBuild], jobs: int, log=print, timeout_s: float = 3600) -> None:
    """Build ``builds`` ``jobs`` at a time (``PackagesAhead``: each in its own child process, killed after
    ``timeout_s``); the models of a sweep are independent. Each build's ``Artifacts`` gets its package, or the reason
    it failed, as ``load_artifacts`` would have set them; nothing is timed meanwhile."""
    if not builds:
        return
    jobs = max(1, min(jobs, len(builds)))
    log(f"building {len(builds)} AOTInductor package(s), {jobs} at a time: "
        + ", ".join(f"{b.fusion} → {b.path}" for b in builds))
    with PackagesAhead({b.path: (b.artifacts.model, b.precision, b.device) for b in builds}, jobs, timeout_s) as ahead:
        for b in builds:
            try:
                built = ahead.take(b.path)
            except UserError as e:  # e.g. one that crashed its process: that backend's rows say, the others build on
                b.artifacts.failed["pt2"] = str(e)
                log(f"{b.fusion}: {e}")
                continue
            write_json(_made_from_path(b.path), b.made_from)
            b.artifacts.pt2 = b.path
            log(f"{b.fusion}: built {b.path} in {sum(built['seconds'].values()):.0f} s")


# What a trained model's int8 export notes it was made with: NNCF's IR held to the accuracy gate, as `fusionprof
# export` holds it (a sweep's IR was once kept on parity and speed alone: one noted without this is made again).
IR_GATED = "kept only if it passed the accuracy gate"


def _made_from_path(export: Path) -> Path:
    return export.with_name(f"{export.name}.made-from.json")


def _made_from(export: Path) -> dict | None:
    """What a sweep's own export was made from (the weights, and a TensorRT plan's batch sizes), as it wrote beside
    it; None for an export without that note (written by an older fusionprof, or not by a sweep)."""
    try:
        return json.loads(_made_from_path(export).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _plan_batches(cfg: SweepConfig) -> list[int]:
    """The batch sizes a sweep's TensorRT engine is built over: every batch it times (and parity checks)."""
    return profile_batches(max(cfg.batch_sizes))


# What each artifact is called on disk, and the export format (and so the record) it comes from.
ARTIFACT_NAMES = {"onnx": lambda precision, device_type: onnx_name(precision),
                  "plan": lambda precision, device_type: plan_name(precision), "pt2": pt2_name}
ARTIFACT_FORMATS = {"onnx": "onnx", "plan": "trt", "pt2": "pt2"}


def graph_precision(artifact: str, precision: str) -> str:
    """The precision of the artifact a sweep in ``precision`` loads. A bf16 sweep's ONNX is the fp32 graph: no
    runtime here loads a bf16 ONNX (``openvino`` computes the fp32 graph in bf16 through its inference hint), so the
    fp32 export is loaded, the checkpoint's verified one or an fp32 sweep's, not exported again under another name.
    The sweep checks its parity with bf16's tolerances all the same."""
    return "fp32" if artifact == "onnx" and precision == "bf16" else precision


def _export(artifact: str, artifacts: Artifacts, path: Path, precision: str, cfg: SweepConfig, device: torch.device,
            calibration, checkpoint: Path | None, accuracy_gate=None) -> None:
    """Write ``artifact`` at ``path``. ``accuracy_gate`` makes the checkpoint's ``AccuracyGate`` (None: untrained)."""
    model = artifacts.model
    if artifact == "pt2":
        build_pt2(model, path, precision, device)
    elif artifact == "plan":  # from the ONNX, over every batch the sweep times and its caption length
        if artifacts.onnx is None:
            raise UserError(f"no ONNX to build a TensorRT engine from ({artifacts.failed.get('onnx')})")
        build_engine(artifacts.onnx, path, optimization_profile(_plan_batches(cfg), [1, model.cfg.max_text_len],
                                                                model.cfg.image_size))
    elif precision == "int8":  # quantized on a validation sample: the checkpoint's data, else the embedded set's
        written = export_int8_onnx(model, path, *calibration(), _fp32_to_quantize(checkpoint, path))
        kept = int8_artifacts(model, path)
        if kept.ir is not None and accuracy_gate is not None:  # NNCF's IR, held to the gate `fusionprof export` applies
            gate_ir(written["openvino"], kept, accuracy_gate())
    else:
        export_onnx(model, path, precision)


def _fp32_to_quantize(checkpoint: Path | None, int8_path: Path) -> dict | None:
    """The fp32 ONNX an int8 export of this sweep's model quantizes rather than exporting its own (only if it holds
    parity with the model now): the checkpoint's verified export, else the one an earlier fp32 sweep wrote beside
    ``int8_path`` (of the same checkpoint, or of the same seeded random init)."""
    if checkpoint is not None and (verified := verified_onnx(checkpoint, checkpoint.parent, "fp32")) is not None:
        return verified
    swept = int8_path.with_name(onnx_name("fp32"))
    return {"path": str(swept), "reused": "an earlier fp32 sweep's export"} if swept.exists() else None


def _exports_needed(cfg: SweepConfig, device: torch.device) -> list[str]:
    """The exports the chosen backends load, where they can run the sweep's precision on its device here, in the
    order they are built: a TensorRT plan is built from the ONNX."""
    loaded = {BACKENDS.get(name).artifact for name in cfg.backends if not not_runnable(name, device, cfg.precision)}
    loaded |= {"onnx"} if "plan" in loaded else set()
    return [artifact for artifact in ARTIFACT_NAMES if artifact in loaded]


# --------------------------------------------------------------------------- scenario: what to call, how often


@dataclass
class Cell:
    """What a backend's cells share: the inputs' shape and cost, and what the result is compared against."""

    fusion: str
    seq_len: int
    flops_per_sample: float
    model: dict  # which weights


@dataclass
class Prepared:
    """A backend ready to be timed: built fresh, its real first call timed before anything else ran it, checked
    for parity (a backend that fails it is timed all the same; its rows say so)."""

    name: str
    backend: Backend
    model: FusionModel
    cell: Cell
    load_seconds: float
    first_call_ms: float
    first_batch: int
    passed: bool
    # The largest batch's row where checking parity there failed (memory, a shape refused): that batch is not timed,
    # the batches below it are
    unchecked: LatencyRow | None = None

    def times(self, batch_size: int) -> bool:
        """Whether a cell at ``batch_size`` is timed: every one but an unchecked largest batch's."""
        return self.unchecked is None or batch_size != self.unchecked.batch_size


def prepare_backend(name: str, artifacts: Artifacts, device: torch.device, cfg: SweepConfig, cell: Cell) -> Prepared:
    start = time.perf_counter()
    backend = create_backend(name, artifacts, device, cfg.precision)
    load_seconds = time.perf_counter() - start
    first_batch = cfg.batch_sizes[0]
    inputs = example_inputs(artifacts.model.cfg, first_batch, cell.seq_len)
    start = time.perf_counter()
    backend.run(*inputs)  # host logits: the call has finished when it returns
    first_call_ms = (time.perf_counter() - start) * 1e3
    largest, unchecked = max(cfg.batch_sizes), None
    try:  # tolerances stated per precision; the largest batch timed is among the shapes checked
        passed = parity(artifacts.model, backend, cfg.precision, largest_batch=largest)["passed"]
    except CELL_FAILURES as e:
        if largest <= PARITY_MAX_BATCH:  # at a shape every backend is checked at: no use here
            raise
        # at the largest batch, most often (memory: the eager reference's or the backend's): its row says so, and
        # the smaller batches are checked without it and timed, rather than lost with it
        unchecked = LatencyRow(cell.fusion, name, f"failed: checking parity: {_failure(e, device)}", batch_size=largest)
        passed = parity(artifacts.model, backend, cfg.precision, largest_batch=PARITY_MAX_BATCH)["passed"]
    return Prepared(name, backend, artifacts.model, cell, load_seconds, first_call_ms, first_batch, passed, unchecked)


@dataclass
class Visit:
    """What one visit to a cell measured: copy-inclusive samples, device-resident ones on CUDA, peak memory, what
    other processes took of the CPUs meanwhile, and what each clock's warm-up did."""

    host: list[float]
    device_resident: list[float] | None
    peak: dict
    contention: dict
    host_warmup: Warmup | None = None
    device_warmup: Warmup | None = None


def visit_cell(prepared: Prepared, batch_size: int, protocol: Protocol) -> Visit:
    """One visit to a (backend, batch size) cell: warm-up, then samples per ``protocol``."""
    backend = prepared.backend
    images, ids, mask = example_inputs(prepared.model.cfg, batch_size, prepared.cell.seq_len)
    with peak_memory(backend.device) as peak, contention.watch() as others:
        host = sample_with_warmup(host_timer(lambda: backend.run(images, ids, mask), backend.synchronize), protocol)
        device_resident = None
        if backend.device.type == "cuda":
            on_device = [t.to(backend.device) for t in (images, ids, mask)]
            device_resident = sample_with_warmup(
                cuda_event_timer(lambda: backend.run_on_device(*on_device), backend.device), protocol)
    if device_resident is None:
        return Visit(host.samples, None, peak, others, host.warmup)
    return Visit(host.samples, device_resident.samples, peak, others, host.warmup, device_resident.warmup)


def row_of(prepared: Prepared, batch_size: int, visits: list[Visit], interleaved: bool = False) -> LatencyRow:
    """A cell's row from its visits: their samples in call order, in an interleaved sweep the p50 of each visit
    beside them (fewer than its rounds where the backend failed a later visit), the largest peak, and the other
    processes' load over all of them."""
    backend, cell = prepared.backend, prepared.cell

    def timing(series: list[list[float]], clock: str, warmups: list[Warmup | None]) -> Timing:
        t = Timing.of([x for s in series for x in s], clock, [w for w in warmups if w is not None])
        if interleaved:
            t.rounds_p50_ms, t.rounds_calls = [float(np.median(s)) for s in series], [len(s) for s in series]
        return t

    host = timing([v.host for v in visits], HOST_TIMING if backend.device.type == "cuda" else CPU_TIMING,
                  [v.host_warmup for v in visits])
    device_resident = timing([v.device_resident for v in visits], DEVICE_TIMING, [v.device_warmup for v in visits]) \
        if visits[0].device_resident is not None else None
    peak = largest_peaks([v.peak for v in visits])
    others = visits[0].contention if len(visits) == 1 else contention.combine([v.contention for v in visits])
    if backend.device.type == "cuda" and backend.cuda_memory_unseen:  # a figure that would flatter it: none at all
        peak.pop("cuda_max_allocated_mib", None)
        peak["cuda_memory"] = f"not measured: {backend.cuda_memory_unseen}"
    return LatencyRow(cell.fusion, prepared.name, "ok" if prepared.passed else PARITY_FAILED, batch_size, host,
                      device_resident, first_call_of_fresh_backend_ms=prepared.first_call_ms,
                      first_call_batch_size=prepared.first_batch, load_seconds=prepared.load_seconds,
                      seq_len=cell.seq_len, flops_per_sample=cell.flops_per_sample, parity_passed=prepared.passed,
                      peak_memory=peak, contention=others, model=cell.model, backend_info=backend.describe())


def round_protocol(protocol: Protocol, rounds: int) -> Protocol:
    """One visit's share of a cell's sampling when it is timed over ``rounds`` visits. Each visit warms up anew, in
    full: another cell ran in between. (Warming a revisit up for its share of the time saved 14 % of a tiny sweep
    and doubled the p90 of its misses against other sweeps, 24.8 % against 14.5 %, in an A-B on one VM:
    profiles/vm/warmup-ab-tiny-20261203T1628Z.json.)"""
    return dataclasses.replace(protocol, min_seconds=protocol.min_seconds / rounds,
                               min_calls=math.ceil(protocol.min_calls / rounds),
                               max_seconds=protocol.max_seconds / rounds,
                               max_calls=math.ceil(protocol.max_calls / rounds))


def visit_order(cells: list, rounds: int, first_round: int = 0) -> Iterator[tuple[int, object]]:
    """(round, cell) in the order an interleaved sweep times them: every cell each round, the order reversed every
    other round, so that over two rounds each cell's visits sit on average at the middle of the sweep's time. A
    resumed sweep starts at ``first_round``."""
    for r in range(first_round, rounds):
        for cell in cells if r % 2 == 0 else reversed(cells):
            yield r, cell


def visits_of(row: LatencyRow) -> list[Visit]:
    """The visits an interleaved row was made from, as a resumed sweep continues them: its samples split by visit
    (``rounds_calls``), its peak memory, the other processes' load and the warm-ups over them all carried by the
    first."""
    def split(t: Timing) -> list[list[float]]:
        ends = np.cumsum(t.rounds_calls).tolist()
        return [t.samples_ms[a:b] for a, b in zip([0, *ends], ends, strict=False)]
    host = split(row.host)
    resident = split(row.device_resident) if row.device_resident else [None] * len(host)
    warmups = (row.host.warmup(), row.device_resident.warmup() if row.device_resident else None)
    return [Visit(h, d, row.peak_memory, row.contention if k == 0 else {}, *(warmups if k == 0 else (None, None)))
            for k, (h, d) in enumerate(zip(host, resident, strict=True))]


def unfinished(rows: list[LatencyRow], rounds: int) -> set[tuple[str, str]]:
    """The (fusion, backend) pairs of an interleaved sweep's rows so far that a resumed sweep continues: timed in
    fewer than ``rounds`` visits, none failed."""
    pairs = {(r.fusion, r.backend) for r in rows
             if r.host and r.host.rounds_calls and len(r.host.rounds_calls) < rounds}
    return pairs - {(r.fusion, r.backend) for r in rows if r.host is None}


def not_runnable(name: str, device: torch.device, precision: str) -> str | None:
    """Why backend ``name`` cannot run this sweep here, or None."""
    backend = BACKENDS.get(name)
    ok, reason = backend.available(device)
    return reason if not ok else backend.precision_problem(precision, device)


# --------------------------------------------------------------------------- the sweep


def check_sweep(cfg: SweepConfig) -> torch.device:
    """Every option checked before any work: a bad one is a one-line error, not a failure an hour in."""
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device, INFERENCE_PRECISIONS)
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise UserError("--batch-sizes must be whole numbers of at least 1")
    for option, values in (("--fusion", cfg.fusions), ("--backends", cfg.backends), ("--batch-sizes", cfg.batch_sizes)):
        check_unique(option, values)
    for name in cfg.backends:
        BACKENDS.get(name)  # unknown names fail here
    if cfg.rounds < 1:
        raise UserError("--rounds must be at least 1")
    # one backend that cannot run is a row saying why, beside the others; a sweep with none that can is an error,
    # not a record of nothing
    if not cfg.backends:
        raise UserError("nothing to time: no backend asked for")
    reasons = {name: not_runnable(name, device, cfg.precision) for name in cfg.backends}
    if all(reasons.values()):
        raise UserError("nothing to time here: " + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    return device


def check_unique(option: str, values: list) -> None:
    """A one-line error naming a value given twice: ``--batch-sizes 1,1`` would time one cell twice, as two rows,
    and is more likely a typo than a wish (refused rather than quietly made one, so the user sees what they typed)."""
    seen = set()
    for value in values:
        if value in seen:
            raise UserError(f"{option} {','.join(map(str, values))}: {value} is given twice")
        seen.add(value)


def sweep(cfg: SweepConfig, progress: bool = True, log=print, resume: bool = False,
          jobs: int | None = None) -> LatencyRecord:
    """Every (fusion, backend, batch size) cell of ``cfg``: one record, written when the sweep ends, and the rows so
    far (``PARTIAL_SUFFIX``) after every backend, or in an interleaved sweep after every round. ``resume``: continue
    the newest unfinished sweep with these settings on this machine, keeping its rows and measuring only the
    (fusion, backend) pairs it had not reached, or the rounds it had not reached. ``jobs``: ``.pt2`` packages built
    at once, before anything is timed (``build_jobs``). On ``cfg.threads`` threads, if given, and the caller's
    after."""
    with torch_threads(cfg.threads):
        return _sweep(cfg, progress, log, resume, build_jobs(jobs))


def load_ahead(cfg: SweepConfig, fusions: list[str], work_dir: Path, jobs: int, log=print,
               timeout_s: float = 3600) -> dict[str, tuple[Artifacts, dict]]:
    """Every one of ``fusions``' artifacts at once, their ``.pt2`` packages built side by side (``build_packages``),
    where the sweep needs packages of more than one model and may build more than one at a time; {} otherwise: the
    sweep then loads each fusion's artifacts when it reaches it, one model in memory at a time."""
    if jobs < 2 or len(fusions) < 2 or "pt2" not in _exports_needed(cfg, resolve_device(cfg.device)):
        return {}
    builds: list[PackageBuild] = []
    loaded = {fusion: load_artifacts(cfg, fusion, work_dir, log, later=builds) for fusion in fusions}
    build_packages(builds, jobs, log, timeout_s)
    return loaded


def _sweep(cfg: SweepConfig, progress: bool, log, resume: bool, jobs: int) -> LatencyRecord:
    device = check_sweep(cfg)
    env = fingerprint()
    out_dir = Path(cfg.profiles_dir) / env["host"]
    # int8 runs in exported graphs only, with no torch matmul of its own: its rows are rated against fp32's
    matmul_dtype = cfg.precision if cfg.precision in DTYPES else "fp32"
    start = matmul_rate(device, matmul_dtype)
    log(f"yardstick: a {start['n']}² {start['dtype']} matmul on {device} runs at {start['gflops']:.0f} GFLOP/s")
    config = {**to_dict(cfg), "protocol": cfg.protocol.to_dict()}
    stem = f"latency-{cfg.preset}-{device.type}-{cfg.precision}"
    partial_path, began, rows = _begin(out_dir, stem, config, env, resume, log)
    kept = len(rows)
    going_on = unfinished(rows, cfg.rounds)  # an interleaved sweep's pairs, resumed: their visits so far, continued
    earlier = {pair: [r for r in rows if (r.fusion, r.backend) == pair] for pair in going_on}
    rows = [r for r in rows if (r.fusion, r.backend) not in going_on]
    done = {(r.fusion, r.backend) for r in rows}
    peak = datasheet_tflops(torch.cuda.get_device_name(device), cfg.precision) if device.type == "cuda" else None

    def save(so_far: list[LatencyRow]) -> None:
        rate_against(so_far, start["gflops"], peak)
        save_partial(partial_path, LatencyRecord(began, env, config, {"start": start}, so_far))

    ready = load_ahead(cfg, [f for f in cfg.fusions if any((f, name) not in done for name in cfg.backends)], out_dir,
                       jobs, log)
    per_pair = len(cfg.batch_sizes) * cfg.rounds  # progress steps: one per visit
    bar = tqdm(total=len(cfg.fusions) * len(cfg.backends) * per_pair, desc="latency", disable=not progress)
    interleaved: list[Prepared] = []  # rounds > 1: every backend made ready first, then timed in rounds
    before: dict[tuple[int, int], list[Visit]] = {}  # (its index there, batch): visits an earlier process made
    for fusion in cfg.fusions:
        if all((fusion, name) in done for name in cfg.backends):  # resumed: measured before
            bar.update(len(cfg.backends) * per_pair)
            continue
        artifacts, source = ready.pop(fusion, None) or load_artifacts(cfg, fusion, out_dir, log)
        seq_len = cfg.seq_len or artifacts.model.cfg.max_text_len
        cell = Cell(fusion, seq_len, forward_flops(artifacts.model, seq_len)["total"], source)
        for name in cfg.backends:
            if (fusion, name) in done:
                bar.update(per_pair)
                continue
            reason = not_runnable(name, device, cfg.precision)
            failure = artifacts.failed.get(BACKENDS.get(name).artifact)
            if reason or failure:
                rows.append(LatencyRow(fusion, name, f"unavailable: {reason}" if reason else f"failed: {failure}"))
                bar.update(per_pair)
                continue
            try:
                prepared = prepare_backend(name, artifacts, device, cfg, cell)
            except CELL_FAILURES as e:  # it cannot load here: a row says why, the sweep goes on
                rows += earlier.get((fusion, name), []) + [LatencyRow(fusion, name, f"failed: {_failure(e, device)}")]
                bar.update(per_pair)
                continue
            if cfg.rounds > 1:  # timed beside every other backend, once all are ready
                before |= {(len(interleaved), r.batch_size): visits_of(r) for r in earlier.get((fusion, name), [])}
                interleaved.append(prepared)
                continue
            rows += time_in_rounds([prepared], cfg, bar, device)
            del prepared  # released before the next backend loads: one in memory at a time
            save(rows)
    if interleaved:  # in the order a sweep of one round has them: by fusion, then backend, then batch
        if before:
            log(f"the interleaved sweep goes on at round {min(map(len, before.values())) + 1} of {cfg.rounds}")
        rows += time_in_rounds(interleaved, cfg, bar, device, before, lambda timed: save(rows + timed))
        rows.sort(key=lambda r: (cfg.fusions.index(r.fusion), cfg.backends.index(r.backend)))
    bar.close()
    reference = yardstick(start, matmul_rate(device, matmul_dtype))
    log(f"yardstick at the end: {reference['end']['gflops']:.0f} GFLOP/s ({reference['drift']:+.1%} from the start)")
    rate_against(rows, reference["gflops"], peak)
    stamp = utc_stamp()
    if kept:  # the record says which rows a process before this one measured
        config = {**config, "resumed": {"partial": str(partial_path), "rows_kept": kept}}
    record = LatencyRecord(created=stamp, environment=env, config=config, reference_matmul=reference, rows=rows)
    write_record(record, out_dir / f"{stem}-{stamp}.json")
    partial_path.unlink(missing_ok=True)
    return record


def time_in_rounds(prepared: list[Prepared], cfg: SweepConfig, bar: tqdm, device: torch.device,
                   before: dict[tuple[int, int], list[Visit]] | None = None, after_round=None) -> list[LatencyRow]:
    """The rows of backends made ready beforehand, every cell visited once a round (``visit_order``; one round:
    each batch size in turn). A backend that fails a visit (out of memory, a shape it cannot run) is visited no
    more: its row says at which batch (and round), beside the rows of the cells it had been timed at. A resumed
    sweep passes the visits an earlier process made (``before``, by backend index and batch: its rounds so far), and
    goes on at the next round; ``after_round(rows so far)`` is called at the end of every round but the last."""
    visits: dict[tuple[int, int], list[Visit]] = {k: list(v) for k, v in (before or {}).items()}
    first_round = min(map(len, visits.values()), default=0)
    failed: dict[int, LatencyRow] = {}
    cells = [(i, b) for i in range(len(prepared)) for b in cfg.batch_sizes]
    per_visit = round_protocol(cfg.protocol, cfg.rounds)

    def rows() -> list[LatencyRow]:
        out = []
        for i, p in enumerate(prepared):
            out += [row_of(p, b, visits[(i, b)], interleaved=cfg.rounds > 1) for b in cfg.batch_sizes
                    if visits.get((i, b))]
            out += [failed[i]] if i in failed else [p.unchecked] if p.unchecked else []
        return out

    bar.update(first_round * len(cells))
    for r, (i, batch_size) in visit_order(cells, cfg.rounds, first_round):
        bar.update(1)
        p = prepared[i]
        if i not in failed and p.times(batch_size):
            bar.set_postfix_str(f"{p.cell.fusion}/{p.name}/bs{batch_size} round {r + 1}")
            try:
                visits.setdefault((i, batch_size), []).append(visit_cell(p, batch_size, per_visit))
            except CELL_FAILURES as e:
                which = f" (round {r + 1})" if cfg.rounds > 1 else ""
                failed[i] = LatencyRow(p.cell.fusion, p.name, f"failed: {_failure(e, device)}{which}",
                                       batch_size=batch_size)
        if after_round and r + 1 < cfg.rounds and (i, batch_size) == (cells[-1] if r % 2 == 0 else cells[0]):
            after_round(rows())
    return rows()


# What a backend raises where it cannot load or run a cell: ours (the onnxruntime and openvino backends' for their
# runtime's errors too), memory's (``MemoryError``: theirs for memory running out) and ``RuntimeError`` (PyTorch's, OOM
# among them). ``_failure`` tells which of them is a row and which a bug.
CELL_FAILURES = (UserError, MemoryError, RuntimeError)


def _failure(e: Exception, device: torch.device) -> str:
    """Why a backend could not load or run here, in one line (on CUDA, after giving back what it held): a
    ``UserError`` or memory running out. Any other error is raised again: a bug to see, not a row."""
    if not (isinstance(e, UserError) or out_of_memory(e)):
        raise e
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return f"out of memory ({first_line(e)})" if out_of_memory(e) else str(e)


def _begin(out_dir: Path, stem: str, config: dict, env: dict, resume: bool, log) -> tuple[Path, str, list[LatencyRow]]:
    """Where this sweep keeps its rows so far, when it began, and its rows so far: none, or with ``resume`` those of
    the newest unfinished sweep with these settings on this machine."""
    found = find_partial(out_dir, config, env) if resume else None
    if found:
        path, record = found
        finished = {(r.fusion, r.backend) for r in record.rows} - unfinished(record.rows, config["rounds"])
        pairs = len(config["fusions"]) * len(config["backends"]) - len(finished)
        log(f"resuming {path}: {len(record.rows)} rows kept, {pairs} (fusion, backend) pairs to go")
        return path, record.created, list(record.rows)
    if resume:
        log(f"nothing to resume under {out_dir} with these settings on this machine: a new sweep")
    began = utc_stamp()
    return out_dir / f"{stem}-{began}{PARTIAL_SUFFIX}", began, []


# What two runs must share for one to resume the other's sweep: the machine, its software and the threads the rows
# ran with (rows timed on 1 thread and on 2 are not one sweep), not the free memory.
MACHINE_KEYS = ("host", "cpu_model", "cpu_logical_cores", "gpus", "cuda_driver", "versions", "torch_threads",
                "cpu_affinity", "omp_num_threads")


def find_partial(out_dir: Path, config: dict, env: dict) -> tuple[Path, LatencyRecord] | None:
    """The newest unfinished sweep under ``out_dir`` with exactly these settings, on this machine."""
    found = []
    for path in out_dir.glob(f"latency-*{PARTIAL_SUFFIX}"):
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # written atomically, so never half a file: whatever else it is, it is not ours
        if isinstance(d, dict) and d.get("kind") == PARTIAL_KIND and d.get("config") == config and all(
                d.get("environment", {}).get(k) == env.get(k) for k in MACHINE_KEYS):
            found.append((d["created"], path, d))
    if not found:
        return None
    _, path, d = max(found)
    return path, LatencyRecord.from_dict(d, path)


def save_partial(path: Path, record: LatencyRecord) -> None:
    write_json(path, {**record.to_dict(), "kind": PARTIAL_KIND,
                      "note": "an unfinished sweep: the rows measured before it stopped, rated against the yardstick "
                              "measured at its start"})


def rate_against(rows: list[LatencyRow], yardstick_gflops: float, peak_tflops: float | None) -> None:
    """Each timed row's achieved rate as a share of the yardstick and, on a known GPU in bf16 / fp16, of the
    datasheet peak (MFU). Both rate the same figure: on CUDA the device-resident mean (the GPU's own rate, no copies,
    as the yardstick's CUDA events and the datasheet measure theirs), on the CPU the host clock's."""
    for row in rows:
        if row.host is None:
            continue
        gflops = row.device_resident_gflops() or row.achieved_gflops
        row.share_of_matmul_yardstick = gflops / yardstick_gflops
        if peak_tflops:
            row.mfu = gflops / (peak_tflops * 1e3)


def trace_problem(cfg: SweepConfig) -> str | None:
    """Why ``trace_inference`` cannot trace this sweep (the eager backend does not run its precision: int8), or None."""
    device = resolve_device(cfg.device)
    return not_runnable(EAGER, device, cfg.precision)


def trace_inference(cfg: SweepConfig, work_dir: Path) -> Path:
    """One trace per (fusion, batch size) of the eager torch backend, in a run separate from the timed sweep, on
    the sweep's threads (``cfg.threads``; the caller's after).

    ``work_dir`` is the sweep's result folder, where its ONNX exports live."""
    with torch_threads(cfg.threads):
        return _trace_inference(cfg, work_dir)


def _trace_inference(cfg: SweepConfig, work_dir: Path) -> Path:
    device = resolve_device(cfg.device)
    for fusion in cfg.fusions:
        artifacts, _ = load_artifacts(cfg, fusion, work_dir, log=lambda s: None)
        backend = create_backend(EAGER, artifacts, device, cfg.precision)
        seq_len = cfg.seq_len or artifacts.model.cfg.max_text_len
        for batch_size in cfg.batch_sizes:
            inputs = example_inputs(artifacts.model.cfg, batch_size, seq_len)
            run = f"latency-{cfg.preset}-{fusion}-bs{batch_size}-{device.type}-{cfg.precision}"
            run_profiled(lambda i, x=inputs, b=backend: b.run(*x), trace_dir(cfg.profiles_dir, run), device)
    return trace_dir(cfg.profiles_dir, "")
