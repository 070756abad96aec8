"""AOTInductor packages (``.pt2``): PyTorch's own deployable artifact, built in a child process.

``torch.export`` traces the model with dynamic batch and sequence axes, ``aoti_compile_and_package`` compiles the
graph ahead of time (C++ on the CPU, Triton on CUDA) into one file, and ``aoti_load_package`` runs it later without
the model's Python code, wherever PyTorch runs.

The build runs in a child process: on torch 2.11 + CUDA, AOTInductor once crashed the whole process (segmentation
fault) for the seed model, which in-process would have killed the sweep with no record. A child that dies says how
(the signal) and at which step (export, compile or load), and the caller writes a failed export record with that
reason.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from fusionprof.config import ModelConfig, from_dict, to_dict
from fusionprof.errors import UserError, first_line
from fusionprof.models import FusionModel, build_model
from fusionprof.models.model import InferenceGraph, example_inputs
from fusionprof.runtime import DTYPES

MAX_BATCH, MAX_SEQUENCE = 4096, 512  # the exports' dynamic axes (ONNX and .pt2 alike)


def dynamic_shapes() -> dict[str, dict[int, torch.export.Dim]]:
    """Batch and caption length free (the same ranges as the ONNX export): one artifact serves every shape."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    seq = torch.export.Dim("sequence", min=1, max=MAX_SEQUENCE)
    return {"images": {0: batch}, "input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}


def build_pt2(model: FusionModel, path: Path, precision: str, device: torch.device, timeout_s: float = 3600,
              stop: threading.Event | None = None) -> dict:
    """Write ``path`` (an AOTInductor package for ``device``, weights in ``precision``) from a child process.

    Returns what was built and how long each step took; raises ``UserError`` naming the step and the reason when the
    child fails, dies on a signal, runs past ``timeout_s`` or is stopped (``stop`` set: no one wants it any more)."""
    if precision not in DTYPES:
        raise UserError(f"--precision {precision}: a .pt2 package holds fp32, bf16 or fp16 weights")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pt2-") as tmp:
        source, status = Path(tmp) / "model.pt", Path(tmp) / "status.json"
        torch.save({"model_config": to_dict(model.cfg), "model": model.state_dict()}, source)
        exitcode, timed_out = run_child(_build_in_child, (str(source), str(path), precision, str(device),
                                                         str(status)), timeout_s, stop)
        state = json.loads(status.read_text()) if status.exists() else {"step": "start"}
    if stop is not None and stop.is_set() and not state.get("ok"):
        raise UserError(f"AOTInductor build stopped at its {state['step']} step: it was no longer wanted")
    if state.get("ok"):
        return {"path": str(path), "precision": precision, "device": str(device), "torch": torch.__version__,
                "size_mib": path.stat().st_size / 2**20, "seconds": state["seconds"],
                "dynamic_axes": {"batch": [1, MAX_BATCH], "sequence": [1, MAX_SEQUENCE]}}
    why = _why(exitcode, state, timeout_s if timed_out else None)
    raise UserError(f"AOTInductor build failed at its {state['step']} step: {why}")


def run_child(target, args: tuple, timeout_s: float, stop: threading.Event | None = None) -> tuple[int | None, bool]:
    """``target(*args)`` in a spawned child: its exit code (-N: killed by signal N), and whether it ran past
    ``timeout_s`` and we killed it. Said apart explicitly because our kill is a SIGKILL, like the kernel's
    out-of-memory killer's: the exit code alone cannot tell a hang from a build that ran out of memory. ``stop``
    set: the child is killed at once (within a second)."""
    child = multiprocessing.get_context("spawn").Process(target=target, args=args)
    child.start()
    deadline = time.monotonic() + timeout_s
    while child.is_alive() and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        child.join(min(1.0, max(0.0, deadline - time.monotonic())))
    timed_out = child.is_alive() and not (stop is not None and stop.is_set())
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode, timed_out


def build_jobs(requested: int | None) -> int:
    """Packages built at once where none is asked for: one per CPU core this process may use (each build's compiler
    is mostly one process)."""
    if requested:
        return requested
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class PackagesAhead:
    """``.pt2`` packages built side by side, ``jobs`` at a time, while the caller goes on: an AOTInductor build is a
    minute or more of compiling, mostly one compiler process (C++ on the CPU, Triton kernels on a GPU), so several
    fit beside each other and beside other work. ``builds``: {where the package goes: (model, precision, device)}.

    Each is built in a folder of its own (``build_pt2``: a child process each) and moved to its path when ``take``n.
    Leaving the ``with`` block stops the builds nobody took, and removes what they left."""

    def __init__(self, builds: dict[Path, tuple[FusionModel, str, torch.device]], jobs: int,
                 timeout_s: float = 3600):
        self._folder = tempfile.TemporaryDirectory(prefix="pt2-ahead-")
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max(1, min(jobs, len(builds))))  # threads that each wait on their child
        self._futures = {Path(path): self._pool.submit(build_pt2, model, Path(self._folder.name) / f"{i}.pt2",
                                                       precision, device, timeout_s, self._stop)
                         for i, (path, (model, precision, device)) in enumerate(builds.items())}

    def take(self, path: Path) -> dict | None:
        """The package built for ``path``, once built, moved there: what ``build_pt2`` said of it, its ``path`` now
        ``path``. None where nothing is built for ``path``; the build's ``UserError`` where it failed."""
        future = self._futures.pop(Path(path), None)
        if future is None:
            return None
        built = future.result()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(built["path"], path)
        return {**built, "path": str(path)}

    def __enter__(self) -> PackagesAhead:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._folder.cleanup()


def _why(exitcode: int | None, state: dict, timed_out_after_s: float | None = None) -> str:
    """Why the build process failed, in one line; ``timed_out_after_s``: we killed it at that time limit."""
    if timed_out_after_s is not None:
        return f"the build process ran past its {timed_out_after_s:.0f} s time limit and was killed (SIGKILL)"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        if name == "SIGKILL":  # not ours (we had not timed it out): the kernel's out-of-memory killer, most likely
            return "the build process was killed by SIGKILL (likely out of memory)"
        return f"the build process died with {name}"
    return state.get("error") or f"the build process exited with code {exitcode}"


def _build_in_child(source: str, path: str, precision: str, device: str, status: str) -> None:
    """The child's work: rebuild the model, export, compile, load the package once; each step announced first."""
    seconds: dict[str, float] = {}

    def step(name: str) -> None:
        Path(status).write_text(json.dumps({"step": name, "seconds": seconds}))

    # cpp_extension warns that a CUDA build finds no CUDA runtime, on every CPU-only machine: not news to the user
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        step("export")
        start = time.perf_counter()
        saved = torch.load(source, weights_only=True)
        model = build_model(from_dict(ModelConfig, saved["model_config"]))
        model.load_state_dict(saved["model"])
        dtype = DTYPES[precision]
        graph = InferenceGraph(model).eval().to(device=device, dtype=dtype)
        images, ids, mask = example_inputs(model.cfg, batch=2, seq_len=8, device=device)  # ≥ 2: axes stay free
        with torch.no_grad():
            program = torch.export.export(graph, (images.to(dtype), ids, mask), dynamic_shapes=dynamic_shapes())
        seconds["export"] = time.perf_counter() - start
        step("compile")
        start = time.perf_counter()
        torch._inductor.aoti_compile_and_package(program, package_path=path)
        seconds["compile"] = time.perf_counter() - start
        step("load")
        start = time.perf_counter()
        on = torch.device(device)  # the device the package was built for, named as the backend names it
        torch._inductor.aoti_load_package(path, device_index=on.index or 0 if on.type == "cuda" else -1)(
            images.to(dtype), ids, mask)
        seconds["load_and_first_call"] = time.perf_counter() - start
        Path(status).write_text(json.dumps({"ok": True, "seconds": seconds}))
    except Exception as e:  # any failure of export / inductor: its first line (and first listed cause) is the reason
        Path(status).write_text(json.dumps({"step": json.loads(Path(status).read_text())["step"],
                                            "error": f"{type(e).__name__}: {reason(e)}"}))


def reason(error: BaseException, limit: int = 500) -> str:
    """One line: the error's first line and, where it lists its causes as "- ..." lines (``torch.export``'s
    "Constraints violated (sequence)!" says only "run with TORCH_LOGS" on its first line), the first cause."""
    cause = next((line.strip() for line in str(error).splitlines()[1:] if line.strip().startswith("- ")), None)
    return (first_line(error, limit) + (f" {cause}" if cause else ""))[:limit]
