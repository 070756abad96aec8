"""The seed preset's real loading paths, exercised with local files the tests write (no network)."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch
import torchvision
from click.testing import CliRunner
from transformers import BertConfig, BertModel

from fusionprof import hub
from fusionprof.cli import cli
from fusionprof.config import model_config
from fusionprof.data.text import build_tokenizer
from fusionprof.errors import UserError
from fusionprof.models import build_model
from fusionprof.models.encoders import TextEncoder, build_resnet


@pytest.fixture
def local_weights(tmp_path, tokenizer):
    """A torchvision state_dict file and a Hugging Face BERT folder (with its tokenizer), as a user would have."""
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    bert = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=128), add_pooling_layer=False)
    bert.save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")
    return tmp_path / "resnet18.pth", tmp_path / "bert", resnet, bert


def test_local_image_weights_and_text_model_are_loaded(local_weights):
    weights, bert_dir, resnet, bert = local_weights
    cfg = model_config("seed", fusion="mid", image_encoder="resnet18", image_weights=str(weights),
                       text_model=str(bert_dir))
    model = build_model(cfg)
    torch.testing.assert_close(model.image_encoder.trunk[0].weight, resnet.conv1.weight)
    torch.testing.assert_close(model.text_encoder.bert.embeddings.word_embeddings.weight,
                               bert.embeddings.word_embeddings.weight)
    assert (cfg.text_hidden, cfg.text_layers) == (64, 1)  # the config now describes the loaded model
    assert len(build_tokenizer(cfg)) == bert.config.vocab_size


def test_wrong_image_weights_are_a_clear_error(local_weights):
    weights = local_weights[0]
    with pytest.raises(UserError, match=r"--image-weights .*resnet18.pth: not a resnet50 state_dict"):
        build_model(model_config("seed", image_encoder="resnet50", image_weights=str(weights), text_model="config",
                                 vocab_size=100))


@pytest.mark.parametrize("content", [b"garbage\n", b"", None], ids=["garbage", "empty", "a-tensor"])
def test_unreadable_image_weights_are_one_line_not_a_traceback(tmp_path, content):
    weights = tmp_path / "weights.pth"
    if content is None:  # a readable torch file that is not a state_dict
        torch.save(torch.zeros(3), weights)
    else:
        weights.write_bytes(content)
    result = CliRunner().invoke(cli, ["train", "--fusion", "early", "--image-weights", str(weights),
                                      "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p"), "--quiet"])
    assert result.exit_code == 1 and result.exc_info[0] is SystemExit, result.exc_info
    assert f"--image-weights {weights}: not a resnet10 state_dict" in result.output


def test_seed_offline_without_weights_names_every_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    result = CliRunner().invoke(cli, ["train", "--fusion", "mid", "--preset", "seed", "--quiet",
                                      "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    for way_out in ("--image-weights FILE", "--text-model DIR", "--pretrained none"):
        assert way_out in result.output


def test_seed_image_encoder_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(UserError, match=r"ImageNet weights for resnet50 are not in .* --pretrained none"):
        build_model(model_config("seed", text_model="config", vocab_size=100))


@pytest.mark.slow
def test_seed_shape_trains_with_random_init_offline(tmp_path, small_data):
    """ResNet-50 + BERT-base at 224 px, random init, no network: the path latency sweeps use."""
    result = CliRunner().invoke(cli, [
        "train", "--fusion", "bottleneck", "--preset", "seed", "--pretrained", "none", "--data", str(small_data),
        "--epochs", "1", "--batch-size", "4", "--limit-train", "3", "--limit-eval", "2", "--quiet",
        "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "using the shipped vocabulary" in result.output
    metrics = json.loads((tmp_path / "p" / "seed-bottleneck" / "metrics.json").read_text())
    assert metrics["parameters"]["image_encoder"] == pytest.approx(23.5e6, rel=0.01)  # ResNet-50 without fc
    assert metrics["parameters"]["text_encoder"] == pytest.approx(109.5e6, rel=0.01)  # BERT-base, no pooler
    assert metrics["forward_flops_per_sample"]["image_encoder"] == pytest.approx(8.2e9, rel=0.05)


def test_an_empty_tokenizer_is_not_taken_for_a_real_one(tmp_path):
    """transformers 5 hands back a vocabulary-less tokenizer for a folder (or a cache) without its vocabulary: that
    is an error; offline, an uncached name is one before transformers is asked."""
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(UserError, match=r"cannot load the tokenizer of '.*' \(no vocabulary found"):
        build_tokenizer(model_config("seed", tokenizer=str(tmp_path)))
    with pytest.raises(UserError, match=r"the tokenizer of 'bert-base-uncased': not on this machine, and we are "
                                        r"offline; .*--pretrained none"):
        build_tokenizer(model_config("seed"))


def test_random_init_asks_the_hub_for_nothing(tmp_path):
    """A random-init seed model (latency sweeps, int8 calibration) never asks the hub for its tokenizer: on a machine
    online, with an empty cache, the hub — here a local server counting requests — sees none, and the shipped
    vocabulary stands in. (Before, offline, each of the tokenizer's files cost a minute of retries.)"""
    seen = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if "bert-base-uncased" in self.path:  # huggingface_hub's own calls (e.g. at import) are not ours
                seen.append(self.path)
            self.send_error(404)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FUSIONPROF_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HOME=str(tmp_path / "hf"))
    code = ("from fusionprof.config import model_config; from fusionprof.data.text import build_tokenizer; "
            "print(len(build_tokenizer(model_config('seed', pretrained=False))))")
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        asked, seen[:] = list(seen), []
        online = subprocess.run([sys.executable, "-c", code.replace("pretrained=False", "pretrained=True")],
                                env=env, capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert done.returncode == 0 and asked == [], (done.stderr, asked)
    assert "using the shipped vocabulary" in done.stdout and int(done.stdout.split()[-1]) == len(
        build_tokenizer(model_config("tiny")))
    assert online.returncode != 0 and seen, online.stderr  # the control: a pretrained model asks (and is refused)


def _closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reachable_tells_a_listening_host_from_a_closed_port():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert hub.reachable(f"https://127.0.0.1:{server.getsockname()[1]}/x")
    assert not hub.reachable(f"https://127.0.0.1:{_closed_port()}/x")
    assert not hub.reachable("https://no-such-host.invalid/x")


def test_pretrained_weights_out_of_reach_fail_in_one_line_at_once(tmp_path, monkeypatch):
    """Online flags off, nothing cached, the hub (HF_ENDPOINT) and torch.hub's host (through HTTPS_PROXY) refusing:
    each pretrained part is a one-line error naming the way out, before any library retries."""
    import huggingface_hub.constants

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "FUSIONPROF_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    port = _closed_port()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    unreachable = rf"not on this machine, and 127\.0\.0\.1:{port} cannot be reached; .*--pretrained none"
    with pytest.raises(UserError, match=r"the tokenizer of 'bert-base-uncased': " + unreachable):
        build_tokenizer(model_config("seed"))
    with pytest.raises(UserError, match=r"text model 'bert-base-uncased': " + unreachable):
        TextEncoder(model_config("seed"))
    with pytest.raises(UserError, match=r"ImageNet weights for resnet50: " + unreachable):
        build_resnet(model_config("seed", text_model="config"))
    # a local folder is read as it is, never probed: the tiny tokenizer loads with the hub out of reach
    assert len(build_tokenizer(model_config("tiny"))) > 100


@pytest.mark.parametrize("extra", [[], ["--preset", "seed", "--pretrained", "none"]])
def test_a_text_model_that_would_not_be_loaded_is_refused(tmp_path, extra):
    """The tiny preset and --pretrained none build their BERT from config: --text-model would only have swapped the
    tokenizer (or, for a missing folder, printed a note and trained the tiny BERT all the same)."""
    result = CliRunner().invoke(cli, ["train", "--fusion", "late", *extra, "--text-model", str(tmp_path / "bert"),
                                      "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p"), "--quiet"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"--text-model {tmp_path / 'bert'}: the encoders are random-init here" in result.output
    assert ("--pretrained none" if extra else "the tiny preset") in result.output
    assert not (tmp_path / "m").exists()
