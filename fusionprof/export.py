"""``fusionprof export``: ONNX, TensorRT and AOTInductor (``.pt2``) artifacts, checked before anyone times them.

Every export is verified: parity against the PyTorch model on fresh random inputs at several batch sizes and
sequence lengths (max absolute and relative error against stated tolerances), and ITM accuracy of the
exported model on the test split beside the checkpoint's. A failed gate marks the artifact as failed in
``export.json`` and exits non-zero; it is never reported as fine. An artifact that cannot be built (an exporter
error, an AOTInductor build that crashes its process) gets a failed record with the reason, too.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.backends import BACKENDS, Artifacts, backend_for_format, create_backend
from fusionprof.backends.base import INPUT_NAMES, OUTPUT_NAMES, Backend
from fusionprof.backends.trt import build_engine, optimization_profile, tensorrt_status
from fusionprof.chatter import quieted
from fusionprof.checkpoint import checkpoint_hash, load_model, with_run_tokenizer
from fusionprof.config import to_dict
from fusionprof.data import prepare_data
from fusionprof.data.text import build_tokenizer
from fusionprof.env import fingerprint, utc_stamp
from fusionprof.errors import UserError, first_line
from fusionprof.evaluate import evaluate_split, to_inputs
from fusionprof.measure import Protocol, sample_calls, summarize
from fusionprof.metrics import itm_metrics, predict
from fusionprof.models import FusionModel
from fusionprof.models.model import InferenceGraph, example_inputs
from fusionprof.pt2 import PackagesAhead, build_pt2, dynamic_shapes
from fusionprof.quantize import Feeds, calibration_sample, quantize_nncf, quantize_onnx
from fusionprof.runtime import resolve_device

# |exported - torch fp32| <= atol + rtol * |torch fp32|, per logit (numpy.allclose semantics). bf16 keeps 8 bits of
# mantissa to fp16's 11: its rounding is 8x coarser, its tolerance wider. An int8 logit is not within any float
# tolerance: its gate is the match decision (the logit's sign) agreeing with fp32's, and a bound on |Δ logit| (1.0
# shifts a match probability near 0.5 by at most 0.23; parity's random images lie outside the calibration range, where
# a trained tiny mid model's int8 logits moved by up to 0.6 while its test accuracy did not move).
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}, "fp16": {"atol": 2e-2, "rtol": 2e-2},
              "bf16": {"atol": 6e-2, "rtol": 6e-2}, "int8": {"max_abs": 1.0, "decision_agreement": 0.9}}
# The exported model's test accuracy may differ from the checkpoint's (fp32 for int8) by at most this (fraction of
# pairs): logits within tolerance can still cross 0 for a pair or two that sit on the decision boundary.
ACCURACY_TOLERANCE = {"fp32": 0.002, "fp16": 0.01, "bf16": 0.01, "int8": 0.01}
# fp32 on a GPU: cuDNN convolutions run in TF32 by default in PyTorch (as in TensorRT and onnxruntime's CUDA provider),
# 10 bits of mantissa to fp32's 23: a logit of the tiny model moved by up to 2.2e-4 when its convolutions' operands
# were rounded to TF32, past fp32's tolerance. Parity on CUDA in fp32 is held to this instead, and says so.
TF32_TOLERANCE = {"atol": 1e-3, "rtol": 1e-2}
PARITY_SHAPES = [(1, 5), (3, 11), (8, None)]  # (batch, sequence length; None = the model's maximum)
PARITY_MAX_BATCH = max(batch for batch, _ in PARITY_SHAPES)
CPU = torch.device("cpu")


def onnx_name(precision: str) -> str:
    return "model.onnx" if precision == "fp32" else f"model.{precision}.onnx"


def trt_onnx_name(precision: str) -> str:
    """The ONNX a TensorRT export builds its engine from when no gated ONNX export of its precision is there to reuse:
    a file of its own, so that it never rewrites the one ``--fmt onnx`` wrote and its record vouches for."""
    return "model.trt.onnx" if precision == "fp32" else f"model.trt.{precision}.onnx"


def plan_name(precision: str) -> str:
    return "model.plan" if precision == "fp32" else f"model.{precision}.plan"


def pt2_name(precision: str, device_type: str) -> str:
    """An AOTInductor package is compiled for one device type: its name says which."""
    return f"model.{device_type}.{precision}.pt2"


def record_name(fmt: str, precision: str, device_type: str = "cpu") -> str:
    """The verification record written beside an artifact."""
    if fmt == "pt2":
        return f"export.pt2.{device_type}.{precision}.json"
    return "export.json" if (fmt, precision) == ("onnx", "fp32") else f"export.{fmt}.{precision}.json"


def export_record(checkpoint: Path, folder: Path, fmt: str, precision: str, device_type: str = "cpu") -> dict | None:
    """The record of the ``fmt`` / ``precision`` export in ``folder`` if it is one of this very checkpoint (its hash,
    not its path: a run that went on after its export has a new checkpoint), whatever it says; else None."""
    path = Path(folder) / record_name(fmt, precision, device_type)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # none, or not one we wrote whole: export afresh
        return None
    ours = isinstance(record, dict) and record.get("checkpoint_hash") == checkpoint_hash(checkpoint)
    return record if ours else None


def verified_export(checkpoint: Path, folder: Path, fmt: str, precision: str, device_type: str = "cpu") -> dict | None:
    """The record of the ``fmt`` / ``precision`` export in ``folder`` if its verification passed for this very
    checkpoint; else None."""
    record = export_record(checkpoint, folder, fmt, precision, device_type)
    return record if record is not None and record.get("status") == "ok" else None


def failed_gates(record: dict | None) -> list[str]:
    """The gates (parity, accuracy) an export record says its artifact failed: empty for no record, one whose gates
    all passed, or one that never reached them (a build that failed or was killed)."""
    return [gate for gate in ("parity", "accuracy")
            if isinstance((record or {}).get(gate), dict) and record[gate].get("passed") is False]


def export_onnx(model: FusionModel, path: Path, precision: str = "fp32", opset: int = 18) -> dict:
    """Write ``path`` with dynamic batch and sequence axes, check it, and return what was written."""
    if precision not in TOLERANCES or precision == "int8":  # int8 is quantized from this: export_int8_onnx
        raise UserError(f"--precision {precision}: ONNX export supports {', '.join(TOLERANCES)}")
    graph = InferenceGraph(copy.deepcopy(model)).eval()
    # Batch ≥ 2 and sequence ≥ 2 in the example, or the exporter specialises the axes to the example's sizes.
    images, ids, mask = example_inputs(model.cfg, batch=2, seq_len=8)
    if precision == "fp16":
        graph, images = graph.half(), images.half()
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # the exporter narrates every stage on stdout and onnxscript logs each skipped fold: keep ours readable
    with warnings.catch_warnings(), torch.no_grad(), quieted("onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (images, ids, mask), dynamo=True, input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes=dynamic_shapes(),
                                    opset_version=opset,
                                    verbose=False)
    program.save(str(path), external_data=_weight_bytes(model) > 1.5 * 2**30)  # protobuf's 2 GB limit
    seconds = time.perf_counter() - start
    axes = check_onnx(path)
    return {"path": str(path), "precision": precision, "opset": opset, "export_seconds": seconds,
            "size_mib": sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 2**20, "axes": axes}


def _weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_onnx(path: Path) -> dict[str, list]:
    """``onnx.checker`` on the file, and every input's batch axis (and the text's sequence axis) symbolic."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises ValidationError, DecodeError, OSError ...
        raise UserError(f"{path}: not a valid ONNX model ({first_line(e)})") from None
    axes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    for name, dims in axes.items():
        symbolic = [0] if name == "images" else [0, 1]
        if any(not isinstance(dims[k], str) for k in symbolic):
            raise UserError(f"{path}: input {name} has fixed axes {dims}; the export specialised them")
    return axes


def parity(reference: FusionModel, backend, precision: str, largest_batch: int = 8, seed: int = 0) -> dict:
    """Max abs / rel error of the backend's logits against the eager fp32 model, and how often their match decisions
    (the logit's sign) agree, per input shape: the fixed shapes, and ``largest_batch`` (the largest batch that will
    be timed or evaluated) at full caption length."""
    tf32 = precision == "fp32" and backend.device.type == "cuda"
    tol = {**TF32_TOLERANCE, "why": "fp32 on CUDA: TF32 convolutions, the runtimes' default"} if tf32 \
        else TOLERANCES[precision]
    rows, ok, agree = [], True, []
    shapes = PARITY_SHAPES + ([(largest_batch, None)] if largest_batch > PARITY_MAX_BATCH else [])
    for batch, seq in shapes:
        seq = seq or reference.cfg.max_text_len
        images, ids, mask = example_inputs(reference.cfg, batch, seq)
        g = torch.Generator().manual_seed(seed + batch)
        images = torch.randn(images.shape, generator=g)
        mask[:, seq // 2 + 1:] = torch.randint(0, 2, (batch, seq - seq // 2 - 1), generator=g)  # some padding
        with torch.no_grad():
            expected = reference(images, ids, mask).float().numpy()
        got = backend.run(images, ids, mask)
        diff = np.abs(got - expected)
        bound = tol["max_abs"] if "max_abs" in tol else tol["atol"] + tol["rtol"] * np.abs(expected)
        within = bool(np.all(diff <= bound))
        ok &= within
        agree.append((got > 0) == (expected > 0))
        rows.append({"batch": batch, "seq_len": seq, "max_abs_error": float(diff.max()),
                     "max_rel_error": float((diff / np.maximum(np.abs(expected), 1e-6)).max()),
                     "decision_agreement": float(agree[-1].mean()), "within": within})
    agreement = float(np.concatenate(agree).mean())
    ok &= agreement >= tol.get("decision_agreement", 0.0)
    return {"tolerance": tol, "shapes": rows, "decision_agreement": agreement, "passed": ok}


def export(checkpoint: Path, fmt: str = "onnx", precision: str = "fp32", out: Path | None = None,
           device: str = "cpu", max_batch: int = 32, progress: bool = True, log=print,
           packages: PackagesAhead | None = None) -> dict:
    """Export a checkpoint, verify it, and write its record beside the artifact; raise if the build or a gate
    fails (the record then says failed, and why). ``packages``: where a ``.pt2`` may have been built ahead, side by
    side with others (``compare``)."""
    verifier = backend_for_format(fmt)  # the backend that loads this format checks it; unknown formats fail here
    if fmt == "trt":
        ok, reason = tensorrt_status()
        if not ok:
            raise UserError(f"--fmt trt: {reason}")
        device = device if device.startswith("cuda") else "cuda:0"
    torch_device = resolve_device(device)
    if problem := verifier.precision_problem(precision, torch_device):
        raise UserError(f"--fmt {fmt} --precision {precision}: {problem}")
    model, cfg = load_model(checkpoint)
    out = Path(out) if out else Path(checkpoint).parent
    path = out / record_name(fmt, precision, torch_device.type)
    record = {"schema_version": SCHEMA_VERSION, "kind": "export", "created": utc_stamp(), "checkpoint": str(checkpoint),
              "checkpoint_hash": checkpoint_hash(checkpoint), "fusion": model.cfg.fusion, "preset": cfg.preset,
              "format": fmt, "precision": precision, "environment": fingerprint(), "model_config": to_dict(model.cfg)}
    # From here until its gates have run, the artifact on disk is not the verified one: an earlier "ok" record
    # beside it must not vouch for it (a process killed mid-way leaves "building", which nothing reuses)
    write_json(path, {**record, "passed": False, "status": "building"})
    try:  # the accuracy gate runs at the training batch: a TensorRT profile must cover it too
        # int8 quantizes the fp32 ONNX, TensorRT builds from the ONNX of its precision: an export's that passed
        source = verified_onnx(Path(checkpoint), out, "fp32" if precision == "int8" else precision) \
            if precision == "int8" or fmt == "trt" else None
        calibration = checkpoint_calibration(checkpoint, model, cfg)
        artifacts = build_artifacts(fmt, model, out, precision, torch_device, max(max_batch, cfg.batch_size),
                                    record, log, calibration, source, progress, packages)
        backend = verifier(artifacts, torch_device, precision)
        record["parity"] = parity(model, backend, precision, largest_batch=max(max_batch, cfg.batch_size))
        gate = AccuracyGate(model, cfg, Path(checkpoint), progress)
        record["accuracy"] = gate(backend, precision)
        record["backend"] = backend.describe()  # after its calls: e.g. whether aoti's calls could be captured
        record["passed"] = record["parity"]["passed"] and record["accuracy"]["passed"]
        if precision == "int8" and artifacts.ir is not None:  # NNCF's IR, kept for openvino: the same accuracy gate
            gate_ir(record["onnx"]["openvino"], artifacts, gate)
    except Exception as e:  # not built, or not checkable: a failed record with the reason, not a gap or a traceback
        why = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {first_line(e)}"
        write_json(path, {**record, "passed": False, "status": "failed", "failure": why})
        raise UserError(f"{why} (marked failed in {path})") from None
    record["status"] = "ok" if record["passed"] else "failed"
    write_json(path, record)
    record["record_path"] = str(path)
    return record


def int8_choice(nncf_passed: bool, p50_ms: dict[str, float]) -> tuple[str, str]:
    """Which int8 model ``openvino`` loads ("nncf" or "qdq"), and why: NNCF's IR only if it passed the gate and its
    p50 was lower; on a tie, the QDQ graph that onnxruntime runs too."""
    if not nncf_passed:
        return "qdq", "NNCF's IR failed the int8 parity gate"
    if p50_ms["nncf"] >= p50_ms["qdq"]:
        return "qdq", f"the QDQ graph ran at least as fast on openvino at batch {CHOICE_BATCH}"
    return "nncf", f"NNCF's IR passed parity and ran faster on openvino at batch {CHOICE_BATCH}"


def gate_ir(openvino: dict, artifacts: Artifacts, gate: AccuracyGate) -> None:
    """NNCF's IR on the test split through ``openvino``: one that loses more accuracy than int8's tolerance is
    dropped, and openvino loads the QDQ graph (which passed its own gates) instead."""
    openvino["nncf"]["accuracy"] = gate(create_backend("openvino", artifacts, CPU, "int8"), "int8")
    if not openvino["nncf"]["accuracy"]["passed"]:
        _drop_ir(artifacts.ir)
        artifacts.ir = None
        openvino["loads"], openvino["why"] = "qdq", "NNCF's IR failed the accuracy gate"


def verified_onnx(checkpoint: Path, out: Path, precision: str) -> dict | None:
    """The ``precision`` ONNX of this checkpoint that an int8 export quantizes (fp32) or a TensorRT export builds its
    engine from, instead of exporting its own: one whose export passed its gates for this very checkpoint, in ``out``
    or else beside the checkpoint; read, never rewritten. Its record's ``onnx``, with ``reused``: that record."""
    for folder in dict.fromkeys([Path(out), checkpoint.parent]):
        path = folder / onnx_name(precision)
        if path.exists() and (record := verified_export(checkpoint, folder, "onnx", precision)) is not None:
            return {**record["onnx"], "path": str(path), "reused": str(folder / record_name("onnx", precision))}
    return None


def checkpoint_calibration(checkpoint: Path, model: FusionModel, cfg) -> Callable[[], tuple[list[Feeds], dict]]:
    """The int8 calibration sample of a checkpoint: its own data's validation split, through its own tokenizer."""
    model_cfg = with_run_tokenizer(model.cfg, Path(checkpoint).parent)
    return partial(calibration_sample, model_cfg, cfg.data, cfg.seed, cfg.limit_eval, layout=cfg.data_layout)


def profile_batches(max_batch: int) -> list[int]:
    """The batch sizes a TensorRT profile is built over: powers of two up to ``max_batch``, and ``max_batch``; at
    least up to the largest batch ``parity`` checks, or an engine for small batches could never pass it."""
    max_batch = max(max_batch, PARITY_MAX_BATCH)
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_batch} | {max_batch})


def build_artifacts(fmt: str, model: FusionModel, out: Path, precision: str, device: torch.device, max_batch: int,
                    record: dict, log=print, calibration: Callable[[], tuple[list[Feeds], dict]] | None = None,
                    source_onnx: dict | None = None, progress: bool = False,
                    packages: PackagesAhead | None = None) -> Artifacts:
    """Write the ``fmt`` artifact (and the ONNX a TensorRT engine is built from) into ``out``; what was written
    goes into ``record``. int8 needs ``calibration``: the validation sample the quantizer calibrates on; it
    quantizes ``source_onnx`` (fp32) where given (``verified_onnx``), else an fp32 export of its own; ``progress``
    shows the quantizer's progress bars. TensorRT builds from ``source_onnx`` (the gated ONNX of its precision) where
    given, else from an ONNX export of its own (``trt_onnx_name``), never rewriting ``--fmt onnx``'s. A ``.pt2`` is
    taken from ``packages`` where it was built there ahead, else built now."""
    if fmt == "pt2":
        path = out / pt2_name(precision, device.type)
        record["pt2"] = (packages and packages.take(path)) or build_pt2(model, path, precision, device)
        log(f"built {record['pt2']['path']} ({record['pt2']['size_mib']:.1f} MiB, "
            + ", ".join(f"{k} {v:.1f} s" for k, v in record["pt2"]["seconds"].items()) + ")")
        return Artifacts(model, pt2=Path(record["pt2"]["path"]))
    if precision == "int8":
        if fmt != "onnx" or calibration is None:
            raise UserError(f"--fmt {fmt} --precision int8: int8 is a quantized ONNX (--fmt onnx), from calibration "
                            "data")
        record["onnx"] = export_int8_onnx(model, out / onnx_name(precision), *calibration(), source_onnx, progress)
        log(f"quantized {record['onnx']['path']} ({record['onnx']['size_mib']:.1f} MiB, calibrated on "
            f"{record['onnx']['calibration']['pairs']} {record['onnx']['calibration']['split']} pairs); in int8: "
            f"{record['onnx']['int8_ops']}")
        return int8_artifacts(model, out / onnx_name(precision))
    if fmt == "trt" and source_onnx is not None:
        record["onnx"] = source_onnx
        log(f"building from {source_onnx['path']}, the ONNX export whose gates passed ({source_onnx['reused']})")
    else:
        record["onnx"] = export_onnx(model, out / (trt_onnx_name if fmt == "trt" else onnx_name)(precision), precision)
        log(f"exported {record['onnx']['path']} ({record['onnx']['size_mib']:.1f} MiB, "
            f"{record['onnx']['export_seconds']:.1f} s); axes {record['onnx']['axes']}")
    artifacts = Artifacts(model, onnx=Path(record["onnx"]["path"]))
    if fmt == "trt":
        artifacts.plan = out / plan_name(precision)
        profile = optimization_profile(profile_batches(max_batch), [1, model.cfg.max_text_len], model.cfg.image_size)
        start = time.perf_counter()
        record["tensorrt"] = build_engine(artifacts.onnx, artifacts.plan, profile)
        record["tensorrt"]["build_seconds"] = time.perf_counter() - start
    return artifacts


def export_int8_onnx(model: FusionModel, path: Path, calibration: list[Feeds], calibration_source: dict,
                     fp32_onnx: dict | None = None, progress: bool = False) -> dict:
    """The int8 graph at ``path``: the fp32 ONNX, checked for parity (fp32 tolerances), then statically quantized
    on the calibration sample; the record says what was quantized and what stayed in float. For ``openvino``, NNCF's
    IR of the same fp32 graph beside it, where it earns its place (``openvino_int8``).

    ``fp32_onnx`` (``path``, and ``reused``: where it comes from) is an fp32 export of this model already on disk:
    quantized as it is if it holds parity now, else an fp32 export is made afresh."""
    with tempfile.TemporaryDirectory() as tmp:
        source, source_parity = fp32_onnx, None
        if source is not None:
            source_parity = _fp32_parity(model, Path(source["path"]))
            source = source if source_parity["passed"] else None
        if source is None:
            source = export_onnx(model, Path(tmp) / onnx_name("fp32"))
            source_parity = _fp32_parity(model, Path(source["path"]))
            if not source_parity["passed"]:
                raise UserError("the fp32 ONNX to quantize fails parity with the PyTorch model")
        quantized = quantize_onnx(Path(source["path"]), path, calibration)
        openvino = openvino_int8(model, Path(source["path"]), path, calibration, progress)
    kept = ("opset", "export_seconds", "size_mib") + (("path", "reused") if "reused" in source else ())
    return {"path": str(path), "precision": "int8",
            "quantized_from": {**{k: source[k] for k in kept if k in source}, "parity": source_parity},
            "calibration": calibration_source, **quantized, "size_mib": path.stat().st_size / 2**20,
            "axes": check_onnx(path), "openvino": openvino}


def _fp32_parity(model: FusionModel, onnx: Path) -> dict:
    return parity(model, backend_for_format("onnx")(Artifacts(model, onnx=onnx), CPU, "fp32"), "fp32")


# The short A/B that picks openvino's int8 model: alternating rounds, each a few hundred ms of calls at batch 8.
CHOICE_BATCH, CHOICE_ROUNDS = 8, 3
CHOICE_PROTOCOL = Protocol(warmup_seconds=0.2, warmup_calls=3, min_seconds=0.5, min_calls=10, max_seconds=5.0)


def nncf_ir_path(int8_onnx: Path) -> Path:
    """Where NNCF's IR of an int8 export lives: beside its QDQ ONNX, and only while ``openvino`` is to load it."""
    return Path(int8_onnx).with_suffix(".nncf.xml")


def int8_artifacts(model: FusionModel, int8_onnx: Path) -> Artifacts:
    """An int8 export as the backends load it: the QDQ ONNX, and NNCF's IR beside it if the export kept one."""
    ir = nncf_ir_path(int8_onnx)
    return Artifacts(model, onnx=Path(int8_onnx), ir=ir if ir.exists() else None)


def _drop_ir(ir: Path) -> None:
    ir.unlink(missing_ok=True)
    ir.with_suffix(".bin").unlink(missing_ok=True)


def openvino_int8(model: FusionModel, source: Path, qdq: Path, calibration: list[Feeds], progress: bool = False
                  ) -> dict:
    """NNCF's int8 IR of the fp32 graph ``source``, calibrated on the same sample, written beside the QDQ graph
    ``qdq`` and kept only if it passes the int8 parity gate on ``openvino`` and runs faster there than the QDQ graph
    (p50 at batch 8, timed in alternating rounds); the record says which of the two ``openvino`` loads, and why.
    (``export``, and a latency sweep's export of a trained model, also hold a kept IR to the accuracy gate:
    ``gate_ir``.)"""
    ok, reason = BACKENDS.get("openvino").available(CPU)
    if not ok:
        return {"loads": "qdq", "why": f"openvino is unavailable here: {reason}"}
    ir = nncf_ir_path(qdq)
    try:
        nncf = {"path": str(ir), **quantize_nncf(source, ir, calibration, progress)}
    except Exception as e:  # NNCF's own errors on a graph it cannot quantize: the QDQ graph still serves openvino
        _drop_ir(ir)
        return {"loads": "qdq", "why": f"NNCF could not quantize the graph ({first_line(e)})"}
    backends = {"qdq": create_backend("openvino", Artifacts(model, onnx=qdq), CPU, "int8"),
                "nncf": create_backend("openvino", Artifacts(model, onnx=qdq, ir=ir), CPU, "int8")}
    checks = {name: parity(model, backend, "int8") for name, backend in backends.items()}
    inputs = example_inputs(model.cfg, CHOICE_BATCH, model.cfg.max_text_len)
    rounds: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(CHOICE_ROUNDS):
        for name, backend in backends.items():
            samples = sample_calls(lambda backend=backend: backend.run(*inputs), lambda: None, CHOICE_PROTOCOL)
            rounds[name].append(summarize(samples)["p50_ms"])
    p50 = {name: float(np.median(values)) for name, values in rounds.items()}
    loads, why = int8_choice(checks["nncf"]["passed"], p50)
    if loads == "qdq":
        _drop_ir(ir)
    return {"loads": loads, "why": why,
            "nncf": {**nncf, "backend": backends["nncf"].describe(), "parity": checks["nncf"]},
            "qdq": {"path": str(qdq), "backend": backends["qdq"].describe(), "parity": checks["qdq"]},
            "p50_ms": {"batch": CHOICE_BATCH, "rounds": rounds, "median": p50}}


def within_tolerance(delta: float, pairs: int, tolerance: float) -> bool:
    """Whether an accuracy difference ``delta`` on ``pairs`` pairs is within ``tolerance``, counted in pairs, not
    fractions: 4 of 2000 pairs is 0.2 % exactly, which as floats is 0.0020000000000000018; and the pairs allowed are
    rounded down, so that on 64 pairs one pair (1.6 %) is not within 1 %."""
    return round(delta * pairs) <= math.floor(tolerance * pairs + 1e-9)


class AccuracyGate:
    """The accuracy gate on the test split for the exports of one checkpoint: the split is prepared, and the
    checkpoint's reference accuracy computed, once however many artifacts are held to it (an int8 export holds two,
    the QDQ graph and NNCF's IR)."""

    def __init__(self, model: FusionModel, cfg, checkpoint: Path, progress: bool):
        tokenizer = build_tokenizer(with_run_tokenizer(model.cfg, checkpoint.parent))
        splits, _ = prepare_data(cfg.data, tokenizer, model.cfg.image_size, model.cfg.max_text_len, cfg.seed,
                                 limit_eval=cfg.limit_eval, splits=("test",), progress=progress,
                                 layout=cfg.data_layout)
        self.model, self.cfg, self.test = model, cfg, splits["test"]
        self._references: dict[tuple[torch.device, str], dict] = {}

    def reference(self, device: torch.device, precision: str) -> dict:
        """The checkpoint's test metrics on ``device`` in ``precision`` (evaluated once)."""
        if (device, precision) not in self._references:
            self._references[device, precision] = evaluate_split(self.model.to(device), self.test, self.cfg.seed,
                                                                 self.cfg.batch_size, device, precision)
            self.model.cpu()
        return self._references[device, precision]

    def __call__(self, backend: Backend, precision: str) -> dict:
        # the checkpoint in the export's precision, where the backend runs (fp16 autocast needs a GPU): the gate then
        # measures what exporting changed, not what the precision changed
        device = backend.device if backend.device.type == "cuda" else CPU
        # (int8 is no autocast precision: the quantized graph is held against the fp32 checkpoint)
        float_reference = precision == "int8" or (precision == "fp16" and device.type != "cuda")
        reference_precision = "fp32" if float_reference else precision
        reference = self.reference(device, reference_precision)
        batches = self.test.batches(self.test.pairs(self.cfg.seed), self.cfg.batch_size)
        logits, labels = predict(lambda b: backend.run(*to_inputs(b, CPU)[0]), batches)
        exported = itm_metrics(logits, labels, "test")
        # non-finite logits have no accuracy: nothing to hold the other side to, and no pass
        invalid = [f"{side}: {m['invalid']}" for side, m in (("checkpoint", reference), ("exported", exported))
                   if m["accuracy"] is None]
        delta = None if invalid else abs(exported["accuracy"] - reference["accuracy"])
        return {"split": "test", "pairs": exported["pairs"], "checkpoint_precision": reference_precision,
                "checkpoint_accuracy": reference["accuracy"],
                "exported_accuracy": exported["accuracy"], "checkpoint_auc": reference["auc"],
                "exported_auc": exported["auc"], "checkpoint_non_finite": reference["non_finite"],
                "exported_non_finite": exported["non_finite"], "abs_difference": delta,
                "tolerance": ACCURACY_TOLERANCE[precision],
                "passed": not invalid and within_tolerance(delta, exported["pairs"], ACCURACY_TOLERANCE[precision]),
                **({"invalid": "; ".join(invalid)} if invalid else {})}
