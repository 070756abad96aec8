"""Every backend in the registry against the eager model, on every fusion method, at several batch sizes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stand_in_onnx

from fusionprof.backends import Artifacts, backend_for_format, backend_names, create_backend, export_formats
from fusionprof.backends.base import BACKENDS, EXPORT_FORMATS
from fusionprof.backends.trt import INSTALL_HINT, optimization_profile
from fusionprof.checkpoint import load_model
from fusionprof.config import model_config
from fusionprof.errors import UserError
from fusionprof.export import TOLERANCES, record_name
from fusionprof.latency import random_init_model
from fusionprof.models import build_model, fusion_names
from fusionprof.models.model import example_inputs
from fusionprof.runtime import INFERENCE_PRECISIONS, PRECISIONS, native_bf16

CPU = torch.device("cpu")


def _runs_a_pt2(item) -> bool:
    """Whether a collected test runs a backend that loads an AOTInductor package."""
    name = getattr(item, "callspec", None) and item.callspec.params.get("name")
    return name in backend_names() and BACKENDS.get(name).artifact == "pt2" and BACKENDS.get(name).available(CPU)[0]


@pytest.fixture(scope="module")
def artifacts(request):
    """One untrained tiny model per fusion method, exported to ONNX once for the session (conftest.py).

    When this run checks a backend that loads a .pt2, its package is compiled first, in a process of its own: on a
    2-core CPU the compile and these exports (one core each) overlap. It is waited for here, at the latest."""
    build = None
    if any(_runs_a_pt2(item) for item in request.session.items if item.module is request.module):
        build, _ = request.getfixturevalue("pt2_build")
    yield request.getfixturevalue("untrained_onnx")  # after the build started
    if build is not None:
        build.wait()  # nothing of it outlives this module's tests


@pytest.mark.parametrize("name", backend_names())
def test_every_backend_describes_itself(name):
    """What the sweep, export, compare and the CLI read instead of a backend's name."""
    backend = BACKENDS.get(name)
    assert backend.registered_name == name and backend.label and backend.label.strip() == backend.label
    assert backend.artifact is None or backend.artifact in EXPORT_FORMATS.values()
    assert isinstance(backend.compiles, bool) and backend.precisions
    for device_type, precisions in backend.precisions.items():
        assert device_type in ("cpu", "cuda") and precisions and set(precisions) <= set(INFERENCE_PRECISIONS)
    for device_type in ("cpu", "cuda"):
        device = torch.device(device_type)
        for precision in PRECISIONS:
            problem = backend.precision_problem(precision, device)
            runs = precision in backend.precisions.get(device_type, ())
            assert (problem is None) == runs
            if not runs:
                assert problem.startswith(f"{name} runs ") and problem.endswith(f"on {device_type}, not {precision}")


def test_exported_graphs_run_in_their_own_precision_and_autocast_has_no_cpu_fp16():
    for name in backend_names():
        backend = BACKENDS.get(name)
        if backend.artifact in ("onnx", "plan"):  # an ONNX / TensorRT graph is fp32 or fp16 as exported: never bf16,
            # but through a runtime's hint (openvino) on a CPU that computes bf16
            assert all("bf16" not in p for d, p in backend.precisions.items() if d == "cuda" or not native_bf16(CPU))
        elif "cpu" in backend.precisions:
            assert backend.precision_problem("fp16", CPU) is not None


def test_each_export_format_has_the_backend_that_loads_it():
    assert "onnx" in export_formats()
    for fmt in export_formats():
        assert backend_for_format(fmt).artifact == EXPORT_FORMATS[fmt]
    with pytest.raises(UserError, match=f"--fmt tflite: choose from {', '.join(export_formats())}"):
        backend_for_format("tflite")


def test_a_graph_backend_refuses_bf16_in_one_line(artifacts):
    graph_backends = [n for n in backend_names() if BACKENDS.get(n).artifact in ("onnx", "plan")
                      and BACKENDS.get(n).available(CPU)[0] and "bf16" not in BACKENDS.get(n).precisions["cpu"]]
    for name in graph_backends:
        with pytest.raises(UserError, match=f"^{name} runs [a-z0-9 ]+ on cpu, not bf16$"):
            create_backend(name, artifacts["early"], CPU, "bf16")


@pytest.fixture(scope="module")
def compiled_export(trained_mid, pt2_export):
    """By fusion, an AOTInductor package and the model it was compiled from: the session's trained mid run and what
    `fusionprof export --fmt pt2` built of it (conftest.py; about a minute on 2 cores, shared with test_export)."""
    code, out = pt2_export
    assert code == 0, out
    checkpoint = trained_mid[0]
    record = json.loads((checkpoint.parent / record_name("pt2", "fp32", "cpu")).read_text())
    return {"mid": Artifacts(load_model(checkpoint)[0], pt2=Path(record["pt2"]["path"]))}


def backend_cases():
    """Every backend on every fusion, except that a backend that compiles (a minute or two per model here) is checked
    on mid, the fusion with the most kinds of op (cross-attention, 2-D positions), in the slow suite. Those come last,
    and the one that loads a .pt2 last of all: its package compiles in a process of its own meanwhile (`artifacts`)."""
    def order(name):
        return BACKENDS.get(name).compiles, BACKENDS.get(name).artifact == "pt2"

    for name in sorted(backend_names(), key=order):
        compiles = BACKENDS.get(name).compiles
        yield from (pytest.param(name, fusion, marks=[pytest.mark.slow] if compiles else [])
                    for fusion in fusion_names() if not compiles or fusion == "mid")


@pytest.mark.parametrize("name,fusion", list(backend_cases()))
def test_backend_matches_eager(name, fusion, artifacts, request):
    ok, reason = BACKENDS.get(name).available(CPU)
    if not ok:
        pytest.skip(f"{name} unavailable here: {reason}")
    pt2 = BACKENDS.get(name).artifact == "pt2"
    art = request.getfixturevalue("compiled_export")[fusion] if pt2 else artifacts[fusion]
    backend = create_backend(name, art, CPU)
    tol = TOLERANCES["fp32"]
    for batch in (1, 3, 8):  # three batch sizes through one artifact: the batch axis is dynamic
        images, ids, mask = example_inputs(art.model.cfg, batch, seq_len=7 + batch)
        mask[0, -2:] = 0
        if batch == 8:  # the layout evaluation batches come in (to_inputs): NHWC strides under NCHW shape
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = art.model(images, ids, mask).numpy()
        got = backend.run(images, ids, mask)
        assert got.shape == (batch,) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=tol["atol"], rtol=tol["rtol"])
    assert backend.describe()["backend"] == name


def test_the_torch_backend_says_it_autocasts_over_fp32_weights():
    """Its bf16 is autocast over the weights as trained (a cast copy runs faster on an AMX CPU:
    benchmarks/cpu_bf16_weights.py); each row's backend_info says which, beside torch-cudagraphs' "cast to bf16"."""
    model = build_model(model_config("tiny", fusion="late", vocab_size=1000)).eval()
    for precision, weights in (("fp32", "fp32"), ("bf16", "fp32, autocast to bf16")):
        backend = create_backend("torch", Artifacts(model), CPU, precision)
        assert backend.describe()["weights"] == weights
        assert next(p.dtype for p in backend.model.parameters()) == torch.float32


def test_onnx_axes_are_symbolic(artifacts):
    import onnx

    graph = onnx.load(str(artifacts["mid"].onnx)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["images"] == ["batch", 3, 64, 64]
    assert dims["input_ids"] == dims["attention_mask"] == ["batch", "sequence"]


def test_tensorrt_is_unavailable_here_with_the_way_to_fix_it():
    ok, reason = BACKENDS.get("tensorrt").available(CPU)
    assert not ok and INSTALL_HINT in reason
    if not torch.cuda.is_available():
        ok, reason = BACKENDS.get("tensorrt").available(torch.device("cuda", 0))
        assert not ok and "no CUDA GPU" in reason


def test_unavailable_backend_is_a_clear_error(artifacts):
    with pytest.raises(UserError, match="backend tensorrt is unavailable: TensorRT runs on CUDA devices only"):
        create_backend("tensorrt", artifacts["early"], CPU)
    with pytest.raises(UserError, match=f"unknown backend 'tvm'; choose from {', '.join(backend_names())}$"):
        create_backend("tvm", artifacts["early"], CPU)


def test_onnxruntime_needs_an_export_and_a_whole_file(artifacts, tmp_path):
    art = artifacts["late"]
    with pytest.raises(UserError, match="no ONNX model for this model: run `fusionprof export --fmt onnx` first"):
        create_backend("onnxruntime", Artifacts(art.model), CPU)
    truncated = tmp_path / "model.onnx"
    truncated.write_bytes(art.onnx.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"model.onnx: onnxruntime cannot load it: ") as e:
        create_backend("onnxruntime", Artifacts(art.model, onnx=truncated), CPU)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name,says", [
    ("onnxruntime", "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions for input: images for the "
                    "following indices; index: 2 Got: 32 Expected: 64; index: 3 Got: 32 Expected: 64"),
    ("openvino", "ParameterMismatch: Can not clone with new dims. Descriptor's shape: {0 - ?, 3, 64, 64} is "
                 "incompatible with provided dimensions: {2, 3, 32, 32}.")])
def test_a_runtime_refusing_its_inputs_says_so_in_one_line_with_their_shape(name, says, tmp_path):
    """onnxruntime raises ``InvalidArgument`` (no RuntimeError), OpenVINO a RuntimeError whose first three lines name
    its source files: each is a one-line ``UserError`` naming the runtime, the shape and what the runtime said."""
    model = random_init_model("tiny", "early")
    backend = create_backend(name, Artifacts(model, onnx=stand_in_onnx(tmp_path / "model.onnx", "memory")), CPU)
    images, ids, mask = example_inputs(model.cfg, 2)
    assert backend.run(images, ids, mask).shape == (2,)
    with pytest.raises(UserError) as e:
        backend.run(images[:, :, :32, :32], ids, mask)  # an image size the graph does not take
    assert str(e.value).startswith(f"{name} at batch 2, seq 24: {says}") and "\n" not in str(e.value)


def test_tensorrt_profile_covers_every_shape():
    profile = optimization_profile([1, 2, 4, 8, 16, 32], [1, 24], 64)
    assert profile["images"] == ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))
    assert profile["input_ids"] == profile["attention_mask"] == ((1, 1), (8, 24), (32, 24))
    assert optimization_profile([4], [16], 224)["images"] == ((4, 3, 224, 224),) * 3
    with pytest.raises(UserError, match="at least 1"):
        optimization_profile([0, 4], [16], 224)


def test_a_tensorrt_profile_covers_the_evaluation_batch():
    """The accuracy gate evaluates at the training batch (64 on tiny), above the default --max-batch 32."""
    from fusionprof.backends.trt import optimization_profile
    from fusionprof.config import train_config
    from fusionprof.export import profile_batches

    eval_batch = train_config("tiny").batch_size
    batches = profile_batches(max(32, eval_batch))
    assert batches[-1] == eval_batch == 64 and batches[0] == 1
    assert profile_batches(48) == [1, 2, 4, 8, 16, 32, 48]  # not a power of two: still the largest
    assert profile_batches(2) == [1, 2, 4, 8]  # a sweep of small batches: still every batch parity checks
    smallest, _, largest = optimization_profile(batches, [1, 24], 64)["images"]
    assert smallest[0] == 1 and largest[0] == eval_batch
