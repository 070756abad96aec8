"""Training through the real CLI and the library: metrics, checkpoints, resume, evaluate, errors."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from conftest import NO_CUDA_64, write_coco2017

from fusionprof.atomic import write_json
from fusionprof.checkpoint import checkpoint_hash, load_checkpoint, load_model
from fusionprof.cli import cli
from fusionprof.config import model_config, train_config
from fusionprof.data import prepare_data
from fusionprof.data.text import build_tokenizer
from fusionprof.errors import UserError
from fusionprof.evaluate import to_inputs
from fusionprof.measure import datasheet_tflops
from fusionprof.metrics import describe_scores, itm_metrics
from fusionprof.models import build_model
from fusionprof.records import model_accuracy
from fusionprof.runtime import autocast
from fusionprof.train import make_optimizer, steady_samples_per_s, train, training_flops

QUICK = ["--epochs", "2", "--batch-size", "16", "--quiet"]
README = Path(__file__).resolve().parent.parent / "README.md"  # a file that is no dataset


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def correct_test_pairs(checkpoint, data) -> int:
    """The test pairs a checkpoint's model gets right (logit > 0 for a matching caption), counted one by one, in the
    precision and batches the run was tested in."""
    model, cfg = load_model(checkpoint)
    model = model.to(memory_format=torch.channels_last)
    tokenizer = build_tokenizer(model.cfg)
    splits, _ = prepare_data(data, tokenizer, model.cfg.image_size, model.cfg.max_text_len, cfg.seed,
                             splits=("test",), progress=False)
    split, cpu, correct = splits["test"], torch.device("cpu"), 0
    with torch.inference_mode(), autocast(cpu, cfg.precision):
        for batch in split.batches(split.pairs(cfg.seed), cfg.batch_size):
            inputs, labels = to_inputs(batch, cpu)
            for logit, label in zip(model(*inputs).float().tolist(), labels.tolist(), strict=True):
                correct += (logit > 0) == (label == 1)
    return correct


def quick_config(tmp_path, data, **kw):
    """Two epochs of batch 16 on ``data``; ``kw`` overrides any of it."""
    return train_config("tiny", **{"data": str(data), "epochs": 2, "batch_size": 16,
                                   "models_dir": str(tmp_path / "models"), "profiles_dir": str(tmp_path / "profiles"),
                                   **kw})


@pytest.mark.slow
@pytest.mark.parametrize("fusion,precision", [("early", "auto"), ("bottleneck", "bf16")])
def test_train_cli_writes_checkpoint_and_metrics(fusion, precision, tmp_path, small_data):
    """bf16 is asked for explicitly once, so evaluate's precision is tested on CPUs whose `auto` is fp32 too."""
    code, out = run_cli("train", "--fusion", fusion, "--data", small_data, "--out", tmp_path / "m",
                        "--profiles", tmp_path / "p", "--precision", precision, *QUICK)
    assert code == 0, out
    assert "epoch 2/2" in out and "test: accuracy" in out
    metrics = json.loads((tmp_path / "p" / f"tiny-{fusion}" / "metrics.json").read_text())
    assert metrics["fusion"] == fusion and metrics["schema_version"] == 1
    pairs = 2 * 2 * 16  # two captions per test image, a positive and a negative each
    assert metrics["test"]["pairs"] == pairs and metrics["test"]["positives"] == pairs // 2
    assert metrics["test"]["split"] == "test" and len(metrics["history"]) == 2
    ckpt = tmp_path / "m" / f"tiny-{fusion}" / "checkpoint.pt"
    assert metrics["test"]["accuracy"] == correct_test_pairs(ckpt, small_data) / pairs
    assert metrics["checkpoint"] == str(ckpt) and metrics["checkpoint_hash"] == checkpoint_hash(ckpt)  # which model
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])  # 2 epochs on 48 images: not always falling
    assert metrics["forward_flops_per_sample"]["total"] > 1e7 and metrics["parameters"]["total"] > 1e6
    assert metrics["train_samples_per_s"] == pytest.approx(2 * 2 * 2 * 48 / metrics["train_seconds"])
    tf = metrics["train_flops"]  # everything trains: 3 forwards' worth, at the batches' mean caption length
    assert 1 <= tf["seq_len"] <= 24 and tf["mfu"] is None and tf["datasheet_tflops"] is None  # no MFU on a CPU
    assert tf["gflop_per_sample"] * 1e9 == pytest.approx(3 * tf["forward_flops"]["total"])
    steady = metrics["steady_samples_per_s"]  # epoch 2 alone: epoch 1 pays for first-shape kernel plans
    assert steady == pytest.approx(2 * 2 * 48 / metrics["history"][1]["epoch_seconds"])
    assert metrics["first_epoch_seconds"] == metrics["history"][0]["epoch_seconds"]
    assert tf["achieved_tflops"] * 1e12 == pytest.approx(tf["gflop_per_sample"] * 1e9 * steady)
    assert metrics["peak_memory"]["host_peak_rss_mib"] > 100
    env = metrics["environment"]
    assert env["cpu_logical_cores"] == os.cpu_count() and env["versions"]["torch"] == version("torch")
    assert env["host"]
    assert list((tmp_path / "p" / "tensorboard" / f"tiny-{fusion}").glob("events.out.tfevents.*"))

    (tmp_path / "m").rename(tmp_path / "moved")  # a checkpoint folder carries all it needs, wherever it goes
    moved = tmp_path / "moved" / f"tiny-{fusion}" / "checkpoint.pt"
    code, out = run_cli("evaluate", "--checkpoint", moved, "--json")
    assert code == 0, out
    result = json.loads(out)  # in the precision the run was tested in: the same pairs, the same logits
    assert result["precision"] == metrics["train_config"]["precision"] == metrics["test"]["precision"]
    assert (result["accuracy"], result["auc"], result["pairs"]) == (metrics["test"]["accuracy"],
                                                                     metrics["test"]["auc"], metrics["test"]["pairs"])
    code, out = run_cli("evaluate", "--checkpoint", moved, "--precision", "fp32")
    assert code == 0 and f"{fusion} on test (64 pairs, fp32): accuracy " in out, out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, small_data):
    """Interrupted after epoch 1 and resumed == uninterrupted (CPU, same seed), bit for bit."""
    def stop_after_first(epoch):
        if epoch == 1:
            raise KeyboardInterrupt

    whole = train(quick_config(tmp_path / "a", small_data), model_config("tiny", fusion="mid"), progress=False,
                  log=lambda s: None)
    with pytest.raises(KeyboardInterrupt):
        train(quick_config(tmp_path / "b", small_data), model_config("tiny", fusion="mid"), progress=False,
              log=lambda s: None, on_epoch_end=stop_after_first)
    assert load_checkpoint(tmp_path / "b" / "models" / "tiny-mid" / "checkpoint.pt")["epoch"] == 1
    resumed = train(quick_config(tmp_path / "b", small_data), model_config("tiny", fusion="mid"), resume=True,
                    progress=False, log=lambda s: None)
    a = load_checkpoint(tmp_path / "a" / "models" / "tiny-mid" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "models" / "tiny-mid" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test"]["accuracy"] == whole["test"]["accuracy"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    # the resumed process's first epoch warmed up as the run's first did: neither is a steady epoch
    assert [h["first_in_process"] for h in whole["history"]] == [True, False]
    assert [h["first_in_process"] for h in resumed["history"]] == [True, True]
    assert whole["steady_samples_per_s"] == pytest.approx(2 * 2 * 48 / whole["history"][1]["epoch_seconds"])
    assert resumed["steady_samples_per_s"] is None


def test_steady_samples_per_s_leaves_out_every_process_first_epoch():
    """Epochs 1 and 3 each began a process (the run, then --resume): only epochs 2 and 4 are steady. A history
    written before epochs said so counts only its first as warm-up."""
    seconds = [9.0, 2.0, 7.0, 3.0]
    resumed = [{"epoch_seconds": s, "first_in_process": first}
               for s, first in zip(seconds, [True, False, True, False], strict=True)]
    assert steady_samples_per_s(resumed, pairs=100) == pytest.approx(2 * 100 / (2.0 + 3.0))
    assert steady_samples_per_s([{"epoch_seconds": s} for s in seconds], pairs=100) == pytest.approx(300 / 12.0)
    assert steady_samples_per_s([resumed[0], resumed[2]], pairs=100) is None  # every epoch warmed up


def test_a_run_name_is_one_folder_and_resume_with_fresh_is_refused(tmp_path):
    """``--run ../../etc`` would write outside --out and --profiles, ``a/b`` nest a run in another; ``--resume
    --fresh`` asks for two things. Each is one line, before anything is trained or written."""
    base = ["train", "--fusion", "late", "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet"]
    for name in ("../../etc", "a/b", "..", " "):
        code, out = run_cli(*base, "--run", name)
        assert code == 2 and "a run name is one folder name" in out and "Traceback" not in out, (name, out)
    code, out = run_cli(*base, "--resume", "--fresh")
    assert code == 2 and "--resume and --fresh contradict each other" in out
    assert not (tmp_path / "m").exists() and not (tmp_path / "p").exists()


@pytest.mark.slow
def test_existing_run_needs_resume_or_fresh(tmp_path, small_data):
    args = ["train", "--fusion", "late", "--data", small_data, "--out", tmp_path / "m", "--profiles",
            tmp_path / "p", "--epochs", "1", "--limit-train", "8", "--quiet"]
    assert run_cli(*args)[0] == 0
    code, out = run_cli(*args)
    assert code == 1 and "pass --resume to continue it, --fresh to start over" in out
    assert run_cli(*args, "--fresh")[0] == 0
    code, out = run_cli("train", "--fusion", "mid", "--run", "tiny-late", *args[3:], "--resume")
    assert code == 1 and "is a tiny/late run, not tiny/mid" in out


@pytest.mark.slow
def test_resume_refuses_a_setting_it_would_otherwise_drop(tmp_path, small_data, monkeypatch):
    """--resume continues the run as it was started: an option that would change what it trains is a one-line error
    naming it, never silently ignored; the same command resumes, and how the run is carried out may change."""
    args = ["train", "--fusion", "late", "--data", small_data, "--out", tmp_path / "m", "--profiles",
            tmp_path / "p", "--epochs", "1", "--limit-train", "8", "--quiet"]
    assert run_cli(*args)[0] == 0
    code, out = run_cli(*args, "--resume", "--epochs", "2", "--lr", "0.01", "--text-pool", "attn")
    assert code == 1 and out.count("\n") == 1, out
    assert ("--resume continues tiny-late as it was started, and these differ from it: --epochs 2 (the run's: 1); "
            "--lr 0.01 (the run's: 0.001); --text-pool attn (the run's: mean). Leave them out, or start over") in out
    assert load_checkpoint(tmp_path / "m" / "tiny-late" / "checkpoint.pt")["train_config"]["epochs"] == 1
    run_precision = load_checkpoint(tmp_path / "m" / "tiny-late" / "checkpoint.pt")["train_config"]["precision"]
    other = "fp32" if run_precision == "bf16" else "bf16"
    code, out = run_cli(*args, "--resume", "--precision", other)  # what was typed is what the message says
    assert code == 1 and f"--precision {other} (the run's: {run_precision})" in out, out
    code, out = run_cli(*args, "--resume", "--precision", "auto")  # auto resolves as it did when the run started
    assert code == 0 and "resuming tiny-late after epoch 1/1\n" in out, out
    monkeypatch.chdir(small_data.parent)  # the same dataset spelt another way is the same dataset
    code, out = run_cli(*args[:3], "--data", small_data.name, *args[5:], "--resume", "--no-image-cache",
                        "--run-name", "tiny-late", "--out", os.path.relpath(tmp_path / "m"))
    assert code == 0 and "resuming tiny-late after epoch 1/1 (now --image-cache False)" in out, out
    metrics = json.loads((tmp_path / "p" / "tiny-late" / "metrics.json").read_text())
    assert metrics["train_config"]["image_cache"] is False


@pytest.mark.slow
def test_a_run_is_evaluated_on_the_splits_it_was_trained_on(tmp_path, small_data):
    """The run records its dataset's layout; when the folder later gains Karpathy's file (which is looked for first,
    and whose test images COCO 2017 spreads over train2017), evaluation still reads the 2017 test split."""
    root = write_coco2017(small_data, tmp_path / "coco")
    code, out = run_cli("train", "--fusion", "early", "--data", root, "--out", tmp_path / "m", "--profiles",
                        tmp_path / "p", "--epochs", "1", "--limit-train", "8", "--batch-size", "16", "--quiet")
    assert code == 0, out
    metrics = json.loads((tmp_path / "p" / "tiny-early" / "metrics.json").read_text())
    assert metrics["train_config"]["data_layout"] == "coco2017" and metrics["data"].endswith("(coco2017)")
    assert metrics["test"]["pairs"] == 480  # val2017: 48 images, 5 captions each, a negative for each
    files = sorted((root / "val2017").glob("*.jpg"))[:4]
    (root / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "val2017", "filename": f.name, "split": s, "cocoid": i, "sentences": [{"raw": f"a caption {i}"}]}
        for i, (f, s) in enumerate(zip(files, ["train", "val", "test", "test"], strict=True))]}))
    checkpoint = tmp_path / "m" / "tiny-early" / "checkpoint.pt"
    for data in ([], ["--data", root]):
        code, out = run_cli("evaluate", "--checkpoint", checkpoint, *data)
        assert code == 0 and "early on test (480 pairs, " in out and f"{metrics['test']['accuracy']:.2%}" in out, out
    code, out = run_cli("evaluate", "--checkpoint", checkpoint, "--data", root / "dataset_coco.json")
    assert code == 0 and "early on test (4 pairs, " in out, out  # another dataset: its own layout


@pytest.mark.parametrize("args,message", [
    (["--fusion", "fancy"], "Invalid value for '--fusion': 'fancy' is not one of"),
    (["--fusion", "mid", "--batch-size", "0"], "Invalid value for '--batch-size': must be at least 1, got 0"),
    (["--fusion", "mid", "--lr", "0"], "Invalid value for '--lr': must be above 0, got 0.0"),
    (["--fusion", "mid", "--encoder-lr", "inf"], "Invalid value for '--encoder-lr': must be a finite number, got inf"),
    (["--fusion", "mid", "--device", "cuda:64"], NO_CUDA_64),
    (["--fusion", "mid", "--device", "tpu"], "--device tpu: "),
    (["--fusion", "mid", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--fusion", "mid", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
    (["--fusion", "mid", "--data", README], f"--data {README}: a file, not a dataset; give the COCO folder (the one "
     "that holds dataset_coco.json, annotations/captions_{train,val,test}.json or "
     "annotations/captions_{train,val}2017.json) or Karpathy's dataset_coco.json itself"),
    (["--fusion", "mid", "--compile", "fast"], "Invalid value for '--compile': 'fast' is not one of"),
    (["--fusion", "mid", "--compile", "cudagraphs"], "--compile cudagraphs needs a CUDA device (--device cuda:N)"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    code, out = run_cli("train", *args, "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet")
    last = out.strip().splitlines()[-1]  # usage errors come after click's "Usage: / Try --help" lines
    assert code != 0 and last.startswith("Error: ") and message in last
    assert "Traceback" not in out and out.count("Error") == 1


@pytest.mark.parametrize("args,message", [
    (["train", "--fusion", "mid", "--workers", "-1"], "'--workers': -1 is not in the range x>=0."),
    (["train", "--fusion", "mid", "--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295."),
    (["train", "--fusion", "mid", "--seed", str(2**32)], "'--seed': 4294967296 is not in the range 0<=x<=4294967295."),
    (["data", "synth", "--seed", "-1"], "'--seed': -1 is not in the range 0<=x<=4294967295."),
])
def test_negative_counts_and_seeds_are_usage_errors(args, message, tmp_path):
    """Refused by click before anything runs (they were numpy's and the DataLoader's tracebacks): exit 2, usage."""
    code, out = run_cli(*args, "--out", tmp_path / "out")
    assert code == 2 and out.startswith("Usage: ") and "--help' for help." in out, out
    assert out.strip().splitlines()[-1] == f"Error: Invalid value for {message}", out
    assert "Traceback" not in out and not (tmp_path / "out").exists()


def test_an_epochs_short_last_accumulation_group_steps_with_its_mean_gradient():
    """5 micro-batches with --grad-accum 2: the third step has one micro-batch, and its gradient is that batch's, not
    half of it (the loss was divided by --grad-accum whatever the group held)."""
    from fusionprof.train import Optimization, accumulation_group, train_step

    assert [accumulation_group(i, 5, 2) for i in range(5)] == [2, 2, 2, 2, 1]
    assert [accumulation_group(i, 6, 4) for i in range(6)] == [4, 4, 4, 4, 2, 2]
    mcfg = model_config("tiny", fusion="late")
    mcfg.vocab_size = 1000
    torch.manual_seed(0)
    model = build_model(mcfg)
    inputs = (torch.rand(4, 3, 64, 64), torch.randint(0, 1000, (4, 12)), torch.ones(4, 12, dtype=torch.long))
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0])

    def gradient(grad_accum, group):
        cfg = train_config("tiny", grad_accum=grad_accum, align_weight=0.0, precision="fp32")
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks each time
        train_step(model, Optimization.create(model, cfg, torch.device("cpu"), 10), inputs, labels, cfg,
                   step_optimizer=False, group=group)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    alone = gradient(1, None)
    torch.testing.assert_close(gradient(2, 1), alone)  # a group of one: its own gradient
    torch.testing.assert_close(gradient(2, None), alone / 2)  # a full group's first half


def test_optimizer_groups_are_fused_and_skip_frozen_encoders():
    """Encoders at encoder_lr, head at lr, no decay on biases / norms, frozen encoders left out; fused AdamW."""
    cfg = train_config("tiny", lr=1e-3, encoder_lr=1e-4)
    for freeze in (False, True):
        mcfg = model_config("tiny", fusion="late", freeze_encoders=freeze)
        mcfg.vocab_size = 1000
        model = build_model(mcfg)
        optimizer = make_optimizer(model, cfg)
        groups = optimizer.param_groups
        assert all(g["fused"] for g in groups) and len(groups) == (2 if freeze else 6)
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
        kinds = {(g["lr"], g["weight_decay"] > 0, p.ndim >= 2) for g in groups for p in g["params"]}
        head = {(1e-3, True, True), (1e-3, False, False)}
        assert kinds == (head if freeze else head | {(1e-4, True, True), (1e-4, False, False)})


def test_mfu_needs_a_known_gpu_and_a_tensor_core_precision():
    assert datasheet_tflops("NVIDIA H200", "bf16") == datasheet_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.4
    assert datasheet_tflops("NVIDIA H200", "fp32") is None and datasheet_tflops("Some GPU", "bf16") is None


def test_mfu_under_ddp_divides_each_process_share_by_one_gpu_peak(monkeypatch):
    """samples/s is the whole run's: against one GPU's peak it would count every GPU's work as one GPU's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA H200")
    model = build_model(model_config("tiny", fusion="late", vocab_size=len(build_tokenizer(model_config("tiny")))))
    cfg = train_config("tiny", precision="bf16")
    one, two = (training_flops(model, cfg, 8, 1000.0, torch.device("cuda"), world_size=n) for n in (1, 2))
    assert one["achieved_tflops"] == two["achieved_tflops"] == 2 * two["achieved_tflops_per_process"]
    assert two["datasheet_tflops"] == 989.4
    assert two["mfu"] == pytest.approx(two["achieved_tflops"] / (2 * 989.4)) and one["mfu"] == 2 * two["mfu"]


def test_compile_scopes_and_the_flag_old_checkpoints_stored():
    assert train_config("tiny").compile == "off"
    assert [train_config("tiny", compile=flag).compile for flag in (True, False)] == ["model", "off"]
    with pytest.raises(UserError, match="--compile fast: choose from off, model, regions, cudagraphs"):
        train_config("tiny", compile="fast")


@pytest.mark.slow
def test_train_compiled_by_regions(tmp_path, small_data):
    """The repeated blocks run compiled in the timed epochs (inductor on the CPU: about a minute here)."""
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    code, out = run_cli("train", "--fusion", "early", "--data", small_data, "--compile", "regions", "--epochs", "1",
                        "--batch-size", "16", "--quiet", "--out", tmp_path / "m", "--profiles", tmp_path / "p")
    assert code == 0, out
    assert "compiling 6 repeated blocks (regional compilation)" in out and "test: accuracy" in out
    assert counters["stats"]["unique_graphs"] > graphs  # Dynamo did compile them
    metrics = json.loads((tmp_path / "p" / "tiny-early" / "metrics.json").read_text())
    assert metrics["train_config"]["compile"] == "regions" and metrics["test"]["pairs"] == 64
    assert metrics["test"]["accuracy"] * 64 == round(metrics["test"]["accuracy"] * 64)  # a count of pairs
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])


def test_evaluate_errors(tmp_path):
    code, out = run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt")
    assert code == 1 and "no such checkpoint" in out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, out = run_cli("evaluate", "--checkpoint", tmp_path / "junk.pt")
    assert code == 1 and "not a readable fusionprof checkpoint" in out and "Traceback" not in out


def test_a_run_given_a_relative_data_path_is_read_back_from_any_folder(tmp_path, small_data, monkeypatch):
    """--data was recorded as typed: a run trained with '--data small' could not be evaluated (nor exported, nor put
    under load) from another folder, or read another folder's 'small' there."""
    shutil.copytree(small_data, tmp_path / "project" / "small")
    monkeypatch.chdir(tmp_path / "project")
    code, out = run_cli("train", "--fusion", "early", "--data", "small", "--epochs", "1", "--limit-train", "4",
                        "--limit-eval", "4", "--quiet")
    assert code == 0, out
    checkpoint = tmp_path / "project" / "models" / "tiny-early" / "checkpoint.pt"
    assert load_checkpoint(checkpoint)["train_config"]["data"] == str(tmp_path / "project" / "small")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out = run_cli("evaluate", "--checkpoint", checkpoint)
    assert code == 0 and "early on test (16 pairs" in out, out


@pytest.mark.slow
def test_a_run_without_its_tokenizer_is_refused(trained_mid, tmp_path):
    """The shipped vocabulary never stands in for a run's own (it once did: 56 % became 50.5 %, exit 0): a run
    folder without its tokenizer/, or with an empty one, is a one-line error naming it, in evaluate and export."""
    run = tmp_path / "tiny-mid"
    run.mkdir()
    shutil.copy(trained_mid[0], run / "checkpoint.pt")
    for command, problem in ((["evaluate"], "no such folder"), (["export", "--quiet"], "no such folder"),
                             (["evaluate"], "holds no tokenizer.json or vocab.txt")):
        if problem.startswith("holds"):
            (run / "tokenizer").mkdir()
        code, out = run_cli(*command, "--checkpoint", run / "checkpoint.pt")
        assert code == 1 and out.count("\n") == 1 and "Traceback" not in out, out
        assert out.startswith(f"Error: {run / 'tokenizer'}: {problem}; the run was trained with the tokenizer "), out
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(trained_mid[0].parent / "tokenizer", run / "tokenizer")  # the folder back: the run's accuracy
    code, out = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--json")
    assert code == 0 and json.loads(out)["accuracy"] == trained_mid[1]["test"]["accuracy"], out


def test_non_finite_logits_have_no_accuracy_or_auc():
    """All-NaN logits once scored 0.5 on both (NaN > 0 is false for every pair, and NaNs all tie): chance, not a
    failure. Any NaN or ±inf now leaves both undefined, counted."""
    labels = np.array([1, 0] * 4, dtype=np.float32)
    for logits, count in ((np.full(8, np.nan, np.float32), 8), (np.array([2, -1, np.inf, -3, 1, -2, 3, -1.5]), 1)):
        metrics = itm_metrics(logits, labels, "test")
        assert (metrics["accuracy"], metrics["auc"], metrics["non_finite"]) == (None, None, count)
        assert metrics["invalid"] == f"{count} of 8 logits are not finite (NaN or ±inf)"
        assert describe_scores(metrics) == f"accuracy –  auc –  ({metrics['invalid']})"
    finite = itm_metrics(np.array([2, -1, 0.5, -3, 1, -2, 3, 1.5]), labels, "test")
    assert (finite["accuracy"], finite["auc"], finite["non_finite"]) == (7 / 8, 14 / 16, 0) and "invalid" not in finite


@pytest.mark.slow
def test_a_model_that_answers_nan_fails_evaluate_and_export(trained_mid, tmp_path):
    """A checkpoint whose weights hold a NaN (as a diverged step leaves them): evaluate and export fail in one line
    each, and the records they write carry the count with no accuracy, never a chance-level 50 %."""
    run = tmp_path / "tiny-mid"
    shutil.copytree(trained_mid[0].parent / "tokenizer", run / "tokenizer")
    ckpt = load_checkpoint(trained_mid[0])
    ckpt["model"]["fusion.head.4.bias"].fill_(float("nan"))
    torch.save(ckpt, run / "checkpoint.pt")
    code, out = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt")
    precision = ckpt["train_config"]["precision"]
    assert code == 1 and out.count("\n") == 1 and "Traceback" not in out, out
    assert out == (f"Error: {run / 'checkpoint.pt'}: 64 of 64 logits are not finite (NaN or ±inf) on the test split "
                   f"in {precision}, so it has no accuracy or AUC: the weights diverged, or the precision overflows\n")
    code, out = run_cli("evaluate", "--checkpoint", run / "checkpoint.pt", "--json")
    result = json.loads(out[:out.index("\nError: ")])  # the record first, for a script; then the failure
    assert code == 1 and (result["accuracy"], result["auc"], result["non_finite"]) == (None, None, 64), out
    code, out = run_cli("export", "--checkpoint", run / "checkpoint.pt", "--quiet")
    assert code == 1 and "test accuracy (64 pairs): checkpoint –, exported –  (checkpoint: 64 of 64 logits " in out
    gate = json.loads((run / "export.json").read_text())["accuracy"]
    assert (gate["passed"], gate["abs_difference"], gate["checkpoint_non_finite"]) == (False, None, 64), gate


@pytest.mark.slow
def test_a_diverged_run_fails_and_its_record_has_no_accuracy(tmp_path, small_data):
    """A learning rate of 1e30 drives the weights to NaN within the epoch: the run still writes its checkpoint and
    metrics.json (with the count, accuracy null), then exits 1; the report shows – and says why, and no accuracy
    of it is on record for a latency sweep or a recommendation to use."""
    code, out = run_cli("train", "--fusion", "late", "--data", small_data, "--out", tmp_path / "m", "--profiles",
                        tmp_path / "p", "--epochs", "1", "--batch-size", "16", "--lr", "1e30", "--encoder-lr", "1e30",
                        "--warmup-steps", "0", "--quiet")
    metrics = json.loads((tmp_path / "p" / "tiny-late" / "metrics.json").read_text())
    precision = metrics["train_config"]["precision"]
    assert code == 1 and "epoch 1/1  loss nan  val acc –  auc –  (64 non-finite logits)  " in out, out
    assert out.endswith(f"Error: tiny-late: 64 of 64 logits are not finite (NaN or ±inf) on the test split, so it "
                        f"has no accuracy or AUC (metrics.json says null): the run diverged, or {precision} "
                        "overflows\n"), out
    assert (metrics["test"]["accuracy"], metrics["test"]["auc"], metrics["test"]["non_finite"]) == (None, None, 64)
    assert metrics["val"] == {"accuracy": None, "auc": None, "non_finite": 64}
    assert model_accuracy([metrics], [], metrics["checkpoint"], precision, "torch") is None
    code, out = run_cli("report", tmp_path / "p", "--out", tmp_path / "report")
    assert code == 0, out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| – | – | 64 |" in md and "No test accuracy or AUC (–) where the model's logits were not finite" in md


def test_python_dash_m_and_help():
    """python -m fusionprof runs a command and prints help (two fresh interpreters); the other help pages in-process."""
    for args, expected in ((["train", "--help"], "--freeze-encoders"), (["env"], "torch")):
        out = subprocess.run([sys.executable, "-m", "fusionprof", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and expected in out.stdout, out.stderr
    for args in (["--help"], ["data", "synth", "--help"]):
        code, out = run_cli(*args)
        assert code == 0 and out.startswith("Usage: "), out


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training(precision, tmp_path, small_data):
    cfg = quick_config(tmp_path, small_data, device="cuda:0", precision=precision, epochs=1, profile=True)
    metrics = train(cfg, model_config("tiny", fusion="mid"), progress=False, log=lambda s: None)
    assert metrics["peak_memory"]["cuda_max_allocated_mib"] > 0
    assert metrics["environment"]["gpus"] and metrics["test"]["pairs"] == 64
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert metrics["train_config"]["precision"] == precision
    # the profiled step's GPU work, backward's (launched from autograd's thread) included
    step, parts = metrics["step_profile"], metrics["step_breakdown"]
    assert 0 < step["gpu_busy_ms"] <= step["step_ms"]
    assert parts["backward"]["gpu_ms_per_step"] > 0 and parts["image_encoder"]["gpu_ms_per_step"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_training_with_cuda_graphs(tmp_path, small_data):
    """--compile cudagraphs trains through CUDA graphs: inductor skipped none of them (it falls back to launching
    the kernels one by one, with only a log line, on inputs it cannot graph: mutated, CPU, dynamic...)."""
    from torch._dynamo.utils import counters

    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    cfg = quick_config(tmp_path, small_data, device="cuda:0", precision="bf16", compile="cudagraphs")
    metrics = train(cfg, model_config("tiny", fusion="early"), progress=False, log=lambda s: None)
    assert counters["stats"]["unique_graphs"] > graphs and counters["inductor"]["cudagraph_skips"] == skips
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    assert metrics["test"]["pairs"] == 64 and metrics["test"]["positives"] == 32


@pytest.mark.slow
def test_sigkilled_run_resumes(tmp_path, small_data):
    """A real kill (SIGKILL, no clean-up) inside an epoch before the last: --resume picks the run up and finishes it.

    An epoch is 24 steps of 8 pairs (seconds on a CPU); the kill goes out within milliseconds of epoch 1's
    checkpoint appearing, so it lands early in epoch 2."""
    args = [sys.executable, "-m", "fusionprof", "train", "--fusion", "early", "--data", str(small_data),
            "--epochs", "3", "--batch-size", "8", "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p"),
            "--quiet"]
    ckpt = tmp_path / "m" / "tiny-early" / "checkpoint.pt"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished or failed
    done = load_checkpoint(ckpt)["epoch"]  # the atomic write left a whole checkpoint behind
    assert 1 <= done < 3, done  # killed inside an epoch: one is left for --resume at the least
    result = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming tiny-early after epoch {done}/3" in result.stdout
    final = load_checkpoint(ckpt)
    assert final["epoch"] == 3 and [h["epoch"] for h in final["history"]] == [1, 2, 3]
    assert re.findall(r"^epoch (\d)/3 ", result.stdout, re.M) == [str(e) for e in range(done + 1, 4)]  # the rest
    assert not list(ckpt.parent.glob(".*.tmp"))  # no temporary files left to confuse anyone


def test_atomic_writes_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    """An OS crash (not only a killed process) must leave the old file or the whole new one."""
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: events.append("replace") or replace(*a))
    write_json(tmp_path / "record.json", {"a": 1})
    assert events == (["fsync", "replace", "fsync"] if os.name == "posix" else ["fsync", "replace"])
    assert json.loads((tmp_path / "record.json").read_text()) == {"a": 1} and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_grad_accum_and_bf16_on_cpu(tmp_path, small_data):
    code, out = run_cli("train", "--fusion", "late", "--data", small_data, "--epochs", "1", "--batch-size", "8",
                        "--grad-accum", "3", "--precision", "bf16", "--out", tmp_path / "m", "--profiles",
                        tmp_path / "p", "--quiet")
    assert code == 0, out
    ckpt = load_checkpoint(tmp_path / "m" / "tiny-late" / "checkpoint.pt")
    batches = 2 * 2 * 48 // 8  # two captions per image, a positive and a negative each
    assert ckpt["scheduler"]["last_epoch"] == -(-batches // 3)  # optimizer steps: ceil(batches / accum)
    assert ckpt["train_config"]["precision"] == "bf16"


def test_data_synth_and_env_commands(tmp_path):
    code, out = run_cli("data", "synth", "--out", tmp_path / "d", "--train", 5, "--val", 2, "--test", 3, "--size", 40)
    assert code == 0 and "5/2/3 images" in out
    ann = json.loads((tmp_path / "d" / "annotations" / "captions_test.json").read_text())
    assert len(ann["images"]) == 3 and len(ann["annotations"]) == 6
    code, out = run_cli("env", "--json")
    fp = json.loads(out)
    assert code == 0 and fp["cpu_logical_cores"] == os.cpu_count()
    assert fp["ram_gib"] == pytest.approx(psutil.virtual_memory().total / 2**30, abs=0.01)
    assert fp["versions"]["torch"] == version("torch")


@pytest.mark.parametrize("size", [2, 100_000])
def test_data_synth_refuses_an_impossible_image_size(tmp_path, size):
    """2 px cannot hold two shapes apart (the scene drawer looped for ever); 100000 px ran out of memory (killed)."""
    code, out = run_cli("data", "synth", "--out", tmp_path / "d", "--train", 2, "--val", 2, "--test", 2, "--size", size)
    assert code == 2 and "Invalid value for '--size'" in out and "16<=x<=1024" in out, out
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("args", [("train", "--fusion", "early", "--limit-train", 1),
                                  ("train", "--fusion", "early", "--limit-eval", 1),
                                  ("data", "synth", "--train", 5, "--val", 1, "--test", 3)])
def test_one_image_split_is_a_usage_error(tmp_path, args):
    """A split of one image has no negative: train blamed the dataset ('has 1 usable image(s) ... e.g. no files
    listed'), and data synth wrote a set no command could read."""
    code, out = run_cli(*args, "--out", tmp_path / "m")
    assert code == 2 and "is not in the range x>=2" in out, out
    assert not (tmp_path / "m").exists()


def test_data_synth_into_a_folder_with_another_dataset_is_refused(tmp_path):
    """A finished dataset of other counts is not passed off as the one asked for (it said '9/2/3 images' over 5)."""
    synth = ("data", "synth", "--out", tmp_path / "d", "--val", 2, "--test", 3, "--size", 16)
    assert run_cli(*synth, "--train", 5)[0] == 0
    code, out = run_cli(*synth, "--train", 9)
    assert code == 1 and "already holds an embedded dataset of other counts" in out, out
    assert len(out.strip().splitlines()) == 1
    code, out = run_cli(*synth, "--train", 5)
    assert code == 0 and "5/2/3 images" in out  # the same dataset again: kept as it is


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16": True}, "bf16"), ({"amx_bf16": True}, "bf16"),
                                             ({"avx512_bf16": False, "amx_bf16": False}, "fp32"), ({}, "fp32")])
def test_auto_precision_follows_the_cpu(flags, expected, monkeypatch):
    from fusionprof.runtime import resolve_precision

    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: flags)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice is kept


@pytest.mark.slow
def test_records_name_the_precision_auto_chose(tmp_path, small_data):
    from fusionprof.runtime import resolve_precision

    metrics = train(quick_config(tmp_path, small_data), model_config("tiny", fusion="early"),
                    progress=False, log=lambda s: None)
    chosen = resolve_precision("auto", torch.device("cpu"))
    assert metrics["train_config"]["precision"] == chosen
    assert load_checkpoint(tmp_path / "models" / "tiny-early" / "checkpoint.pt")["train_config"]["precision"] == chosen
