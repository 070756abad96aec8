"""Launch-free inference on a GPU: CUDA-graph replay and an AOTInductor package against the eager model.

Run on a CUDA machine (tools/gpu_check.sh's cuda-tests step); here, on the CPU, the backends must say they cannot
run and why."""

import numpy as np
import pytest
import torch

from fusionprof.backends import Artifacts, create_backend
from fusionprof.backends.base import BACKENDS
from fusionprof.config import model_config
from fusionprof.errors import UserError
from fusionprof.models import build_model
from fusionprof.models.model import example_inputs
from fusionprof.pt2 import build_pt2

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = {"atol": 6e-2, "rtol": 6e-2}  # export.TOLERANCES["bf16"]: weights cast to bf16 against the fp32 model


def tiny(fusion="mid"):
    torch.manual_seed(0)
    return build_model(model_config("tiny", fusion=fusion, vocab_size=1000)).eval()


def assert_matches_eager(backend, model, shapes=((1, 5), (3, 11), (8, 24))):
    for batch, seq in shapes:
        images, ids, mask = example_inputs(model.cfg, batch, seq)
        mask[0, -2:] = 0
        with torch.no_grad():
            expected = model(images, ids, mask).numpy()
        np.testing.assert_allclose(backend.run(images, ids, mask), expected, **BF16)


GRAPHS = {"torch-cudagraphs": "eager", "torch-cudagraphs-inductor": "inductor"}  # backend → the kernels it replays


@pytest.mark.parametrize("name", GRAPHS)
def test_cuda_graphs_need_a_gpu_and_say_so(name):
    ok, reason = BACKENDS.get(name).available(torch.device("cpu"))
    assert not ok and reason == "CUDA graphs need a CUDA device"
    with pytest.raises(UserError, match=rf"^backend {name} is unavailable: CUDA graphs need a CUDA device$"):
        create_backend(name, Artifacts(tiny()), torch.device("cpu"), "bf16")


@CUDA
@pytest.mark.parametrize("name", GRAPHS)
def test_cuda_graph_replay_matches_eager_and_captures_once_per_shape(name):
    model = tiny()
    backend = create_backend(name, Artifacts(model), torch.device("cuda", 0), "bf16")
    assert_matches_eager(backend, model)
    assert_matches_eager(backend, model, shapes=((3, 11),))  # a shape seen before replays its graph
    info = backend.describe()
    assert info["graphs"] == 3 and set(info["capture_seconds"]) == {"1x5", "3x11", "8x24"}
    assert info["kernels"].startswith(GRAPHS[name])


@CUDA
def test_an_aoti_package_for_the_gpu_matches_eager(tmp_path):
    model = tiny("early")
    device = torch.device("cuda", 0)
    built = build_pt2(model, tmp_path / "model.cuda.bf16.pt2", "bf16", device)
    backend = create_backend("aoti", Artifacts(model, pt2=tmp_path / "model.cuda.bf16.pt2"), device, "bf16")
    assert built["device"] == "cuda:0" and backend.describe()["weights"] == "cast to bf16"
    assert_matches_eager(backend, model)
    info = backend.describe()  # each shape's package call captured once and replayed, as torch-cudagraphs does
    assert info.get("uncaptured") is None and info["graphs"] == 3, info
