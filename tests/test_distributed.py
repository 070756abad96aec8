"""Data-parallel training through the real torchrun: 2 CPU processes over gloo, against one process."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner
from conftest import LEARNS
from torch.distributed.run import get_args_parser
from torch.utils.data import DistributedSampler

import fusionprof.evaluate
from fusionprof import contention
from fusionprof.checkpoint import load_checkpoint
from fusionprof.cli import cli
from fusionprof.data import prepare_data
from fusionprof.data.itm import PairBatches, make_pairs
from fusionprof.distributed import SINGLE, Dist
from fusionprof.models import build_model

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def fusionprof_train(*args, launcher=(sys.executable,), **kw):
    return [*launcher, "-m", "fusionprof", "train", *map(str, args)]


class _Images:
    def get(self, index):
        return np.zeros((len(index), 2, 2, 3), np.uint8)


def test_ranks_split_each_global_batch_exactly():
    """Rank r takes batch i when i % 2 == r: together they see every pair once, and global batch k is the
    one-process batch k (the last, uneven batch is padded by the sampler so both ranks step equally)."""
    caption_image = np.repeat(np.arange(50), 2)
    pairs = make_pairs(caption_image, np.random.default_rng(0))
    order = np.random.default_rng(1).permutation(len(pairs))
    ids = torch.arange(len(caption_image))[:, None].repeat(1, 3)  # column 0 names the caption
    mask = torch.ones(len(caption_image), 3, dtype=torch.int64)
    whole = PairBatches(_Images(), ids, mask, pairs, 16, order)
    half = PairBatches(_Images(), ids, mask, pairs, 8, order)
    shards = [list(DistributedSampler(half, 2, rank, shuffle=False)) for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for k in range(len(whole) - 1):
        together = torch.cat([half[shards[0][k]].text[:, 0], half[shards[1][k]].text[:, 0]])
        assert torch.equal(together, whole[k].text[:, 0])
    seen = np.concatenate([half[i].text[:, 0].numpy() for i in range(len(half))])
    assert sorted(seen) == sorted(pairs.caption)


def test_every_train_option_passes_through_torchrun():
    """torchrun's parser takes abbreviations of its own flags (--run → --run-path) from the script's arguments."""
    for param in cli.commands["train"].params:
        option = param.opts[0]
        if option.startswith("--"):
            parsed = get_args_parser().parse_args(["--nproc-per-node", "2", "-m", "fusionprof", "train", option, "1"])
            assert parsed.training_script_args == ["train", option, "1"], option


def test_only_train_runs_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["latency"])
    assert result.exit_code == 1
    assert "'latency' runs in one process; only 'train' runs under torchrun" in result.output


def test_a_rank_without_evaluation_batches_still_joins_the_gather(monkeypatch, small_data, tiny_cfg, tokenizer):
    """A split of one global batch under 2 processes: rank 1's shard is empty, yet both ranks return the
    one-process metrics (the gather is simulated in process: each rank's part as it hands it over)."""
    model = build_model(tiny_cfg("early"))
    split = prepare_data(small_data, tokenizer, model.cfg.image_size, model.cfg.max_text_len, splits=("val",),
                         limit_eval=4, progress=False)[0]["val"]
    batch_size = len(split.pairs(0).caption)  # the whole split is one batch
    parts = {}

    def gather(d, obj):
        parts[d.rank] = obj
        return [parts.get(rank, obj) for rank in range(d.world_size)]

    monkeypatch.setattr(fusionprof.evaluate, "all_gather_objects", gather)
    alone = fusionprof.evaluate.evaluate_split(model, split, 0, batch_size, torch.device("cpu"), d=SINGLE)
    ranks = {rank: fusionprof.evaluate.evaluate_split(model, split, 0, batch_size, torch.device("cpu"),
                                                      d=Dist(rank, 2))
             for rank in (0, 1, 0)}  # rank 0 again, now that rank 1's part is in
    assert len(parts[1][0]) == len(parts[1][1]) == 0
    assert ranks[0] == ranks[1] == alone and alone["pairs"] == batch_size


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, learnable_data, learned_early):
    """torchrun's two processes (one thread each, as torchrun sets) against the session's one-process run of the same
    settings on the same data (conftest's LEARNS, `learned_early`, every core)."""
    settings = ["--fusion", "early", *(a for k, v in LEARNS.items() for a in (f"--{k.replace('_', '-')}", v))]
    two = subprocess.run(fusionprof_train(*settings, "--data", learnable_data, "--run-name", "two", "--out",
                                          tmp_path / "models", "--profiles", tmp_path / "profiles", "--quiet",
                                          launcher=TORCHRUN), env=ENV, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and two.stdout.count("test: accuracy") == 1  # rank 0 speaks
    assert "2 processes (gloo) × 16 = global batch 32" in two.stdout

    runs = {"one": learned_early,
            "two": json.loads((tmp_path / "profiles" / "two" / "metrics.json").read_text())}
    assert [p.parent.name for p in (tmp_path / "profiles").rglob("metrics.json")] == ["two"]
    assert len(list((tmp_path / "profiles" / "tensorboard" / "two").glob("events.*"))) == 1
    assert sorted(p.name for p in (tmp_path / "models" / "two").iterdir()) == ["checkpoint.pt", "tokenizer"]
    assert runs["two"]["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 16}
    assert runs["one"]["distributed"]["world_size"] == 1
    # each rank spins a core: the other rank is torchrun's child like this one, counted as the run's, no neighbour
    assert runs["two"]["contention"]["other_processes_cores"] < contention.BUSY_CORES
    flops = runs["two"]["train_flops"]  # the run's rate is both processes'; each process did half of it
    assert flops["achieved_tflops_per_process"] == pytest.approx(flops["achieved_tflops"] / 2)
    assert runs["one"]["train_config"]["warmup_steps"] == runs["two"]["train_config"]["warmup_steps"] == 20
    # Evaluation was sharded over the ranks and gathered: every test pair counted once.
    assert runs["two"]["test"]["pairs"] == runs["one"]["test"]["pairs"] == 600
    # Same global batches, same schedule: the two runs learn alike (one process reached 81.7 % here, two 79.3 %).
    assert runs["one"]["test"]["accuracy"] > 0.75
    assert abs(runs["two"]["test"]["accuracy"] - runs["one"]["test"]["accuracy"]) < 0.06
    ckpt = load_checkpoint(tmp_path / "models" / "two" / "checkpoint.pt")
    assert ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2 and ckpt["scheduler"]["last_epoch"] == 3 * 1600 // 32


@pytest.mark.slow
def test_killed_two_process_run_resumes(tmp_path, small_data):
    """SIGKILL torchrun and both workers after the first checkpoint; the same command with --resume finishes."""
    args = fusionprof_train("--fusion", "late", "--data", small_data, "--epochs", "3", "--batch-size", "8",
                            "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet", launcher=TORCHRUN)
    ckpt = tmp_path / "m" / "tiny-late" / "checkpoint.pt"
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # As if the machine died: torchrun and its workers (which run in sessions of their own) all at once.
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for member in family:
        member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    done = load_checkpoint(ckpt)["epoch"]
    assert 1 <= done < 3  # an epoch here takes seconds; the kill came within a tenth of one
    result = subprocess.run([*args, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming tiny-late after epoch {done}/3" in result.stdout
    final = load_checkpoint(ckpt)
    assert final["epoch"] == 3 and len(final["history"]) == 3 and final["world_size"] == 2
    assert json.loads((tmp_path / "p" / "tiny-late" / "metrics.json").read_text())["epochs"] == 3


def test_errors_beyond_rank_0_name_their_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = CliRunner().invoke(cli, ["train", "--fusion", "late", "--cache-features"])  # refused before any setup
    assert result.exit_code == 1
    assert result.output.startswith("Error: [rank 1] --cache-features needs --freeze-encoders")
