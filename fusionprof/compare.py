"""``fusionprof compare``: the whole study end to end, resumable.

On the CPU the study leaves out the backends that compile code when loaded or exported (``compiles``:
``torch-compile``, ``aoti``) unless ``--backends`` names them: compiling four models takes as long as the rest of
the tiny study. On a GPU it sweeps every backend, the launch-free ones (``torch-cudagraphs``, ``aoti``) included.

Stages: train every registered fusion → export each to every format a swept backend loads, where that
backend can run (ONNX everywhere, an AOTInductor package and a TensorRT engine on a GPU) → latency sweep (on the
CPU also each native low precision, at batch 1 and 8, then a LoadGen accuracy run of each low-precision winner whose
accuracy in that precision no gate measured) → traces (a separate run) → deployment under load (per fusion,
on the backend the sweep found fastest at the batching size: an MLPerf LoadGen Server search for the largest rate
served with p99 under the target, dynamic batching on, and an Offline run; ``LoadPlan``) → report. Finished stages
are recorded in ``profiles/compare-<preset>-<device>.json`` (written atomically, each with its wall time,
``stage_seconds``, and the settings and weights it was made with) and skipped on the next run that asks for the
same; a killed training resumes from its last epoch, and a run trained otherwise than the study asks is refused.
The closing lines say where the study's time went.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from fusionprof import contention
from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, Backend, backend_for_format, export_formats, format_of
from fusionprof.checkpoint import checkpoint_hash, checkpoint_path, load_model, metrics_path
from fusionprof.config import ModelConfig, TrainConfig, model_config, train_config
from fusionprof.env import NATIVE_LOW_PRECISIONS, cpu_isa, device_label, machine_name
from fusionprof.errors import UserError
from fusionprof.export import export, pt2_name
from fusionprof.latency import SweepConfig, check_sweep, check_unique, default_rounds, sweep, trace_inference
from fusionprof.latency_output import table
from fusionprof.load import LoadConfig, load
from fusionprof.measure import DRIFT_WARNING, Protocol
from fusionprof.metrics import percent
from fusionprof.models import fusion_names
from fusionprof.pt2 import PackagesAhead, build_jobs
from fusionprof.records import told_apart
from fusionprof.report import shortlist_lines, write_report
from fusionprof.runtime import resolve_device
from fusionprof.train import OtherSettings, train


@dataclass(frozen=True)
class LoadPlan:
    """What ``compare`` runs under load per fusion: short by design (the tiny study stays well inside 15 minutes on
    two cores); ``fusionprof load`` runs longer, fuller searches."""

    p99_ms: float = 50.0  # the Server scenario's latency target
    max_batch: int = 8  # dynamic batching in both scenarios
    batch_timeout_ms: float = 5.0
    min_duration_s: float = 5.0  # each LoadGen run
    min_queries: int | None = None  # None: LoadGen's rules (1024 in Server, what early stopping needs)
    max_trials: int = 4  # Server runs of the search at most


UNDER_LOAD = LoadPlan()


def compare(*, preset: str = "tiny", data: str | None = None, device: str = "cpu", models_dir: str = "models",
            profiles_dir: str = "profiles", epochs: int | None = None, limit_train: int | None = None,
            limit_eval: int | None = None, batch_sizes: list[int] | None = None, backends: list[str] | None = None,
            protocol: Protocol | None = None, rounds: int | None = None, load_plan: LoadPlan | None = UNDER_LOAD,
            precisions: list[str] | None = None, progress: bool = True, log=print) -> dict:
    # the device, the sweep and what is swept beside fp32 are settled (a wrong option refused in one line) before
    # anything trains
    dev = resolve_device(device)
    low = low_precisions(device, log) if precisions is None else chosen_low_precisions(precisions, device, log)
    sweep_cfg = SweepConfig(preset=preset, device=device, models_dir=models_dir, profiles_dir=profiles_dir,
                            protocol=protocol or Protocol(), rounds=rounds or default_rounds(preset))
    if batch_sizes:
        sweep_cfg.batch_sizes = batch_sizes
    check_unique("--backends", backends or [])  # the swept backends are the registry's, filtered: seen here only
    for name in backends or []:
        BACKENDS.get(name)  # an unknown name fails here
    sweep_cfg.backends = [b for b in sweep_cfg.backends if wanted(BACKENDS.get(b), device, backends)]
    check_sweep(sweep_cfg)
    state_path = Path(profiles_dir) / f"compare-{preset}-{device.replace(':', '')}.json"

    stage = Stages(state_path, log)
    accuracy = {}
    # what the study trains: every training setting is the preset's but these; a checkpoint made otherwise is not
    # the study's, and a train stage is made again when these change
    study = {"data": data and str(Path(data).resolve()), "epochs": train_config(preset, epochs=epochs).epochs,
             "limit_train": limit_train, "limit_eval": limit_eval}
    every_setting = {f.name for f in fields(TrainConfig)} | {f.name for f in fields(ModelConfig)}
    for fusion in fusion_names():
        def run_training(fusion=fusion):
            cfg = train_config(preset, data=data, device=device, epochs=epochs, limit_train=limit_train,
                               limit_eval=limit_eval, models_dir=models_dir, profiles_dir=profiles_dir,
                               profile=True)
            try:
                metrics = train(cfg, model_config(preset, fusion=fusion), resume=True, progress=progress, log=log,
                                asked=every_setting)
            except OtherSettings as e:
                raise UserError(f"{e.checkpoint.parent} was trained otherwise than this study asks "
                                f"({'; '.join(e.differences)}): give the study another --out, or move that run "
                                "away") from None
            return {"metrics": str(metrics_path(profiles_dir, metrics["run"])), "checkpoint": metrics["checkpoint"],
                    "weights": checkpoint_hash(metrics["checkpoint"]),
                    "test_accuracy": metrics["test"]["accuracy"], "train_seconds": metrics["train_seconds"],
                    "contention": metrics["contention"]}
        accuracy[fusion] = stage(f"train {preset}-{fusion}", run_training, {**study, "preset": preset})

    def trained() -> dict[str, str]:  # what every later stage depends on: the weights it reads
        return {f: checkpoint_hash(accuracy[f]["checkpoint"]) for f in fusion_names()}

    checkpoints = {fusion: checkpoint_path(models_dir, preset, fusion) for fusion in fusion_names()}
    export_stages(stage, preset, checkpoints, device, backends, low, progress, log)
    latency = stage(f"latency {preset} {device}", lambda: run_sweep(sweep_cfg, progress, log),
                    {"sweep": _settings(sweep_cfg), "weights": trained()})
    for cfg in low_precision_sweeps(sweep_cfg, low, dev, sizes_asked=bool(batch_sizes), log=log):  # one record each
        swept = stage(f"latency {preset} {device} {cfg.precision}", lambda cfg=cfg: run_sweep(cfg, progress, log),
                      {"sweep": _settings(cfg), "weights": trained()})

        def gated(fusion: str, backend: str, precision: str = cfg.precision) -> bool:
            return has_gate(stage.done, preset, fusion, accuracy[fusion], backend, precision)
        accuracy_stages(stage, swept["rows"], cfg, gated, progress, log)
    sweep_dir = Path(latency["record"]).parent
    stage(f"traces {preset} {device}", lambda: {"traces": str(trace_inference(sweep_cfg, sweep_dir))},
          {"sweep": _settings(sweep_cfg), "weights": trained()})
    under_load = load_stages(stage, latency["rows"], sweep_cfg, load_plan, progress, log) if load_plan else {}
    report = write_report([Path(profiles_dir), Path(models_dir)], Path(profiles_dir))
    log(f"[compare] report: {report['markdown']} and {report['html']} ({len(report['plots'])} plots)")
    summary = summarize(accuracy, latency["rows"], under_load, load_plan)
    summary += study_answer(report["shortlist"], Path(latency["record"]), preset, device)
    for line in summary:
        log(line)
    log(time_spent(stage.done))
    return {"state": str(state_path), "report": report, "summary": summary}


def study_answer(shortlist: list[dict], sweep: Path, preset: str, device: str) -> list[str]:
    """The report's answer (``report.shortlist``) for this study: its machine (the one its sweep ran on), preset and
    device."""
    machine = machine_name(json.loads(sweep.read_text())["environment"], device_label(device))
    ours = (machine, preset, device_label(device))  # `--device cuda` ran on cuda:0
    return shortlist_lines([e for e in shortlist if (e["machine"], e["preset"], e["device"]) == ours])


class Stages:
    """The study's stages, each run once: a stage is skipped while its outputs stand (none gone, a checkpoint it
    trained not replaced since) and it was made with the settings it is asked for now (what it ran with, and the
    weights it read); otherwise it runs again, and one line says why. The state file is rewritten atomically after
    every stage."""

    def __init__(self, path: Path, log):
        self.path, self.log = path, log
        self.done: dict[str, dict] = json.loads(path.read_text())["done"] if path.exists() else {}

    def __call__(self, name: str, run, settings: dict) -> dict:
        settings = _as_saved(settings)
        if (why := self.stale(name, settings)) is None:
            self.log(f"[compare] {name}: done before, skipped")
            return self.done[name]
        if name in self.done:
            self.log(f"[compare] {name}: {why}, running again")
        self.log(f"[compare] {name} ...")
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        self.done[name] = {**result, "stage_seconds": round(seconds, 1), "settings": settings}
        write_json(self.path, {"done": self.done})
        self.log(f"[compare] {name}: {seconds:.0f} s")
        return result

    def stale(self, name: str, settings: dict) -> str | None:
        """Why stage ``name``, asked for with ``settings`` now, runs ("not run yet" if it never ran); None: it is
        skipped."""
        before = self.done.get(name)
        if before is None:
            return "not run yet"
        return _outputs_changed(before) or _settings_changed(before, _as_saved(settings))


def _as_saved(settings: dict) -> dict:
    """A stage's settings as the state file holds them."""
    return json.loads(json.dumps(settings, default=str))


def _settings_changed(before: dict, settings: dict) -> str | None:
    if "settings" not in before:
        return "made by a fusionprof that did not record its settings"
    changed = sorted(k for k in {*settings, *before["settings"]} if before["settings"].get(k) != settings.get(k))
    return f"made before with other {', '.join(changed)}" if changed else None


def _settings(cfg) -> dict:
    """A stage's config as its settings: the folders resolved (``models`` and ``./models`` are one folder)."""
    return {k: str(Path(v).resolve()) if k in ("models_dir", "profiles_dir") else v for k, v in asdict(cfg).items()}


# The batch sizes a low precision is timed at beside fp32: those the report's precision table compares (one request,
# a batch of 8). At all six of the fp32 sweep's, bf16 and int8 took the study from 12 to 19 minutes on 2 cores.
LOW_PRECISION_BATCHES = (1, 8)


def low_precision_sweeps(fp32: SweepConfig, low: list[str], dev, sizes_asked: bool, log) -> list[SweepConfig]:
    """The sweep of each low precision: fp32's, over the swept backends that run that precision on ``dev``, at the
    batch sizes of ``LOW_PRECISION_BATCHES`` the fp32 sweep has (all of fp32's where ``--batch-sizes`` named them).
    A precision none of the swept backends runs is left out, in one line."""
    sizes = fp32.batch_sizes if sizes_asked else [b for b in fp32.batch_sizes if b in LOW_PRECISION_BATCHES]
    sweeps = []
    for precision in low:
        backends = [b for b in fp32.backends if not BACKENDS.get(b).precision_problem(precision, dev)]
        if backends:
            sweeps.append(replace(fp32, precision=precision, batch_sizes=sizes or fp32.batch_sizes, backends=backends))
        else:
            log(f"[compare] {precision}: not swept, none of the swept backends ({', '.join(fp32.backends)}) runs it")
    return sweeps


def time_spent(done: dict[str, dict]) -> str:
    """One line: the study's wall time by kind of stage (train, export, latency, …), over every stage on record,
    those a previous run finished included; stages recorded before timings were kept are counted as unknown."""
    kinds: dict[str, float] = {}
    untimed = 0
    for name, result in done.items():
        if "stage_seconds" not in result:
            untimed += 1
            continue
        kind = name.split()[0]
        kinds[kind] = kinds.get(kind, 0.0) + result["stage_seconds"]
    parts = ", ".join(f"{kind} {seconds:.0f} s" for kind, seconds in kinds.items())
    total = sum(kinds.values())
    return (f"[compare] time by stage: {parts} (total {total / 60:.1f} min)"
            + (f"; {untimed} stage(s) without a recorded time" if untimed else ""))


def run_sweep(cfg: SweepConfig, progress: bool, log) -> dict:
    # like training, a sweep that a killed study left unfinished continues from its partial rows (an interleaved one
    # from its last finished round)
    record = sweep(cfg, progress=progress, log=log, resume=True)
    for line in table(record.rows):
        log(line)
    return {"record": record.path, "rows": [{"fusion": r.fusion, "backend": r.backend, "batch_size": r.batch_size,
                                             "status": r.status, "p50_ms": r.host.p50_ms if r.host else None,
                                             "drift_warning": bool(r.host and r.host.drift_warning),
                                             "rounds_p50_ms": r.host.rounds_p50_ms if r.host else None,
                                             "contention": r.contention} for r in record.rows]}


def low_precisions(device: str, log) -> list[str]:
    """The low precisions swept beside fp32: on the CPU, those it computes natively (its ISA flags, recorded in
    every record's fingerprint); each one left out is said in one line with the flags that would bring it. A GPU
    study runs in fp32 here; ``fusionprof latency --precision`` sweeps bf16 / fp16 there."""
    if device != "cpu":
        return []
    isa, chosen = cpu_isa(), []
    for precision, flags in NATIVE_LOW_PRECISIONS.items():
        have = [f for f in flags if isa.get(f)]
        if have:
            chosen.append(precision)
            log(f"[compare] {precision}: swept beside fp32 (this CPU has {', '.join(have)})")
        else:
            log(f"[compare] {precision}: not swept, this CPU has none of {', '.join(flags)} "
                f"({WITHOUT[precision]}; --precisions fp32,{precision} sweeps it)")
    return chosen


# Why a precision is left out on a CPU without its flags. bf16 is converted to fp32 and back. int8 still runs on
# AVX2's 8-bit multiply-adds (VNNI fuses them into one instruction) and ran faster than fp32 on the AVX2 EPYC
# (README, "Low precision on the CPU"), but its exports and sweep would take the tiny study past 15 minutes there.
WITHOUT = {"bf16": "it would be emulated",
           "int8": "AVX2 runs it without VNNI, often still faster than fp32; left out to keep the study short"}
CPU_PRECISIONS = ("fp32", *NATIVE_LOW_PRECISIONS)


def chosen_low_precisions(precisions: list[str], device: str, log) -> list[str]:
    """``--precisions``: fp32 (the study's reference: exports and the load stage use it) and the low precisions
    asked for, swept on the CPU whatever its flags; one line each says which of the precision's flags it has."""
    check_unique("--precisions", precisions)
    unknown = [p for p in precisions if p not in CPU_PRECISIONS]
    if unknown or "fp32" not in precisions:
        raise UserError(f"--precisions {','.join(precisions)}: fp32 and any of {', '.join(CPU_PRECISIONS[1:])} "
                        f"(fp32 is the study's reference)")
    low = [p for p in NATIVE_LOW_PRECISIONS if p in precisions]
    if low and device != "cpu":
        raise UserError(f"--precisions {','.join(low)}: compare sweeps low precisions on the CPU; on {device} run "
                        f"`fusionprof latency --device {device} --precision bf16`")
    isa = cpu_isa()
    for precision in low:
        have = [f for f in NATIVE_LOW_PRECISIONS[precision] if isa.get(f)]
        log(f"[compare] {precision}: swept beside fp32 as asked (" + (f"this CPU has {', '.join(have)})" if have else
            f"this CPU has none of {', '.join(NATIVE_LOW_PRECISIONS[precision])})"))
    return low


def export_stages(stage: Stages, preset: str, checkpoints: dict[str, Path], device: str, backends: list[str] | None,
                  low: list[str], progress: bool, log) -> None:
    """Every fusion's checkpoint exported to each format a swept backend loads, verified; and to int8 where it is
    swept. Format by format: the ``.pt2`` packages to make are built side by side (``PackagesAhead``) from the start,
    while the ONNX exports run, then taken by their export stages in turn; the exports that time kernels as they
    build (a TensorRT engine's tactics, int8's choice between its two graphs) come after every build has finished."""
    check_devices = {fmt: export_check_device(fmt, device, log) for fmt in export_formats()
                     if wanted(backend_for_format(fmt), device, backends)}
    jobs = sorted(((fmt, "fp32") for fmt, where in check_devices.items() if where),
                  key=lambda job: {"onnx": 0, "pt2": 1}.get(job[0], 2))
    jobs += [("onnx", "int8")] if "int8" in low and check_devices.get("onnx") else []
    weights = {fusion: checkpoint_hash(checkpoint) for fusion, checkpoint in checkpoints.items()}

    def name(fusion: str, fmt: str, precision: str) -> str:
        return f"export {preset}-{fusion} {fmt}" + ("" if precision == "fp32" else f" {precision}")

    def settings(fusion: str, fmt: str) -> dict:
        return {"device": check_devices[fmt], "weights": weights[fusion]}

    with packages_ahead([f for f in checkpoints if ("pt2", "fp32") in jobs
                         and stage.stale(name(f, "pt2", "fp32"), settings(f, "pt2"))],
                        checkpoints, check_devices.get("pt2"), log) as packages:
        for fmt, precision in jobs:
            for fusion, checkpoint in checkpoints.items():
                def run_export(checkpoint=checkpoint, fmt=fmt, precision=precision):
                    record = export(checkpoint, fmt, precision, device=check_devices[fmt], progress=progress,
                                    log=log, packages=packages)
                    if record["status"] != "ok" and precision == "fp32":  # a wrong artifact is never timed as right
                        raise UserError(f"the {fmt} {precision} export of {checkpoint} failed verification: see "
                                        f"{record['record_path']}")
                    if record["status"] != "ok":  # a quantized model may lose too much: a result, not a broken study
                        log(f"[compare] the {precision} export of {checkpoint} failed its gate "
                            f"({record['record_path']}); the {precision} sweep checks its own build's parity, and the "
                            "report shows the failure")
                    return {"record": record["record_path"], "status": record["status"],
                            "accuracy": record["accuracy"]["exported_accuracy"]}
                stage(name(fusion, fmt, precision), run_export, settings(fusion, fmt))


def packages_ahead(fusions: list[str], checkpoints: dict[str, Path], device: str | None, log) -> PackagesAhead:
    """The fp32 ``.pt2`` packages of ``fusions``' checkpoints (none: ``fusions`` empty), building side by side, one per
    usable core, into the paths their export stages take them from (``export``: beside the checkpoint)."""
    builds = {}
    for fusion in fusions:
        model, on = load_model(checkpoints[fusion])[0], resolve_device(device)
        builds[checkpoints[fusion].parent / pt2_name("fp32", on.type)] = (model, "fp32", on)
    jobs = min(build_jobs(None), len(builds))
    if builds:
        log(f"[compare] building the {', '.join(fusions)} .pt2 package(s) side by side, {jobs} at a time, while the "
            "other exports run")
    return PackagesAhead(builds, jobs)


def wanted(backend: type[Backend], device: str, backends: list[str] | None) -> bool:
    """Whether the study sweeps ``backend`` (and makes the export it loads): the ones named by ``--backends``, else
    all of them, less those that compile code on the CPU (inductor needs a minute or two per model on a 2-core CPU:
    as long as the rest of the tiny study together)."""
    if backends:
        return backend.registered_name in backends
    return device.startswith("cuda") or not backend.compiles


def export_check_device(fmt: str, device: str, log=print) -> str | None:
    """Where the ``fmt`` exports are verified: on ``device`` when the backend that loads them runs there, else on
    the CPU when it runs there (an ONNX on a CUDA machine with the CPU build of onnxruntime: the parity and
    accuracy gates hold either way, and the latency sweep reports that backend as a skip), else None: no export
    (TensorRT without a GPU)."""
    backend = backend_for_format(fmt)
    ok, reason = backend.available(resolve_device(device))
    if ok or device == "cpu":
        return device if ok else None
    if not backend.available(resolve_device("cpu"))[0]:
        return None
    log(f"[compare] {fmt} exports are verified with {backend.registered_name} on the CPU: {reason}")
    return "cpu"


def best_row(rows: list[dict], fusion: str, batch: int) -> dict | None:
    """The right (parity-passed) row with the lowest p50 for ``fusion`` at ``batch``, or None."""
    at = [r for r in rows if r["fusion"] == fusion and r["batch_size"] == batch and r["status"] == "ok"]
    return min(at, key=lambda r: r["p50_ms"], default=None)


def fastest_backend(rows: list[dict], fusion: str, batch: int) -> str | None:
    """The backend with the lowest right p50 for ``fusion`` at the largest swept batch up to ``batch``."""
    sizes = [r["batch_size"] for r in rows if r["fusion"] == fusion and r["status"] == "ok"]
    best = best_row(rows, fusion, max([b for b in sizes if b <= batch] or sizes, default=0))
    return best["backend"] if best else None


def load_stages(stage, rows: list[dict], sweep_cfg: SweepConfig, plan: LoadPlan, progress: bool, log) -> dict:
    """One stage per fusion under load, on the backend the sweep found fastest at the plan's batching size."""
    done = {}
    for fusion in fusion_names():
        backend = fastest_backend(rows, fusion, plan.max_batch)
        if backend is None:
            log(f"[compare] load {sweep_cfg.preset}-{fusion}: skipped, no backend timed right in the sweep")
            continue
        base = LoadConfig(fusion=fusion, backend=backend, scenario="server", find_max_qps=True,
                          preset=sweep_cfg.preset, precision=sweep_cfg.precision, device=sweep_cfg.device,
                          models_dir=sweep_cfg.models_dir, profiles_dir=sweep_cfg.profiles_dir, **asdict(plan))
        done[fusion] = stage(f"load {sweep_cfg.preset}-{fusion} {backend}",
                             lambda base=base: run_under_load(base, progress, log),
                             {"load": _settings(base), "weights": checkpoint_hash(checkpoint_path(
                                 sweep_cfg.models_dir, sweep_cfg.preset, fusion))})
    return done


def accuracy_stages(stage, rows: list[dict], cfg: SweepConfig, gated: Callable[[str, str], bool], progress: bool,
                    log) -> None:
    """A low-precision sweep's winners scored as they ran. Per fusion, each backend with the best p50 at one of the
    sweep's batch sizes whose accuracy in that precision no gate measured (``gated``: an export's gate of the model it
    loads, or for a PyTorch backend a training run in that precision) gets one LoadGen accuracy run (Offline, every
    test pair): openvino's bf16 is an inference hint over the fp32 graph, and autocast over fp32-trained weights is
    not the training run. The report's precision table and ``recommend`` then quote the engine that won."""
    for fusion in fusion_names():
        winners = [best["backend"] for b in sorted({r["batch_size"] for r in rows})
                   if (best := best_row(rows, fusion, b))]
        for backend in dict.fromkeys(winners):
            if gated(fusion, backend):
                continue
            run = LoadConfig(fusion=fusion, backend=backend, scenario="offline", accuracy=True, preset=cfg.preset,
                             precision=cfg.precision, device=cfg.device, threads=cfg.threads,
                             models_dir=cfg.models_dir, profiles_dir=cfg.profiles_dir)
            stage(f"accuracy {cfg.preset}-{fusion} {backend} {cfg.precision}",
                  lambda run=run: run_accuracy(run, progress, log),
                  {"load": _settings(run), "weights": checkpoint_hash(checkpoint_path(cfg.models_dir, cfg.preset,
                                                                                      fusion))})


def has_gate(done: dict[str, dict], preset: str, fusion: str, trained: dict, backend: str, precision: str) -> bool:
    """Whether the study measured ``backend``'s accuracy for ``fusion`` in ``precision`` already: for a PyTorch
    backend its training ran in that precision (``trained``: the fusion's train stage); for one that loads an export,
    that export passed its gate in that precision (``done``: the stages finished, the int8 ONNX's among them)."""
    fmt = format_of(backend)
    if fmt is None:
        return json.loads(Path(trained["metrics"]).read_text())["train_config"]["precision"] == precision
    return done.get(f"export {preset}-{fusion} {fmt} {precision}", {}).get("status") == "ok"


def run_accuracy(run: LoadConfig, progress: bool, log) -> dict:
    record = load(run, progress=progress, log=log)
    return {"accuracy_record": record.path, "backend": run.backend, "precision": run.precision,
            "loadgen_accuracy": record.accuracy["loadgen_accuracy"], "matches": record.accuracy["matches"]}


def run_under_load(base: LoadConfig, progress: bool, log) -> dict:
    """The Server search and the Offline run of one fusion: their records and headline figures."""
    server = load(base, progress=progress, log=log)
    offline = load(replace(base, scenario="offline", find_max_qps=False), progress=progress, log=log)
    run = offline.runs[0]
    return {"server_record": server.path, "max_qps": server.max_qps, "invalid_qps": server.invalid_qps,
            "offline_record": offline.path,
            "offline_samples_per_s": run.samples_per_s if run.valid else None, "backend": base.backend,
            "contention": contention.combine([server.contention, offline.contention])}


def rate_found(got: dict) -> str:
    """A fusion's Server search as one cell: the largest VALID rate and, in brackets, the smallest INVALID one above
    it (``522.6 (627.1 INVALID)``; a stage run before the bracket was kept shows the rate alone)."""
    if not got.get("max_qps"):
        return "none VALID"
    return f"{got['max_qps']:.1f}" + (f" ({got['invalid_qps']:.1f} INVALID)" if got.get("invalid_qps") else "")


OUTPUT_KEYS = ("metrics", "checkpoint", "record", "traces", "server_record", "offline_record", "accuracy_record")


def _outputs_changed(result: dict) -> str | None:
    """Why what a stage wrote no longer stands (a fresh clone has no checkpoints; a run may be retrained by hand),
    or None."""
    for key in OUTPUT_KEYS:
        if key in result and not Path(result[key]).exists():
            return f"{result[key]} is gone"
    if "weights" in result and checkpoint_hash(result["checkpoint"]) != result["weights"]:
        return f"{result['checkpoint']} has been replaced since"
    return None


LOAD_WIDTHS = (28, 20)  # the closing table's load columns: "1072.6 (1225.8 INVALID) +", "offline samples/s"


def summarize(accuracy: dict[str, dict], rows: list[dict], under_load: dict[str, dict] | None = None,
              plan: LoadPlan | None = None) -> list[str]:
    """The terminal's closing table: per fusion, accuracy, training time, the best p50 at both batch ends and, when
    the study ran under load, the largest Server rate with p99 under the target and the Offline rate."""
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = sorted({r["batch_size"] for r in ok})
    ends = sorted({sizes[0], sizes[-1]}) if sizes else []
    under_load = under_load or {}
    load_heads = [f"max QPS, p99 ≤ {plan.p99_ms:g} ms", "offline samples/s"] if under_load and plan else []
    lines = [f"{'fusion':<11}{'test acc':>9}{'train s':>9}" + "".join(f"{f'best p50, batch {b}':>30}" for b in ends)
             + "".join(f"{h:>{w}}" for h, w in zip(load_heads, LOAD_WIDTHS, strict=False))]

    marked = []

    def busy(result: dict | None) -> str:  # a figure measured beside a busy neighbour (older stages: not watched)
        if contention.busy((result or {}).get("contention")):
            marked.append(result)
            return " +"
        return ""

    drifted = []

    def moved(row: dict) -> str:  # a p50 whose level moved while it was timed (records before the check: unknown)
        if row.get("drift_warning"):
            drifted.append(row)
            return " ~"
        return ""

    # per batch end the fastest fusion's cell: a cell whose visits overlap its visits was not told apart from it
    fastest = [min(filter(None, (best_row(ok, f, b) for f in accuracy)), key=lambda r: r["p50_ms"], default=None)
               for b in ends]
    tied = []

    def near(row: dict, first: dict) -> str:
        if row is not first and told_apart(first.get("rounds_p50_ms"), row.get("rounds_p50_ms")) is False:
            tied.append(row)
            return " ≈"
        return ""

    for fusion, acc in accuracy.items():
        best = [best_row(ok, fusion, b) for b in ends]
        cells = [f"{r['p50_ms']:.2f} ms ({r['backend']}){near(r, first)}{moved(r)}{busy(r)}" if r else "–"
                 for r, first in zip(best, fastest, strict=True)]
        got = under_load.get(fusion, {})
        loaded = [(rate_found(got) if got else "–") + busy(got),
                  (f"{got['offline_samples_per_s']:.1f}" if got.get("offline_samples_per_s") else "–") + busy(got)] \
            if load_heads else []
        train_s = f"{acc['train_seconds']:.0f}{busy(acc)}"
        lines.append(f"{fusion:<11}{percent(acc['test_accuracy'], 1):>9}{train_s:>9}"
                     + "".join(f"{c:>30}" for c in cells)
                     + "".join(f"{c:>{w}}" for c, w in zip(loaded, LOAD_WIDTHS, strict=False)))  # none without load
    if tied:
        lines.append("≈ not told apart from the fastest fusion at that batch: the p50s of the two cells' visits "
                     "(--rounds) overlap; the other cells were slower than the fastest in every visit")
    if any(got.get("max_qps") and got.get("invalid_qps") for got in under_load.values()):
        lines.append("max QPS: the largest Server rate LoadGen called VALID in a bisection of one LoadGen run per "
                     "rate, and in brackets the smallest rate above it that was INVALID; the rate a fusion "
                     "sustains lies between, so two fusions whose brackets overlap were not told apart")
    if drifted:
        lines.append(f"~ that p50 moved by more than {DRIFT_WARNING:.0%} between the first and the second half of "
                     "its calls: the machine's pace changed while it was timed (the latency table above says how "
                     "much)")
    if marked:
        lines.append("+ measured beside a busy neighbour (other processes took the CPUs meanwhile): slower than on a "
                     "quiet machine; the records say how busy (contention)")
    return lines
