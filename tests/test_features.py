"""The frozen-encoder feature cache: same logits as running the encoders, same training, rebuilt on any key change."""

import dataclasses

import pytest
import torch
from click.testing import CliRunner

from fusionprof.checkpoint import load_checkpoint
from fusionprof.cli import cli
from fusionprof.config import model_config, train_config
from fusionprof.data import prepare_data
from fusionprof.evaluate import to_inputs
from fusionprof.features import cached_features
from fusionprof.models import FusionHead, build_model, fusion_names
from fusionprof.train import train

CPU = torch.device("cpu")


def frozen_model(tiny_cfg, fusion, seed=0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(fusion, freeze_encoders=True)).eval()


@pytest.fixture(scope="module")
def test_split(small_data, tokenizer):
    cfg = model_config("tiny")
    data, _ = prepare_data(small_data, tokenizer, cfg.image_size, cfg.max_text_len, splits=("test",), progress=False)
    return data["test"]


@pytest.mark.parametrize("fusion", fusion_names())
def test_cached_features_give_the_encoders_logits(fusion, tiny_cfg, test_split, tmp_path):
    model = frozen_model(tiny_cfg, fusion)
    cache = cached_features(model, test_split, CPU, root=tmp_path, progress=False, log=lambda s: None)
    assert cache.built
    pooled = getattr(type(model.fusion), "pooled_image", False)  # the fusion says it reads only the image's mean
    assert cache.image.shape[2:] == ((1, 1) if pooled else (2, 2))  # resnet10 at 64 px: a 2×2 map
    pairs = test_split.pairs(seed=0)
    head = FusionHead(model).eval()
    with torch.inference_mode():
        for raw, cached in zip(test_split.batches(pairs, 12), cache.split(test_split).batches(pairs, 12),
                               strict=True):
            expected = model(*to_inputs(raw, CPU)[0])
            got = head(*to_inputs(cached, CPU)[0])
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_a_changed_key_rebuilds_the_cache(tiny_cfg, test_split, tmp_path):
    quiet = {"root": tmp_path, "progress": False, "log": lambda s: None}
    model = frozen_model(tiny_cfg, "mid")
    first = cached_features(model, test_split, CPU, **quiet)
    again = cached_features(model, test_split, CPU, **quiet)
    assert first.built and not again.built and again.key == first.key
    torch.testing.assert_close(torch.from_numpy(again.text), torch.from_numpy(first.text))

    keys = {first.key}
    with torch.no_grad():  # another weight, anywhere in an encoder
        model.text_encoder.bert.encoder.layer[-1].output.dense.bias[0] += 1e-3
    changed = cached_features(model, test_split, CPU, **quiet)
    assert changed.built and changed.key not in keys
    keys.add(changed.key)
    ids = test_split.text.clone()
    ids[0, 1] += 1  # another caption
    changed = cached_features(model, dataclasses.replace(test_split, text=ids), CPU, **quiet)
    assert changed.built and changed.key not in keys
    keys.add(changed.key)
    changed = cached_features(model, test_split, CPU, precision="bf16", **quiet)  # computed in another precision
    assert changed.built and changed.key not in keys
    keys.add(changed.key)
    changed = cached_features(frozen_model(tiny_cfg, "early"), test_split, CPU, **quiet)  # pooled, not the map
    assert changed.built and changed.key not in keys


@pytest.mark.slow
def test_cached_and_uncached_frozen_training_agree(tmp_path, small_data):
    """Same data order, same dropout draws: the two runs must end with the same weights and the same logits."""
    metrics, heads = {}, {}
    for cache in (False, True):
        cfg = train_config("tiny", data=str(small_data), epochs=2, batch_size=16, cache_features=cache,
                           precision="fp32", run=f"cache-{cache}", models_dir=str(tmp_path / "m"),
                           profiles_dir=str(tmp_path / "p"))
        metrics[cache] = train(cfg, model_config("tiny", fusion="mid", freeze_encoders=True), progress=False,
                               log=lambda s: None)
        heads[cache] = load_checkpoint(tmp_path / "m" / f"cache-{cache}" / "checkpoint.pt")["model"]
    assert metrics[True]["feature_cache"]["train"]["built"] and metrics[False]["feature_cache"] is None
    for name, tensor in heads[False].items():
        torch.testing.assert_close(heads[True][name], tensor, atol=1e-4, rtol=1e-3, msg=name)
    assert metrics[True]["test"]["accuracy"] == metrics[False]["test"]["accuracy"]
    assert metrics[True]["test"]["auc"] == pytest.approx(metrics[False]["test"]["auc"], abs=1e-3)
    # FLOPs a training sample costs: frozen encoders forward only, cached ones not at all; the head ×3
    for cache, encoder_factor in ((False, 1), (True, 0)):
        tf = metrics[cache]["train_flops"]
        f = tf["forward_flops"]
        head = f["total"] - f["image_encoder"] - f["text_encoder"]
        expected = 3 * head + encoder_factor * (f["image_encoder"] + f["text_encoder"])
        assert tf["gflop_per_sample"] * 1e9 == pytest.approx(expected) and tf["mfu"] is None


@pytest.mark.slow
def test_cache_features_cli(tmp_path, small_data):
    common = ["train", "--fusion", "late", "--data", str(small_data), "--epochs", "1", "--batch-size", "16",
              "--out", str(tmp_path / "m"), "--profiles", str(tmp_path / "p"), "--quiet"]
    result = CliRunner().invoke(cli, [*common, "--cache-features"])
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: --cache-features needs --freeze-encoders: trained encoders change "
                                     "their features every step")
    for fresh, built in ((False, True), (True, False)):  # the second run reads the first run's features
        result = CliRunner().invoke(cli, [*common, "--freeze-encoders", "--cache-features",
                                          *(["--fresh"] if fresh else [])])
        assert result.exit_code == 0, result.output
        assert ("feature cache: encoding the train split once" in result.output) == built
