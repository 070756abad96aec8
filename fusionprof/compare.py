"""``fusionprof compare``: the whole study end to end, resumable.

On the CPU the study leaves out the backends that compile code when loaded or exported (``compiles``:
``torch-compile``, ``aoti``) unless ``--backends`` names them: compiling four models takes as long as the rest of
the tiny study. On a GPU it sweeps every backend, the launch-free ones (``torch-cudagraphs``, ``aoti``) included.

Stages: train every registered fusion → export each to every format a swept backend loads, where that
backend can run (ONNX everywhere, an AOTInductor package and a TensorRT engine on a GPU) → latency sweep →
traces (a separate run) → report. Finished stages are recorded in ``profiles/compare-<preset>-<device>.json``
(written atomically) and skipped on the next run; a killed training resumes from its last epoch.
"""

from __future__ import annotations

import json
from pathlib import Path

from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, Backend, backend_for_format, export_formats
from fusionprof.checkpoint import checkpoint_path, metrics_path
from fusionprof.config import model_config, train_config
from fusionprof.errors import UserError
from fusionprof.export import export
from fusionprof.latency import SweepConfig, sweep, trace_inference
from fusionprof.latency_output import table
from fusionprof.measure import Protocol
from fusionprof.models import fusion_names
from fusionprof.report import write_report
from fusionprof.runtime import resolve_device
from fusionprof.train import train


def compare(*, preset: str = "tiny", data: str | None = None, device: str = "cpu", models_dir: str = "models",
            profiles_dir: str = "profiles", epochs: int | None = None, limit_train: int | None = None,
            limit_eval: int | None = None, batch_sizes: list[int] | None = None, backends: list[str] | None = None,
            protocol: Protocol | None = None, progress: bool = True, log=print) -> dict:
    state_path = Path(profiles_dir) / f"compare-{preset}-{device.replace(':', '')}.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {"done": {}}

    def stage(name: str, run):
        if name in state["done"] and _outputs_exist(state["done"][name]):
            log(f"[compare] {name}: done before, skipped")
            return state["done"][name]
        log(f"[compare] {name} ...")
        result = run()
        state["done"][name] = result
        write_json(state_path, state)
        return result

    accuracy = {}
    for fusion in fusion_names():
        def run_training(fusion=fusion):
            cfg = train_config(preset, data=data, device=device, epochs=epochs, limit_train=limit_train,
                               limit_eval=limit_eval, models_dir=models_dir, profiles_dir=profiles_dir,
                               profile=True)
            metrics = train(cfg, model_config(preset, fusion=fusion), resume=True, progress=progress, log=log)
            return {"metrics": str(metrics_path(profiles_dir, metrics["run"])), "checkpoint": metrics["checkpoint"],
                    "test_accuracy": metrics["test"]["accuracy"], "train_seconds": metrics["train_seconds"]}
        accuracy[fusion] = stage(f"train {preset}-{fusion}", run_training)

    check_devices = {fmt: export_check_device(fmt, device, log) for fmt in export_formats()
                     if wanted(backend_for_format(fmt), device, backends)}
    for fusion in fusion_names():
        for fmt in [f for f, where in check_devices.items() if where]:
            checkpoint = checkpoint_path(models_dir, preset, fusion)

            def run_export(checkpoint=checkpoint, fmt=fmt):
                record = export(checkpoint, fmt, "fp32", device=check_devices[fmt], progress=progress, log=log)
                if record["status"] != "ok":  # a wrong artifact is never timed as if it were right
                    raise UserError(f"the {fmt} export of {checkpoint} failed verification: see "
                                    f"{record['record_path']}")
                return {"record": record["record_path"], "status": record["status"]}
            stage(f"export {preset}-{fusion} {fmt}", run_export)

    sweep_cfg = SweepConfig(preset=preset, device=device, models_dir=models_dir, profiles_dir=profiles_dir,
                            protocol=protocol or Protocol())
    if batch_sizes:
        sweep_cfg.batch_sizes = batch_sizes
    sweep_cfg.backends = [b for b in sweep_cfg.backends if wanted(BACKENDS.get(b), device, backends)]

    def run_sweep():
        record = sweep(sweep_cfg, progress=progress, log=log)
        for line in table(record.rows):
            log(line)
        return {"record": record.path, "rows": [{"fusion": r.fusion, "backend": r.backend, "batch_size": r.batch_size,
                                                 "status": r.status, "p50_ms": r.host.p50_ms if r.host else None}
                                                for r in record.rows]}
    latency = stage(f"latency {preset} {device}", run_sweep)
    sweep_dir = Path(latency["record"]).parent
    stage(f"traces {preset} {device}", lambda: {"traces": str(trace_inference(sweep_cfg, sweep_dir))})
    report = write_report([Path(profiles_dir), Path(models_dir)], Path(profiles_dir))
    log(f"[compare] report: {report['markdown']} and {report['html']} ({len(report['plots'])} plots)")
    summary = summarize(accuracy, latency["rows"])
    for line in summary:
        log(line)
    return {"state": str(state_path), "report": report, "summary": summary}


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


OUTPUT_KEYS = ("metrics", "checkpoint", "record", "traces")


def _outputs_exist(result: dict) -> bool:
    """A stage counts as done only while what it wrote is still there (a fresh clone has no checkpoints)."""
    return all(Path(result[k]).exists() for k in OUTPUT_KEYS if k in result)


def summarize(accuracy: dict[str, dict], rows: list[dict]) -> list[str]:
    """The terminal's closing table: per fusion, accuracy, training time and the best p50 at both batch ends."""
    ok = [r for r in rows if r["status"] == "ok"]
    sizes = sorted({r["batch_size"] for r in ok})
    ends = sorted({sizes[0], sizes[-1]}) if sizes else []
    lines = [f"{'fusion':<11}{'test acc':>9}{'train s':>9}" + "".join(f"{f'best p50, batch {b}':>30}" for b in ends)]
    for fusion, acc in accuracy.items():
        cells = []
        for b in ends:
            candidates = [r for r in ok if r["fusion"] == fusion and r["batch_size"] == b]
            best = min(candidates, key=lambda r: r["p50_ms"], default=None)
            cells.append(f"{best['p50_ms']:.2f} ms ({best['backend']})" if best else "–")
        lines.append(f"{fusion:<11}{acc['test_accuracy']:>9.1%}{acc['train_seconds']:>9.0f}"
                     + "".join(f"{c:>30}" for c in cells))
    return lines
