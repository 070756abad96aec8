"""Training through the real CLI and the library: metrics, checkpoints, resume, evaluate, errors."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from fusionprof.cli import cli
from fusionprof.config import model_config, train_config
from fusionprof.train import load_checkpoint, train

QUICK = ["--epochs", "2", "--batch-size", "16", "--quiet"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def quick_config(tmp_path, data, **kw):
    return train_config("tiny", data=str(data), epochs=2, batch_size=16, models_dir=str(tmp_path / "models"),
                        profiles_dir=str(tmp_path / "profiles"), **kw)


@pytest.mark.parametrize("fusion", ["early", "bottleneck"])
def test_train_cli_writes_checkpoint_and_metrics(fusion, tmp_path, small_data):
    code, out = run_cli("train", "--fusion", fusion, "--data", small_data, "--out", tmp_path / "m",
                        "--profiles", tmp_path / "p", *QUICK)
    assert code == 0, out
    assert "epoch 2/2" in out and "test: accuracy" in out
    metrics = json.loads((tmp_path / "p" / f"tiny-{fusion}" / "metrics.json").read_text())
    assert metrics["fusion"] == fusion and metrics["schema_version"] == 1
    assert metrics["test"]["pairs"] == 2 * 2 * 16 and metrics["test"]["split"] == "test"
    assert 0 <= metrics["test"]["accuracy"] <= 1 and len(metrics["history"]) == 2
    assert metrics["forward_flops_per_sample"]["total"] > 1e7
    assert metrics["parameters"]["total"] > 1e6 and metrics["train_samples_per_s"] > 0
    assert metrics["peak_memory"]["host_peak_rss_mib"] > 100
    env = metrics["environment"]
    assert env["cpu_logical_cores"] >= 1 and "torch" in env["versions"] and env["host"]
    assert (tmp_path / "m" / f"tiny-{fusion}" / "checkpoint.pt").exists()
    assert list((tmp_path / "p" / "tensorboard" / f"tiny-{fusion}").glob("events.out.tfevents.*"))

    code, out = run_cli("evaluate", "--checkpoint", tmp_path / "m" / f"tiny-{fusion}" / "checkpoint.pt", "--json")
    assert code == 0, out
    assert json.loads(out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"])


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


def test_existing_run_needs_resume_or_fresh(tmp_path, small_data):
    args = ["train", "--fusion", "late", "--data", small_data, "--out", tmp_path / "m", "--profiles",
            tmp_path / "p", "--epochs", "1", "--limit-train", "8", "--quiet"]
    assert run_cli(*args)[0] == 0
    code, out = run_cli(*args)
    assert code == 1 and "pass --resume to continue it, --fresh to start over" in out
    assert run_cli(*args, "--fresh")[0] == 0
    code, out = run_cli("train", "--fusion", "mid", "--run", "tiny-late", *args[3:], "--resume")
    assert code == 1 and "is a tiny/late run, not tiny/mid" in out


@pytest.mark.parametrize("args,message", [
    (["--fusion", "fancy"], "Invalid value for '--fusion': 'fancy' is not one of"),
    (["--fusion", "mid", "--batch-size", "0"], "Invalid value for '--batch-size': must be at least 1, got 0"),
    (["--fusion", "mid", "--device", "cuda:0"], "--device cuda:0: no CUDA GPU is visible here"),
    (["--fusion", "mid", "--device", "tpu"], "--device tpu: "),
    (["--fusion", "mid", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--fusion", "mid", "--data", "/no/such/dir"], "--data /no/such/dir: no such directory"),
])
def test_user_errors_are_one_line(args, message, tmp_path):
    code, out = run_cli("train", *args, "--out", tmp_path / "m", "--profiles", tmp_path / "p", "--quiet")
    last = out.strip().splitlines()[-1]  # usage errors come after click's "Usage: / Try --help" lines
    assert code != 0 and last.startswith("Error: ") and message in last
    assert "Traceback" not in out and out.count("Error") == 1


def test_evaluate_errors(tmp_path):
    code, out = run_cli("evaluate", "--checkpoint", tmp_path / "missing.pt")
    assert code == 1 and "no such checkpoint" in out
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, out = run_cli("evaluate", "--checkpoint", tmp_path / "junk.pt")
    assert code == 1 and "not a readable fusionprof checkpoint" in out and "Traceback" not in out


def test_python_dash_m_and_help():
    for args in (["--help"], ["train", "--help"], ["data", "synth", "--help"], ["env"]):
        out = subprocess.run([sys.executable, "-m", "fusionprof", *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    assert "--freeze-encoders" in subprocess.run([sys.executable, "-m", "fusionprof", "train", "--help"],
                                                 capture_output=True, text=True, timeout=120).stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training(precision, tmp_path, small_data):
    cfg = quick_config(tmp_path, small_data, device="cuda:0", precision=precision, epochs=1)
    metrics = train(cfg, model_config("tiny", fusion="mid"), progress=False, log=lambda s: None)
    assert metrics["peak_memory"]["cuda_max_allocated_mib"] > 0
    assert metrics["environment"]["gpus"] and 0 <= metrics["test"]["accuracy"] <= 1
