"""``fusionprof latency``: fusions × backends × batch sizes, one protocol, every sample kept.

Uses the trained checkpoint (``models/<preset>-<fusion>/``) and its verified ONNX export when they exist,
an untrained model of the preset otherwise (latency does not depend on the weights; the record says which).
Copy-inclusive latency (host inputs → host logits, the same copies for every backend) is the headline;
on CUDA the device-resident latency (CUDA events, inputs already on the GPU) is measured beside it.
Profiler traces come from a separate, short run (``trace_inference``), never from the timed one.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import atomic_write, write_json
from fusionprof.backends import Artifacts, backend_names, create_backend
from fusionprof.backends.base import BACKENDS
from fusionprof.checkpoint import checkpoint_path, load_model
from fusionprof.config import model_config, to_dict
from fusionprof.env import fingerprint
from fusionprof.errors import UserError
from fusionprof.export import export_onnx, onnx_name, parity, record_name
from fusionprof.measure import CV_WARNING, Protocol, matmul_rate, sample_calls, sample_cuda_events, summarize
from fusionprof.models import build_model, forward_flops, fusion_names
from fusionprof.models.model import example_inputs
from fusionprof.profiling import run_profiled, trace_dir
from fusionprof.runtime import check_precision, peak_memory_mib, reset_peak_memory, resolve_device


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


def load_artifacts(cfg: SweepConfig, fusion: str, work_dir: Path, log=print) -> tuple[Artifacts, dict]:
    """The model (trained if a checkpoint exists) and an ONNX export whose parity has been checked."""
    checkpoint = checkpoint_path(cfg.models_dir, cfg.preset, fusion)
    if checkpoint.exists():
        model, _ = load_model(checkpoint)
        source = {"weights": "trained", "checkpoint": str(checkpoint)}
    else:
        torch.manual_seed(0)
        mcfg = model_config(cfg.preset, fusion=fusion, pretrained=False)
        mcfg.vocab_size = max(mcfg.vocab_size, 1000)
        model = build_model(mcfg).eval()
        source = {"weights": "untrained (random init; latency does not depend on the weights)"}
    artifacts = Artifacts(model)
    onnx_precision = "fp16" if cfg.precision == "fp16" else "fp32"
    if {"onnxruntime", "tensorrt"} & set(cfg.backends) and cfg.precision != "bf16":
        onnx = checkpoint.parent / onnx_name(onnx_precision)
        if not (checkpoint.exists() and onnx.exists() and _export_ok(checkpoint.parent, onnx_precision)):
            onnx = work_dir / "onnx" / f"{cfg.preset}-{fusion}" / onnx_name(onnx_precision)
        if not onnx.exists():
            log(f"exporting {cfg.preset}/{fusion} to {onnx}")
            export_onnx(model, onnx, onnx_precision)
        artifacts.onnx = onnx
    return artifacts, source


def _export_ok(folder: Path, precision: str) -> bool:
    """A checkpoint's own export is reused only if its verification passed."""
    record = folder / record_name("onnx", precision)
    return record.exists() and json.loads(record.read_text()).get("status") == "ok"


def _row_base(fusion: str, backend: str, batch_size: int | None = None) -> dict:
    return {"fusion": fusion, "backend": backend, "batch_size": batch_size}


def measure_backend(backend, model, batch_size: int, seq_len: int, flops_per_sample: float,
                    protocol: Protocol) -> dict:
    """One (backend, batch size) cell: first call, copy-inclusive samples, device-resident samples on CUDA."""
    images, ids, mask = example_inputs(model.cfg, batch_size, seq_len)
    reset_peak_memory(backend.device)
    start = time.perf_counter()
    backend.run(images, ids, mask)
    first_call_ms = (time.perf_counter() - start) * 1e3
    samples = sample_calls(lambda: backend.run(images, ids, mask), backend.synchronize, protocol)
    stats = summarize(samples)
    row = {"status": "ok", "first_call_ms": first_call_ms, **stats, "samples_ms": samples,
           "throughput_samples_per_s": batch_size / (stats["mean_ms"] / 1e3),
           "achieved_gflops": flops_per_sample * batch_size / (stats["mean_ms"] / 1e3) / 1e9,
           "cv_warning": stats["cv"] > CV_WARNING, "timing": "host→device copy + run + device→host copy"}
    if backend.device.type == "cuda":
        on_device = [t.to(backend.device) for t in (images, ids, mask)]
        device_samples = sample_cuda_events(lambda: backend.run_on_device(*on_device), backend.device, protocol)
        row["device_resident"] = {**summarize(device_samples), "samples_ms": device_samples,
                                  "timing": "CUDA events, inputs and outputs on the device"}
    row["peak_memory"] = peak_memory_mib(backend.device)
    return row


def sweep(cfg: SweepConfig, progress: bool = True, log=print) -> dict:
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.batch_sizes or min(cfg.batch_sizes) < 1:
        raise UserError("--batch-sizes must be whole numbers of at least 1")
    for name in cfg.backends:
        BACKENDS.get(name)  # unknown names fail here, before any work
    env = fingerprint()
    out_dir = Path(cfg.profiles_dir) / env["host"]
    reference = matmul_rate(device, cfg.precision)
    log(f"reference: a {reference['n']}² {reference['dtype']} matmul on {device} runs at "
        f"{reference['gflops']:.0f} GFLOP/s")
    rows = []
    cells = len(cfg.fusions) * len(cfg.backends) * len(cfg.batch_sizes)
    bar = tqdm(total=cells, desc="latency", disable=not progress)
    for fusion in cfg.fusions:
        artifacts, source = load_artifacts(cfg, fusion, out_dir, log)
        model = artifacts.model
        seq_len = cfg.seq_len or model.cfg.max_text_len
        flops = forward_flops(model, seq_len)
        for name in cfg.backends:
            ok, reason = BACKENDS.get(name).available(device)
            if ok and name in ("onnxruntime", "tensorrt") and cfg.precision == "bf16":
                ok, reason = False, f"{name} runs fp32 or fp16 graphs here, not bf16"
            if not ok:
                rows.append({**_row_base(fusion, name), "status": f"unavailable: {reason}"})
                bar.update(len(cfg.batch_sizes))
                continue
            start = time.perf_counter()
            backend = create_backend(name, artifacts, device, cfg.precision)
            load_seconds = time.perf_counter() - start
            check = parity(model, backend, "fp16" if cfg.precision != "fp32" else "fp32")
            for batch_size in cfg.batch_sizes:
                bar.set_postfix_str(f"{fusion}/{name}/bs{batch_size}")
                row = measure_backend(backend, model, batch_size, seq_len, flops["total"], cfg.protocol)
                row["share_of_matmul_rate"] = row["achieved_gflops"] / reference["gflops"]
                rows.append({**_row_base(fusion, name, batch_size), **row, "load_seconds": load_seconds,
                             "seq_len": seq_len, "flops_per_sample": flops["total"], "model": source,
                             "parity_passed": check["passed"], "backend_info": backend.describe()})
                bar.update(1)
            del backend
    bar.close()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    record = {"schema_version": SCHEMA_VERSION, "kind": "latency", "created": stamp, "environment": env,
              "config": {**to_dict(cfg), "protocol": cfg.protocol.to_dict()}, "reference_matmul": reference,
              "rows": rows}
    path = out_dir / f"latency-{cfg.preset}-{device.type}-{cfg.precision}-{stamp}.json"
    write_json(path, record)
    write_csv(path.with_suffix(".csv"), rows)
    record["path"] = str(path)
    return record


def trace_inference(cfg: SweepConfig, work_dir: Path) -> Path:
    """One trace per (fusion, batch size) of the eager torch backend, in a run separate from the timed sweep.

    ``work_dir`` is the sweep's result folder, where its ONNX exports live."""
    device = resolve_device(cfg.device)
    for fusion in cfg.fusions:
        artifacts, _ = load_artifacts(cfg, fusion, work_dir, log=lambda s: None)
        backend = create_backend("torch", artifacts, device, cfg.precision)
        seq_len = cfg.seq_len or artifacts.model.cfg.max_text_len
        for batch_size in cfg.batch_sizes:
            inputs = example_inputs(artifacts.model.cfg, batch_size, seq_len)
            run = f"latency-{cfg.preset}-{fusion}-bs{batch_size}-{device.type}-{cfg.precision}"
            run_profiled(lambda i, x=inputs, b=backend: b.run(*x), trace_dir(cfg.profiles_dir, run), device)
    return trace_dir(cfg.profiles_dir, "")


CSV_COLUMNS = ["fusion", "backend", "batch_size", "status", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "cv",
               "n", "throughput_samples_per_s", "achieved_gflops", "share_of_matmul_rate", "first_call_ms",
               "load_seconds", "cv_warning"]


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def table(rows: list[dict]) -> list[str]:
    """The end-of-run table, one line per cell; unavailable backends get one line with their reason."""
    lines = [f"{'fusion':<11}{'backend':<15}{'bs':>4}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'CV':>7}"
             f"{'samples/s':>11}{'GFLOP/s':>9}"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['fusion']:<11}{r['backend']:<15}{'':>4}  {r['status']}")
            continue
        warn = (" !" if r["cv_warning"] else "") + ("" if r.get("parity_passed", True) else " WRONG: failed parity")
        lines.append(f"{r['fusion']:<11}{r['backend']:<15}{r['batch_size']:>4}{r['p50_ms']:>10.2f}{r['p90_ms']:>10.2f}"
                     f"{r['p99_ms']:>10.2f}{r['cv']:>7.1%}{r['throughput_samples_per_s']:>11.1f}"
                     f"{r['achieved_gflops']:>9.1f}{warn}")
    if any(r.get("cv_warning") for r in rows):
        lines.append(f"! CV above {CV_WARNING:.0%}: noisy measurement (another process, frequency scaling, thermal)")
    if not all(r.get("parity_passed", True) for r in rows):
        lines.append("WRONG: that backend's logits differ from the eager model's beyond tolerance; "
                     "do not ship its number")
    return lines
