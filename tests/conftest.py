import importlib.util
import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

# Nothing in the tests may reach the network. huggingface_hub reads these when it is first imported, so they are
# set here, before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["FUSIONPROF_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

from fusionprof.config import model_config
from fusionprof.data.synth import write_synth
from fusionprof.data.text import build_tokenizer
from fusionprof.models.registry import FUSIONS

SMALL = {"train": 48, "val": 16, "test": 16}
# The error for a GPU index no machine has: "no CUDA GPU" here, "only N CUDA device(s)" on a GPU machine.
NO_CUDA_64 = "--device cuda:64: " + ("only " if torch.cuda.is_available() else "no CUDA GPU is visible here")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes derived data (image caches, the embedded dataset) under one temporary folder."""
    monkeypatch.setenv("FUSIONPROF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A small embedded dataset (COCO layout) shared by the tests that only read it."""
    return write_synth(tmp_path_factory.mktemp("data") / "small", SMALL, size=64, seed=1, progress=False)


@contextmanager
def session_cache(tmp_path_factory):
    """The tests' cache folder, for a session fixture (session fixtures come before `isolated_cache`)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSIONPROF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield


def train_once(tmp_path_factory, folder: str, data, fusion: str, **settings) -> tuple[object, dict]:
    """Train tiny ``fusion`` on ``data`` in this process, into a new folder named after ``folder``: (that folder,
    metrics). ``settings`` are TrainConfig fields."""
    from fusionprof.config import train_config
    from fusionprof.train import train

    out = tmp_path_factory.mktemp(folder)
    cfg = train_config("tiny", data=str(data), models_dir=str(out / "m"), profiles_dir=str(out / "p"), **settings)
    with session_cache(tmp_path_factory):
        return out, train(cfg, model_config("tiny", fusion=fusion), progress=False, log=lambda s: None)


@pytest.fixture(scope="session")
def trained_mid(tmp_path_factory, small_data):
    """One epoch of tiny mid on the small set, trained once for the session: (checkpoint path, metrics). The export,
    low-precision and backend tests read it; what they export goes to their own folders, except `pt2_export`'s."""
    out, metrics = train_once(tmp_path_factory, "trained", small_data, "mid", epochs=1, batch_size=16)
    return out / "m" / "tiny-mid" / "checkpoint.pt", metrics


# Three short epochs of tiny early on `learnable_data` learn the embedded task (82–86 % over four other seed / data
# draws, 81.7 % on this one): a 20-step warm-up at twice the preset's rate (the preset's 100-step warm-up needed five,
# in 1.7× the time). TrainConfig fields.
LEARNS = {"epochs": 3, "batch_size": 32, "lr": 2e-3, "encoder_lr": 2e-3, "warmup_steps": 20}


@pytest.fixture(scope="session")
def learnable_data(tmp_path_factory):
    """Enough data to learn the task, and 600 test pairs to tell learning from chance (50 ± 6 % at 3 σ)."""
    return write_synth(tmp_path_factory.mktemp("data") / "learnable", {"train": 400, "val": 50, "test": 150},
                       size=64, seed=5, progress=False)


@pytest.fixture(scope="session")
def learned_early(tmp_path_factory, learnable_data):
    """tiny early trained once for the session on `learnable_data` with `LEARNS`, in one process with every core:
    test_modalities' run with both modalities, and test_distributed's one-process run. Its metrics."""
    return train_once(tmp_path_factory, "learned", learnable_data, "early", run="one", **LEARNS)[1]


def copy_run(checkpoint, models):
    """A trained run's checkpoint (and tokenizer) copied into ``models``: a test's exports and export records are then
    its own, not the session's run folder's."""
    run = models / checkpoint.parent.name
    run.mkdir(parents=True)
    shutil.copy2(checkpoint, run / checkpoint.name)
    if (checkpoint.parent / "tokenizer").exists():
        shutil.copytree(checkpoint.parent / "tokenizer", run / "tokenizer")
    return run / checkpoint.name


@pytest.fixture(scope="session")
def pt2_build(trained_mid, tmp_path_factory):
    """`fusionprof export --fmt pt2` of `trained_mid` into its run folder, started now in a process of its own and
    waited for by `pt2_export`. Compiling the package keeps one core busy for most of a minute: test_backends starts
    it before its ONNX exports, which keep the other core busy. Yields (process, file of its output)."""
    log = tmp_path_factory.mktemp("pt2-build") / "output.txt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FUSIONPROF_CACHE": str(tmp_path_factory.getbasetemp() / "cache")}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fusionprof", "export", "--checkpoint", str(trained_mid[0]),
                                 "--fmt", "pt2", "--quiet"], stdout=out, stderr=subprocess.STDOUT, env=env)
    yield proc, log
    if proc.poll() is None:  # the session ended early
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def pt2_export(pt2_build):
    """The pt2 export of `trained_mid`, run once for the session: (exit code, output). test_export checks what the
    command did and that the latency sweep reuses the package; test_backends runs the package against eager."""
    proc, log = pt2_build
    proc.wait(timeout=900)
    return proc.returncode, log.read_text()


@pytest.fixture(scope="session")
def int8_export(trained_mid, tmp_path_factory):
    """`fusionprof export` of `trained_mid` in fp32, then in int8 (which quantizes that fp32 graph), into a folder of
    their own, once for the session: (exit code and output of the int8 export, the folder). test_lowprec checks the
    QDQ graph and its gates, test_int8_openvino NNCF's IR and openvino's choice."""
    from click.testing import CliRunner

    from fusionprof.cli import cli

    out = tmp_path_factory.mktemp("int8-export")
    export = ["export", "--checkpoint", str(trained_mid[0]), "--out", str(out), "--quiet", "--precision"]
    with session_cache(tmp_path_factory):
        fp32 = CliRunner().invoke(cli, [*export, "fp32"])
        assert fp32.exit_code == 0, fp32.output
        int8 = CliRunner().invoke(cli, [*export, "int8"])  # its gate may fail: the tests check what it weighed
    return int8.exit_code, int8.output, out


@pytest.fixture(scope="session")
def untrained_onnx(tmp_path_factory, tokenizer):
    """One untrained tiny model per fusion method (seed 0), exported to ONNX once for the session: {fusion:
    Artifacts}. test_backends runs every ONNX backend on all of them, test_lowprec openvino on mid's."""
    from fusionprof.backends import Artifacts
    from fusionprof.export import export_onnx
    from fusionprof.models import build_model, fusion_names

    out = {}
    for fusion in fusion_names():
        torch.manual_seed(0)
        model = build_model(model_config("tiny", fusion=fusion, vocab_size=len(tokenizer))).eval()
        path = tmp_path_factory.mktemp(f"onnx-{fusion}") / "model.onnx"
        export_onnx(model, path)
        out[fusion] = Artifacts(model, onnx=path)
    return out


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer(model_config("tiny"))


@pytest.fixture
def tiny_cfg(tokenizer):
    def make(fusion: str, **kw):
        return model_config("tiny", fusion=fusion, vocab_size=len(tokenizer), **kw)
    return make


@pytest.fixture
def batch(tokenizer):
    """A fixed batch of 8 (images, ids, mask, labels) with padded captions."""
    g = torch.Generator().manual_seed(0)
    captions = ["a small red circle left of a large blue square", "a blue square", "a large green triangle",
                "a purple circle above a yellow square"] * 2
    enc = tokenizer(captions, padding=True, return_tensors="pt")
    images = torch.randn(8, 3, 64, 64, generator=g)
    labels = torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0])
    return images, enc["input_ids"], enc["attention_mask"], labels


def seeded(seed: int = 0):
    torch.manual_seed(seed)
    np.random.seed(seed)


THROWAWAY = "throwaway"
# A fusion file as a contributor writes one (cf. fusionprof/models/fusions/early.py), kept out of the package: the
# tests register it at run time to show that a new fusion file is picked up with no test edited.
THROWAWAY_FUSION_FILE = f'''"""Test-only fusion: pooled image ‖ mean of the real tokens → one linear layer → logit."""

import torch
from torch import nn

from fusionprof.models.layers import masked_mean
from fusionprof.models.registry import register_fusion


@register_fusion("{THROWAWAY}")
class ThrowawayFusion(nn.Module):
    pooled_image = True

    def __init__(self, cfg, image_dim: int, text_dim: int):
        super().__init__()
        self.head = nn.Linear(image_dim + text_dim, 1)

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([image_map.mean((2, 3)), masked_mean(text, text_mask)], dim=-1)).squeeze(-1)
'''


@pytest.fixture
def throwaway_fusion(tmp_path):
    """The throwaway fusion file, written under tmp_path and registered for one test, then taken out again.

    Yields the folder that holds ``throwaway_fusion.py``, for a subprocess that imports it before anything else."""
    folder = tmp_path / "extra_fusion"
    folder.mkdir()
    path = folder / "throwaway_fusion.py"
    path.write_text(THROWAWAY_FUSION_FILE)
    FUSIONS.names()  # the package's own fusions first, as on any other run
    spec = importlib.util.spec_from_file_location("throwaway_fusion", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers it, as importing the file would
    try:
        yield folder
    finally:
        del FUSIONS._members[THROWAWAY]


def write_coco_file(path, images, captions):
    """A COCO captions file: ``images`` file names, ``captions`` (image index, text) pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "images": [{"id": i, "file_name": f} for i, f in enumerate(images)],
        "annotations": [{"id": k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)],
    }))


def write_coco2017(small_data, root):
    """A COCO-2017 folder of the small set's train images (val2017 = the same files: only the layout matters)."""
    (root / "train2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    files = sorted(p.name for p in (small_data / "train").glob("*.jpg"))
    for f in files:
        shutil.copy(small_data / "train" / f, root / "train2017" / f)
        shutil.copy(small_data / "train" / f, root / "val2017" / f)
    caps = [(i, f"caption {i} {k}") for i in range(len(files)) for k in range(5)]
    write_coco_file(root / "annotations" / "captions_train2017.json", files, caps)
    write_coco_file(root / "annotations" / "captions_val2017.json", files, caps)
    return root


def stand_in_onnx(path, fails: str, image_size: int = 64):
    """A real ONNX graph with the tiny model's inputs and output (logits = the images' mean, whatever the captions)
    that onnxruntime and openvino run at batch 1 and 8 and fail at batch 64 on their own: ``fails="memory"`` fills a
    tensor of N × N⁴ × N³ zeros (64 MiB at batch 8, a pebibyte at 64), ``"reshape"`` reshapes the N logits to one
    (onnxruntime refuses it from batch 2 on). Written where ``path`` says, its folders made."""
    import onnx
    from onnx import TensorProto, helper

    batch = [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, image_size, image_size]),
             helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", "L"]),
             helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", "L"])]
    logits = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N"])]
    mean = helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0)
    if fails == "memory":
        constants = [helper.make_tensor(name, TensorProto.INT64, [1], [value])
                     for name, value in (("first", 0), ("four", 4), ("three", 3))]
        nodes = [helper.make_node("Shape", ["images"], ["shape"]),
                 helper.make_node("Gather", ["shape", "first"], ["n"], axis=0),
                 helper.make_node("Pow", ["n", "four"], ["n4"]), helper.make_node("Pow", ["n", "three"], ["n3"]),
                 helper.make_node("Concat", ["n", "n4", "n3"], ["zeros_shape"], axis=0),
                 helper.make_node("ConstantOfShape", ["zeros_shape"], ["zeros"]),
                 helper.make_node("ReduceMean", ["zeros"], ["nothing"], axes=[1, 2], keepdims=0),
                 helper.make_node("Add", ["mean", "nothing"], ["logits"])]
    else:
        constants = [helper.make_tensor("one", TensorProto.INT64, [1], [1])]
        nodes = [helper.make_node("Reshape", ["mean", "one"], ["logits"])]
    graph = helper.make_graph([mean, *nodes], f"fails-{fails}", batch, logits, constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
