"""``fusionprof load``: MLPerf LoadGen against one (fusion, backend, precision, device) behind a dynamic batcher.

The query sample library is the test split's fixed ITM pairs (real images and captions; each caption's positive
and the negative evaluation draws for it), sample i being pair i; a batch's inputs are built as evaluation builds
them (``PairBatches``: captions trimmed to the batch's longest; ``to_inputs``: pixels normalised). Scenarios:
Server at one or several offered rates, or the largest VALID rate with p99 under a target (bisection, each trial a
full LoadGen run); Offline; SingleStream. Accuracy mode reads LoadGen's accuracy log back and checks its ITM
accuracy against the same backend's on the evaluation batches: proof the SUT answered the queries it was asked.
Nothing is timed before the backend passes the parity gate the export and the latency sweep hold it to, and an
artifact whose checkpoint's own export failed its gates is not served at all (``export_gate``, ``parity_gate``);
nor before every (batch, caption length) the batcher can form has been called once (``warm_up``).

Each run writes ``profiles/<host>/load-<scenario>-<preset>-<fusion>-<backend>-<precision>-<stamp>.json`` and
keeps LoadGen's own logs in the folder of the same name beside it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionprof import contention
from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, Artifacts, Backend, create_backend
from fusionprof.checkpoint import find_checkpoint, load_checkpoint, metrics_path, with_run_tokenizer
from fusionprof.config import ModelConfig, TrainConfig, from_dict, to_dict, train_config
from fusionprof.data import SplitData, prepare_data
from fusionprof.data.images import normalize
from fusionprof.data.itm import PairBatches
from fusionprof.data.text import build_tokenizer
from fusionprof.env import fingerprint, machine_name, utc_stamp
from fusionprof.errors import UserError
from fusionprof.evaluate import to_inputs
from fusionprof.export import export_record, failed_gates, parity, record_name
from fusionprof.loadgen import (
    ACCURACY_LOG,
    SCENARIOS,
    SERVER_MIN_QUERIES,
    BatchingSUT,
    LoadRecord,
    LoadRun,
    LoadSettings,
    check_above_zero,
    find_max_qps,
    gate_text,
    ms_or_dash,
    read_accuracy_log,
    run_loadgen,
)
from fusionprof.measure import Protocol, sample_calls
from fusionprof.metrics import accuracy, predict
from fusionprof.records import records_of_model
from fusionprof.runtime import INFERENCE_PRECISIONS, check_precision, resolve_device, torch_threads

CPU = torch.device("cpu")


@dataclass
class LoadConfig:
    fusion: str
    backend: str
    scenario: str
    preset: str = "tiny"
    precision: str = "fp32"
    device: str = "cpu"
    qps: list[float] = field(default_factory=list)  # server: the offered rates
    find_max_qps: bool = False  # server: bisect for the largest VALID rate with p99 ≤ p99_ms
    p99_ms: float = 50.0  # server: LoadGen's latency target (its 99th percentile)
    max_batch: int = 1  # 1: no batching
    batch_timeout_ms: float = 0.0  # how long the oldest queued sample waits for the batch to fill
    min_duration_s: float = 10.0
    min_queries: int | None = None  # None: SERVER_MIN_QUERIES in Server (early stopping needs them), else 100
    max_trials: int = 8  # find-max: LoadGen runs at most
    threads: int | None = None  # torch / onnxruntime intra-op threads (None: torch's default)
    spin_wait: bool = True  # onnxruntime's pool threads busy-wait between calls (off: they sleep, for shared cores)
    accuracy: bool = False
    models_dir: str = "models"
    profiles_dir: str = "profiles"


def rate_name(qps: float) -> str:
    """An offered rate as its run's log folder names it (``server-<rate>qps``): two rates alike here share one."""
    return f"{qps:.6g}"


def check(cfg: LoadConfig) -> torch.device:
    """Every option checked before anything loads: a bad one is a one-line error."""
    if cfg.scenario not in SCENARIOS:
        raise UserError(f"unknown scenario {cfg.scenario!r}; choose from {', '.join(SCENARIOS)}")
    for qps in cfg.qps:
        check_above_zero("--qps", qps)
    check_above_zero("--p99-ms", cfg.p99_ms)
    if cfg.max_batch < 1:
        raise UserError(f"--max-batch must be at least 1, got {cfg.max_batch}")
    if not 0 <= cfg.batch_timeout_ms < math.inf:
        raise UserError(f"--batch-timeout-ms must be 0 or more and finite, got {cfg.batch_timeout_ms:g}")
    check_above_zero("--min-duration", cfg.min_duration_s)
    if cfg.scenario == "single-stream" and cfg.max_batch > 1:  # one query in flight: a batch of it never fills
        raise UserError(f"--max-batch {cfg.max_batch} with --scenario single-stream would only add "
                        "--batch-timeout-ms to every query (one is in flight at a time): leave --max-batch at 1")
    if cfg.accuracy and cfg.find_max_qps:  # accuracy mode is one run at one rate: the search would be ignored
        raise UserError("--accuracy checks the answers of one run; --find-max-qps searches for a rate: run them "
                        "separately")
    rates = [rate_name(qps) for qps in cfg.qps]  # a repeat would run again into, and overwrite, the first's logs
    if repeated := next((rate for i, rate in enumerate(rates) if rate in rates[:i]), None):
        raise UserError(f"--qps {repeated} is given twice: each rate is one LoadGen run, logged to its own folder; "
                        "give it once")
    if cfg.accuracy and len(cfg.qps) > 1:  # accuracy mode is one run at one rate: the other rates would be ignored
        raise UserError(f"--accuracy checks the answers of one run at one rate; --qps gives {len(cfg.qps)}: give one")
    if cfg.scenario == "server" and not cfg.accuracy and bool(cfg.qps) == cfg.find_max_qps:
        raise UserError("--scenario server needs --qps Q,... or --find-max-qps (one of the two)")
    if cfg.scenario != "server" and (cfg.qps or cfg.find_max_qps):
        raise UserError(f"--qps and --find-max-qps are for --scenario server, not {cfg.scenario}")
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device, INFERENCE_PRECISIONS)
    backend = BACKENDS.get(cfg.backend)  # unknown names fail here
    ok, reason = backend.available(device)
    if not ok:
        raise UserError(f"backend {cfg.backend} is unavailable: {reason}")
    problem = backend.precision_problem(cfg.precision, device)
    if problem:
        raise UserError(problem)
    return device


def sweep_config(cfg: LoadConfig):
    """The latency sweep's settings whose artifacts this run loads. Its batch sizes reach ``max_batch``: a TensorRT
    engine's profile is built over them, and one built over the sweep's default (up to 32) cannot run a larger batch
    the batcher forms. (The profile depends on the largest only: up to 32 it is the sweep's, whose engine is reused.)"""
    from fusionprof.latency import SweepConfig

    sweep = SweepConfig(preset=cfg.preset, fusions=[cfg.fusion], backends=[cfg.backend], device=cfg.device,
                        precision=cfg.precision, models_dir=cfg.models_dir, profiles_dir=cfg.profiles_dir)
    sweep.batch_sizes = sorted({*sweep.batch_sizes, cfg.max_batch})
    return sweep


def load_artifacts(cfg: LoadConfig, work_dir: Path, log=print) -> tuple[Artifacts, dict]:
    """The model and its verified ONNX, found (or exported) exactly as the latency sweep finds them."""
    from fusionprof.latency import load_artifacts as sweep_artifacts

    return sweep_artifacts(sweep_config(cfg), cfg.fusion, work_dir, log)


# --------------------------------------------------------------------------- the gate: nothing wrong is served


def export_gate(cfg: LoadConfig, device: torch.device) -> dict | None:
    """The checkpoint's own export record of the artifact this backend loads (its format, graph precision and device
    type), read before anything is built: one that says that export failed a gate for this very checkpoint is a
    one-line refusal, for a rebuild from the same weights (which the sweep makes where the checkpoint's own export
    is not verified) is the same wrong artifact. None: no checkpoint, a backend that loads no export, or no record."""
    from fusionprof.latency import ARTIFACT_FORMATS, graph_precision

    artifact = BACKENDS.get(cfg.backend).artifact
    checkpoint = find_checkpoint(cfg.models_dir, cfg.preset, cfg.fusion)
    if artifact is None or checkpoint is None:
        return None
    fmt, precision = ARTIFACT_FORMATS[artifact], graph_precision(artifact, cfg.precision)
    path = checkpoint.parent / record_name(fmt, precision, device.type)
    record = export_record(checkpoint, checkpoint.parent, fmt, precision, device.type)
    if failed := failed_gates(record):
        raise UserError(f"{path}: this checkpoint's {fmt} {precision} export failed its {' and '.join(failed)} "
                        f"gate; load does not serve that model (fix it, or export it again once it passes)")
    return None if record is None else {"path": str(path), "status": record.get("status")}


def parity_gate(cfg: LoadConfig, model, backend: Backend, exported: dict | None) -> dict:
    """The backend against the PyTorch model, as the export and the latency sweep check it (the tolerances stated
    per precision; the largest batch the batcher forms among the shapes), before any timed run. One that fails is a
    one-line refusal: a fast answer from a wrong model is no figure. ``exported``: the export record read."""
    checked = parity(model, backend, cfg.precision, largest_batch=cfg.max_batch)
    gate = {"passed": checked["passed"], "max_abs_error": max(row["max_abs_error"] for row in checked["shapes"]),
            "tolerance": checked["tolerance"], "decision_agreement": checked["decision_agreement"],
            "shapes": checked["shapes"], "export_record": exported}
    if not gate["passed"]:
        raise UserError(f"{cfg.fusion} on {cfg.backend} {cfg.precision} fails parity with the PyTorch model "
                        f"({gate_text(gate)}); load does not serve it")
    return gate


# --------------------------------------------------------------------------- the query sample library


class SampleLibrary:
    """The test split's fixed ITM pairs; sample i is pair i, its label ``labels[i]``.

    As an MLPerf QSL loads its samples to RAM preprocessed, every test image is normalised once, up front (the
    same ``normalize`` evaluation applies per batch, element for element the same values): a query then costs
    the SUT a gather, not a normalisation, which on 2 busy cores took longer than the model."""

    def __init__(self, split: SplitData, seed: int):
        self.split, self.pairs = split, split.pairs(seed)
        pixels = torch.from_numpy(np.ascontiguousarray(split.image.get(np.arange(split.n_images))))
        self.images = Preprocessed(normalize(pixels).numpy())

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def labels(self) -> np.ndarray:
        return self.pairs.label

    def caption_lengths(self) -> np.ndarray:
        """Each sample's caption length (its real tokens): a batch's text is trimmed to its longest."""
        return self.split.attention_mask.sum(1).numpy()[self.pairs.caption]

    def inputs(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Host inputs of these samples as one batch, built as evaluation builds a batch (``PairBatches``:
        captions trimmed to the batch's longest; ``to_inputs``: float images pass as they are)."""
        batch = PairBatches(self.images, self.split.text, self.split.attention_mask, self.pairs, len(indices),
                            order=indices)[0]
        return to_inputs(batch, CPU)[0]


@dataclass
class Preprocessed:
    """Normalised images [N, 3, H, W], gathered by index (the ``get`` an image source has)."""

    array: np.ndarray

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.array[index]


def test_library(preset: str, model_cfg: ModelConfig, source: dict,
                 progress: bool = True) -> tuple[SampleLibrary, TrainConfig]:
    """The library of the run's test split (the dataset, seed and limits it was trained with), and its config."""
    if "checkpoint" in source:
        checkpoint = Path(source["checkpoint"])
        tcfg = from_dict(TrainConfig, load_checkpoint(checkpoint)["train_config"])
        model_cfg = with_run_tokenizer(model_cfg, checkpoint.parent)
    else:
        tcfg = train_config(preset)  # an untrained model: the preset's dataset and seed
    tokenizer = build_tokenizer(model_cfg, log=lambda s: None)
    splits, _ = prepare_data(tcfg.data, tokenizer, model_cfg.image_size, model_cfg.max_text_len, tcfg.seed,
                             limit_eval=tcfg.limit_eval, splits=("test",), progress=progress,
                             layout=tcfg.data_layout)
    return SampleLibrary(splits["test"], tcfg.seed), tcfg


def batch_shapes(library: SampleLibrary, max_batch: int) -> dict[tuple[int, int], int]:
    """Every (batch size, caption length) the batcher can form, each with a sample whose caption has that length.

    A batch holds 1 to ``max_batch`` samples and its text is trimmed to its longest caption; LoadGen draws samples
    with replacement, so a batch of any size can hold captions all of one length. The set is bounded (``max_batch``
    × the library's distinct caption lengths), so every shape is warmed as it is and nothing is padded to buckets
    (which would change what is timed)."""
    lengths, first = np.unique(library.caption_lengths(), return_index=True)
    return {(batch, int(length)): int(sample) for batch in range(1, max_batch + 1)
            for length, sample in zip(lengths, first, strict=True)}


def warm_up(run: Callable, library: SampleLibrary, max_batch: int, progress: bool = False) -> dict:
    """One call at every shape the batcher can form (``batch_shapes``), before anything is timed: a backend that
    compiles or captures per shape (torch-compile's recompiles, a CUDA graph per shape in torch-cudagraphs and aoti
    on a GPU) does it here, not inside a timed LoadGen run. What was warmed, for the record."""
    start = time.perf_counter()
    shapes = batch_shapes(library, max_batch)
    for (batch, _), sample in tqdm(shapes.items(), desc="warm-up", unit="shape", disable=not progress):
        run(*library.inputs(np.full(batch, sample)))
    return {"shapes": len(shapes), "batch_sizes": [1, max_batch],
            "caption_lengths": sorted({length for _, length in shapes}), "seconds": time.perf_counter() - start}


# Sizing LoadGen's schedule needs a steady median, not a full sweep: the measurement protocol, scaled down (5 calls
# after one warm-up gave 11.3-19.5 ms for one batch of 16 in three runs on one 2-core VM)
SIZING = Protocol(warmup_seconds=0.2, warmup_calls=3, min_seconds=0.5, min_calls=10, max_seconds=5.0)


def seconds_per_batch(run: Callable, library: SampleLibrary, batch_size: int) -> float:
    """The backend's median time for one batch of ``batch_size`` samples, its inputs gathered each call as the
    batcher does: what sizes LoadGen's schedule (offline's expected rate, single-stream's expected latency, find-max's
    first rate)."""
    indices = np.arange(min(batch_size, len(library)))
    times_ms = sample_calls(lambda: run(*library.inputs(indices)), lambda: None, SIZING)
    return float(np.median(times_ms)) / 1e3 * batch_size / len(indices)


# --------------------------------------------------------------------------- the scenarios


def _settings(cfg: LoadConfig, **kw) -> LoadSettings:
    min_queries = cfg.min_queries or (SERVER_MIN_QUERIES if cfg.scenario == "server" else 100)
    return LoadSettings(cfg.scenario, p99_ms=cfg.p99_ms if cfg.scenario == "server" else None,
                        min_duration_s=cfg.min_duration_s, min_query_count=min_queries, **kw)


def run_scenario(cfg: LoadConfig, sut: BatchingSUT, library: SampleLibrary, batch_s: float, log_dir: Path,
                 log=print) -> tuple[list[LoadRun], LoadRun | None]:
    """The LoadGen runs one performance-mode ``fusionprof load`` makes, and the find-max winner (or None)."""
    rate = cfg.max_batch / batch_s  # the backend's rate on full batches, back to back

    def server(qps: float, min_queries: int | None = None) -> LoadRun:
        settings = _settings(cfg, target_qps=qps)
        if min_queries:  # find-max: LoadGen asked for more queries to decide this rate
            settings.min_query_count = max(settings.min_query_count, min_queries)
        folder = f"server-{rate_name(qps)}qps" + (f"-{settings.min_query_count}queries" if min_queries else "")
        run = run_loadgen(sut, len(library), settings, log_dir / folder)
        log(f"server {qps:8.1f} QPS offered: {describe(run)}")
        return run

    if cfg.scenario == "server" and cfg.find_max_qps:
        best, runs = find_max_qps(server, first_qps=round(0.8 * rate, 1), max_trials=cfg.max_trials)
        return runs, best
    if cfg.scenario == "server":
        return [server(qps) for qps in cfg.qps], None
    if cfg.scenario == "offline":  # 1.5×: the one big query then lasts past min_duration unless the guess is low
        settings = _settings(cfg, expected_qps=1.5 * rate)
    else:  # half the measured latency: LoadGen then schedules enough queries to fill min_duration
        settings = _settings(cfg, expected_latency_ms=batch_s / cfg.max_batch * 1e3 / 2)
    run = run_loadgen(sut, len(library), settings, log_dir / cfg.scenario)
    log(f"{cfg.scenario}: {describe(run)}")
    return [run], None


def describe(run: LoadRun) -> str:
    """One line: VALID with its figures, or INVALID with LoadGen's reasons and no figure; and a busy neighbour."""
    neighbour = contention.tag(run.contention)
    b = run.breakdown
    inside = (f"in the SUT p50 / p99: queued {b['queued_ms']['p50']:.2f} / {ms_or_dash(b['queued_ms']['p99'])} ms, "
              f"served {b['served_ms']['p50']:.2f} / {ms_or_dash(b['served_ms']['p99'])} ms" if b else "")
    if not run.valid:  # no figure; where the time went inside the SUT says why (a queue that grew: overload)
        return ("INVALID (" + "; ".join(run.invalid_reasons or ["LoadGen gave no reason"]) + ")"
                + (f" [{inside}]" if inside else "") + neighbour)
    batches = sum(run.batch_sizes.values())
    mean_batch = sum(k * v for k, v in run.batch_sizes.items()) / max(batches, 1)
    latency = "" if run.scenario == "offline" else f"p50 {run.p50_ms:.2f} ms  p99 {run.p99_ms:.2f} ms  "
    return (f"VALID  {latency}{run.samples_per_s:.1f} samples/s  (mean batch {mean_batch:.2f}"
            f"{'; ' + inside if inside else ''}){neighbour}")


def accuracy_check(cfg: LoadConfig, sut: BatchingSUT, library: SampleLibrary, backend: Backend, tcfg: TrainConfig,
                   rate: float, log_dir: Path) -> tuple[LoadRun, dict]:
    """LoadGen's accuracy mode, read back, against the backend's accuracy on the evaluation batches."""
    qps = cfg.qps[0] if cfg.qps else round(0.5 * rate, 1)
    settings = _settings(cfg, target_qps=qps if cfg.scenario == "server" else None, expected_qps=rate,
                         expected_latency_ms=1e3 / rate, accuracy=True)
    run = run_loadgen(sut, len(library), settings, log_dir / "accuracy")
    logged = read_accuracy_log(Path(run.logs) / ACCURACY_LOG, len(library))
    batches = library.split.batches(library.pairs, tcfg.batch_size)
    reference, labels = predict(lambda b: backend.run(*to_inputs(b, CPU)[0]), batches)
    answered = ~np.isnan(logged)
    result = {"pairs": len(library), "answered": int(answered.sum()),
              "loadgen_accuracy": accuracy(logged, labels) if answered.all() else None,
              "backend_accuracy": accuracy(reference, labels), "eval_batch_size": tcfg.batch_size,
              "decisions_differing": int(((logged > 0) != (reference > 0)).sum()),
              "max_abs_logit_difference": float(np.abs(logged - reference).max()) if answered.all() else None}
    # every query answered, each with the backend's own decision: equal accuracies alone could hide swapped answers
    result["matches"] = (result["answered"] == result["pairs"] and result["decisions_differing"] == 0
                         and result["loadgen_accuracy"] == result["backend_accuracy"])
    return run, result


def trained_accuracy(source: dict, profiles_dir: str, env: dict) -> float | None:
    """The checkpoint's test accuracy as its training recorded it under ``profiles_dir`` (PyTorch, in the training
    precision), if that record is still on disk and is of this model (``records_of_model``: the run name's
    ``metrics.json`` may be another machine's training into the same path)."""
    if "checkpoint" not in source:
        return None
    path = metrics_path(profiles_dir, Path(source["checkpoint"]).parent.name)
    if not path.exists():
        return None
    metrics = json.loads(path.read_text())
    ours = records_of_model([metrics], source["checkpoint"], source.get("checkpoint_hash"), machine_name(env))
    return ours[0]["test"]["accuracy"] if ours else None


def load(cfg: LoadConfig, progress: bool = True, log=print) -> LoadRecord:
    """One ``fusionprof load``: check, load, calibrate, run LoadGen, write the record. On ``cfg.threads`` threads, if
    given, and the caller's after."""
    with torch_threads(cfg.threads):
        return _load(cfg, progress, log)


def _load(cfg: LoadConfig, progress: bool, log) -> LoadRecord:
    device = check(cfg)
    env = fingerprint()
    out_dir = Path(cfg.profiles_dir) / env["host"]
    stamp = utc_stamp()
    mode = "accuracy" if cfg.accuracy else cfg.scenario
    path = out_dir / f"load-{mode}-{cfg.preset}-{cfg.fusion}-{cfg.backend}-{cfg.precision}-{stamp}.json"
    exported = export_gate(cfg, device)
    artifacts, source = load_artifacts(cfg, out_dir, log)
    backend = create_backend(cfg.backend, artifacts, device, cfg.precision, sleep_when_idle=not cfg.spin_wait)
    gate = parity_gate(cfg, artifacts.model, backend, exported)
    log(f"{cfg.fusion}/{cfg.backend}/{cfg.precision} against the PyTorch model: {gate_text(gate)}")
    library, tcfg = test_library(cfg.preset, artifacts.model.cfg, source, progress)
    warmed = warm_up(backend.run, library, cfg.max_batch, progress)
    log(f"warmed {warmed['shapes']} shapes (batch 1-{cfg.max_batch} × {len(warmed['caption_lengths'])} caption "
        f"lengths) in {warmed['seconds']:.1f} s")
    batch_s = seconds_per_batch(backend.run, library, cfg.max_batch)
    log(f"{cfg.fusion}/{cfg.backend}/{cfg.precision}: {len(library)} test pairs; a batch of {cfg.max_batch} takes "
        f"{batch_s * 1e3:.2f} ms back to back")
    record = LoadRecord(created=stamp, preset=cfg.preset, fusion=cfg.fusion, backend=cfg.backend,
                        precision=cfg.precision, device=str(device), scenario=cfg.scenario, max_batch=cfg.max_batch,
                        batch_timeout_ms=cfg.batch_timeout_ms,
                        p99_target_ms=cfg.p99_ms if cfg.scenario == "server" else None, model=source,
                        backend_info=backend.describe(), environment=env,
                        config={**to_dict(cfg), "seconds_per_batch": batch_s}, gate=gate, warm_up=warmed)
    with BatchingSUT(backend.run, library.inputs, cfg.max_batch, cfg.batch_timeout_ms) as sut:
        if cfg.accuracy:
            run, record.accuracy = accuracy_check(cfg, sut, library, backend, tcfg, cfg.max_batch / batch_s,
                                                  path.with_suffix(""))
            record.accuracy["trained_test_accuracy"] = trained_accuracy(source, tcfg.profiles_dir, env)
            record.runs = [run]
        else:
            record.runs, best = run_scenario(cfg, sut, library, batch_s, path.with_suffix(""), log)
            record.max_qps = best.settings["target_qps"] if best else None
    write_json(path, record.to_dict())
    record.path = str(path)
    return record
