"""Does fusionprof's latency agree with each runtime timed bare, and what does its harness add per call?

    python benchmarks/latency_harness.py [--backends torch,onnxruntime] [--fusion mid] [--batch-size 8] [--threads 2]

Per backend, on one artifact, shape and thread count: A is the sweep's own timing of a cell (``visit_cell``, host
p50); B the bare runtime (the module under ``torch.inference_mode()``, an ``onnxruntime.InferenceSession`` fed numpy,
the loaded ``.pt2``, a TensorRT context, a hand-captured CUDA graph) in a plain ``perf_counter_ns`` loop. A, B, B, A
(× ``--repeats``), each a fresh ``--seconds`` measurement, so drift and neighbours hit both. Reported: every p50, the
ratio A/B (median of adjacent pairs, min–max), whether it lies within the noise (the larger relative range of either
side's p50s), and the no-op overhead per call. Untrained weights (latency does not depend on them); backends that
compile run only when named.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, Artifacts, backend_names, create_backend
from fusionprof.env import fingerprint, machine_name
from fusionprof.latency import Cell, Prepared, SweepConfig, load_artifacts, row_of, visit_cell
from fusionprof.measure import Protocol, replace_protocol, sample_calls, summarize
from fusionprof.models.model import example_inputs
from fusionprof.runtime import resolve_device

WARMUP_SECONDS = 0.5  # both sides warm up this long before each measurement (the protocol's default)


@dataclass
class Comparison:
    backend: str
    status: str = "ok"  # else why it was not measured
    bare: str = ""  # what the bare side calls
    order: str = ""  # "ABBA" × repeats: A = fusionprof, B = bare
    fusionprof_p50_ms: list[float] = field(default_factory=list)
    bare_p50_ms: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)  # A / B of each adjacent pair
    ratio_median: float | None = None
    noise: float | None = None  # the larger (max − min) / median of either side's p50s
    agree: bool | None = None  # |ratio_median − 1| ≤ noise

    def settle(self) -> None:
        self.ratios = [a / b for a, b in zip(self.fusionprof_p50_ms, self.bare_p50_ms, strict=True)]
        self.ratio_median = statistics.median(self.ratios)
        self.noise = max((max(x) - min(x)) / statistics.median(x) for x in (self.fusionprof_p50_ms, self.bare_p50_ms))
        self.agree = abs(self.ratio_median - 1) <= self.noise

    def summary(self) -> str:
        if self.status != "ok":
            return self.status
        a, b = iter(self.fusionprof_p50_ms), iter(self.bare_p50_ms)
        sequence = " ".join(f"{side}{next(a if side == 'A' else b):.2f}" for side in self.order)
        return (f"p50 ms {sequence}; fusionprof/bare {self.ratio_median:.3f} ({min(self.ratios):.3f}–"
                f"{max(self.ratios):.3f}), noise ±{self.noise:.1%}: {'agree' if self.agree else 'DIFFER'}")


def bare_module(backend, artifacts, inputs, device, threads):
    model = backend.model  # the module the backend holds (torch.compile's wrapper for torch-compile), called as is
    return lambda: model(*(t.to(device) for t in inputs)).cpu(), "the module called under torch.inference_mode()"


def bare_onnxruntime(backend, artifacts, inputs, device, threads):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    provider = "CUDAExecutionProvider" if device.type == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(artifacts.onnx), options, providers=[provider])
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}
    feeds = {i.name: t.numpy().astype(dtypes[i.type]) for i, t in zip(session.get_inputs(), inputs, strict=True)}
    return lambda: session.run(None, feeds), f"onnxruntime.InferenceSession({provider}, {threads} intra-op threads)"


def bare_aoti(backend, artifacts, inputs, device, threads):
    runner = torch._inductor.aoti_load_package(str(artifacts.pt2),
                                               device_index=(device.index or 0) if device.type == "cuda" else -1)
    return lambda: runner(*(t.to(device) for t in inputs)).cpu(), "torch._inductor.aoti_load_package(...)(...)"


def bare_cudagraphs(backend, artifacts, inputs, device, threads):
    model, static = backend.model, [t.to(device) for t in inputs]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):  # kernels chosen before capture
            model(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = model(*static)

    def call():
        for buffer, given in zip(static, inputs, strict=True):
            buffer.copy_(given, non_blocking=True)
        graph.replay()
        return output.cpu()
    return call, "torch.cuda.CUDAGraph captured once, replayed"


def bare_tensorrt(backend, artifacts, inputs, device, threads):
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(artifacts.plan.read_bytes())
    context, stream = engine.create_execution_context(), torch.cuda.Stream(device)
    static = [t.to(device) for t in inputs]  # fp32 images, int64 ids and mask: the fp32 engine's own types
    for name, buffer in zip(("images", "input_ids", "attention_mask"), static, strict=True):
        assert context.set_input_shape(name, tuple(buffer.shape)), f"{name} is outside the engine's profile"
        context.set_tensor_address(name, buffer.data_ptr())
    logits = torch.empty(tuple(context.get_tensor_shape("logits")), device=device)
    context.set_tensor_address("logits", logits.data_ptr())

    def call():
        with torch.cuda.stream(stream):
            for buffer, given in zip(static, inputs, strict=True):
                buffer.copy_(given, non_blocking=True)
            context.execute_async_v3(stream.cuda_stream)
            return logits.cpu()
    return call, "a TensorRT execution context, execute_async_v3"


def bare_openvino(backend, artifacts, inputs, device, threads):
    import openvino as ov

    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    request = ov.Core().compile_model(str(artifacts.onnx), "CPU", config).create_infer_request()
    feeds = [t.numpy() for t in inputs]
    return lambda: request.infer(feeds), f"openvino compile_model(CPU, {config}).create_infer_request().infer"


BARE = {"torch": bare_module, "torch-compile": bare_module, "onnxruntime": bare_onnxruntime, "aoti": bare_aoti,
        "torch-cudagraphs": bare_cudagraphs, "torch-cudagraphs-inductor": bare_cudagraphs, "tensorrt": bare_tensorrt,
        "openvino": bare_openvino}


def bare_p50(call, seconds: float) -> float:
    """The plainest loop: warm up, then ``perf_counter_ns`` around each call for ``seconds``; the p50 in ms."""
    clock = time.perf_counter_ns
    stop = clock() + WARMUP_SECONDS * 1e9
    while clock() < stop:
        call()
    samples, stop = [], clock() + seconds * 1e9
    while clock() < stop:
        start = clock()
        call()
        samples.append(clock() - start)
    return statistics.median(samples) / 1e6


@torch.inference_mode()
def compare(name: str, artifacts: Artifacts, device: torch.device, args) -> Comparison:
    ok, reason = BACKENDS.get(name).available(device)
    failure = artifacts.failed.get(BACKENDS.get(name).artifact)
    if not ok or failure or name not in BARE:
        return Comparison(name, status=f"unavailable: {reason}" if not ok else f"failed: {failure}" if failure
                          else "no bare runtime for it in this harness")
    backend, seq_len = create_backend(name, artifacts, device), artifacts.model.cfg.max_text_len
    inputs = example_inputs(artifacts.model.cfg, args.batch_size, seq_len)  # what visit_cell feeds, too
    prepared = Prepared(name, backend, artifacts.model, Cell(args.fusion, seq_len, 0.0, {}), load_seconds=0.0,
                        first_call_ms=0.0, first_batch=args.batch_size, passed=True)
    call, what = BARE[name](backend, artifacts, inputs, device, args.threads)
    protocol = replace_protocol(Protocol(), warmup_seconds=WARMUP_SECONDS, min_seconds=args.seconds, max_calls=10**7)
    result = Comparison(name, bare=what, order="ABBA" * args.repeats)
    for side in result.order:
        if side == "A":
            row = row_of(prepared, args.batch_size, [visit_cell(prepared, args.batch_size, protocol)])
            result.fusionprof_p50_ms.append(row.host.p50_ms)
        else:
            result.bare_p50_ms.append(bare_p50(call, args.seconds))
    result.settle()
    return result


class NoOp(nn.Module):
    def forward(self, images, input_ids, attention_mask):
        return images[:, 0, 0, 0]


def overhead_us(cfg, batch_size: int) -> dict:
    """µs per call that the protocol adds: a call that does nothing, and the torch backend around a no-op model."""
    protocol = Protocol(min_seconds=1.0, min_calls=1000, max_calls=200_000)
    noop = create_backend("torch", Artifacts(NoOp()), torch.device("cpu"))
    inputs = example_inputs(cfg, batch_size)
    return {what: summarize(sample_calls(call, sync, protocol))["p50_ms"] * 1e3 for what, call, sync in (
        ("empty_call_p50_us", lambda: None, lambda: None),
        ("torch_backend_noop_p50_us", lambda: noop.run(*inputs), noop.synchronize))}


def prepare(args, names: list[str], device: torch.device, work_dir: Path) -> Artifacts:
    """What the available backends load, built as the sweep builds it (no checkpoint in ``work_dir``: untrained)."""
    runnable = [name for name in names if BACKENDS.get(name).available(device)[0]]
    cfg = SweepConfig(preset=args.preset, fusions=[args.fusion], backends=runnable, batch_sizes=[args.batch_size],
                      device=str(device), threads=args.threads, models_dir=str(work_dir))
    artifacts, _ = load_artifacts(cfg, args.fusion, work_dir)  # the ONNX, and the TensorRT plan and .pt2 built from it
    return artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", help="comma-separated; default: every backend that does not compile")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="A-B-B-A rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="each measurement, after a warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="folder of the record (default: profiles/<host>)")
    args = parser.parse_args()
    names = args.backends.split(",") if args.backends else [n for n in backend_names() if not BACKENDS.get(n).compiles]
    torch.set_num_threads(args.threads)
    device, env, load_before = resolve_device(args.device), fingerprint(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="latency-harness-") as work_dir:
        artifacts = prepare(args, names, device, Path(work_dir))
        results = [compare(name, artifacts, device, args) for name in names]
    overhead = overhead_us(artifacts.model.cfg, args.batch_size)
    suffix = ("" if device.type == "cpu" else f"-{device.type}") + (f"-{'+'.join(names)}" if args.backends else "")
    path = Path(args.out or Path("profiles") / env["host"]) / (
        f"latency-harness-{args.preset}-{args.fusion}-bs{args.batch_size}-{args.threads}t{suffix}.json")
    model = {"weights": "untrained (random init)", "seq_len": artifacts.model.cfg.max_text_len, "precision": "fp32"}
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "latency_harness", "environment": env,
                      "created": datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), "args": vars(args),
                      "model": model, "load_average_1_5_15min": {"start": load_before, "end": os.getloadavg()},
                      "overhead_us": overhead, "comparisons": [asdict(r) for r in results]})
    machine = machine_name(env)
    print(f"{machine}: overhead per call, empty {overhead['empty_call_p50_us']:.2f} µs, torch backend no-op "
          f"{overhead['torch_backend_noop_p50_us']:.2f} µs")
    for r in results:
        print(f"{machine} {args.preset}/{args.fusion} bs{args.batch_size} {args.threads}t {r.backend}: {r.summary()}")
    print(f"record: {path}")


if __name__ == "__main__":
    main()
