"""Every registered fusion method, tested for free (timm-style parametrisation over the registry)."""

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from conftest import THROWAWAY
from torch import nn

from fusionprof.cli import cli  # imported before any test registers a fusion, as on the command line
from fusionprof.errors import UserError
from fusionprof.models import build_model, count_parameters, forward_flops, fusion_names, repeated_blocks
from fusionprof.models.layers import POOLS, make_pool, masked_mean
from fusionprof.models.model import example_inputs
from fusionprof.models.registry import FUSIONS as REGISTRY

FUSIONS = fusion_names()  # at collection: a new fusion file is parametrised into every test below


def test_each_fusion_file_registers_its_method():
    """Whatever the package holds: every module in fusions/ registers an nn.Module under the name it is listed by."""
    package = importlib.import_module("fusionprof.models.fusions")
    files = {f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)}
    assert sorted(FUSIONS) == FUSIONS and files
    classes = {name: REGISTRY.get(name) for name in FUSIONS}
    assert {cls.__module__ for cls in classes.values()} == files
    for name, cls in classes.items():
        assert issubclass(cls, nn.Module) and cls.registered_name == name


def test_a_fusion_registered_at_run_time_is_listed_and_built(throwaway_fusion, tiny_cfg, batch):
    assert THROWAWAY in fusion_names() and set(FUSIONS) < set(fusion_names())
    model = build_model(tiny_cfg(THROWAWAY)).eval()
    assert type(model.fusion).registered_name == THROWAWAY
    images, ids, mask, _ = batch
    assert model(images, ids, mask).shape == (8,)
    with pytest.raises(UserError, match=f"choose from {', '.join(fusion_names())}$"):
        build_model(tiny_cfg("nope"))


@pytest.mark.slow  # a second pytest run in a subprocess, training included
def test_a_new_fusion_file_gets_every_registry_parametrised_check(throwaway_fusion):
    """Imported before the tests are collected (as a new file in fusions/ is discovered), the throwaway fusion is
    parametrised into the forward, backward, padding, FLOPs and feature-cache checks with no test edited."""
    tests = Path(__file__).parent
    script = "import sys, pytest, throwaway_fusion; sys.exit(pytest.main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(throwaway_fusion), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script, "-v", "-p", "no:cacheprovider", "-k", THROWAWAY,
                          str(tests / "test_models.py"), str(tests / "test_features.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    passed = {m[1] for m in re.finditer(r"::(\w+)\[([^\]]*)\] PASSED", run.stdout) if THROWAWAY in m[2].split("-")}
    assert passed == {"test_output_shape", "test_loss_falls_on_a_fixed_batch",
                      "test_gradients_reach_the_encoders_unless_frozen", "test_padding_does_not_change_the_prediction",
                      "test_flops_and_parameters_are_counted", "test_cached_features_give_the_encoders_logits"}, \
        run.stdout[-3000:]
    help_text = subprocess.run([sys.executable, "-c", "import throwaway_fusion\nfrom fusionprof.cli import cli\ncli()",
                                "train", "--help"], env=env, capture_output=True, text=True, timeout=120).stdout
    assert f"{THROWAWAY}|" in help_text or f"|{THROWAWAY}" in help_text, help_text  # --fusion offers it


def test_train_offers_a_fusion_registered_after_the_cli_was_imported(throwaway_fusion):
    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0 and THROWAWAY in result.output


@pytest.mark.parametrize("fusion,fusion_blocks", [
    ("mid", {"BidirectionalBlock": 2}), ("bottleneck", {"LatentBlock": 2}), ("late", {})])
def test_regional_compilation_takes_the_repeated_blocks(fusion, fusion_blocks, tiny_cfg):
    """Each residual block, each BERT layer, each fusion block; never an MLP's parts or the ResNet stem."""
    blocks = repeated_blocks(build_model(tiny_cfg(fusion)))
    assert Counter(type(b).__name__ for b in blocks) == {"BasicBlock": 4, "BertLayer": 2, **fusion_blocks}


def test_unknown_fusion_is_a_clear_error(tiny_cfg):
    with pytest.raises(UserError, match=f"unknown fusion 'nope'; choose from {', '.join(FUSIONS)}$"):
        build_model(tiny_cfg("nope"))


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("batch_size,seq_len", [(1, 5), (3, 12)])
def test_output_shape(fusion, batch_size, seq_len, tiny_cfg):
    cfg = tiny_cfg(fusion)
    model = build_model(cfg).eval()
    logits = model(*example_inputs(cfg, batch_size, seq_len))
    assert logits.shape == (batch_size,)
    assert torch.isfinite(logits).all()


@pytest.mark.slow  # 15 optimizer steps per fusion: it trains
@pytest.mark.parametrize("fusion", FUSIONS)
def test_loss_falls_on_a_fixed_batch(fusion, tiny_cfg, batch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(fusion, dropout=0.0))
    images, ids, mask, labels = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss = F.binary_cross_entropy_with_logits(model(images, ids, mask), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("frozen", [False, True])
def test_gradients_reach_the_encoders_unless_frozen(fusion, frozen, tiny_cfg, batch):
    model = build_model(tiny_cfg(fusion, freeze_encoders=frozen)).train()
    images, ids, mask, labels = batch
    logits, align = model(images, ids, mask, labels)
    (F.binary_cross_entropy_with_logits(logits, labels) + align).backward()

    def grad_norm(module):
        return sum(p.grad.abs().sum().item() for p in module.parameters() if p.grad is not None)

    assert grad_norm(model.fusion) > 0
    for encoder in (model.image_encoder, model.text_encoder):
        if frozen:
            assert grad_norm(encoder) == 0 and not any(p.requires_grad for p in encoder.parameters())
            assert not encoder.training  # frozen BatchNorm statistics and no dropout
        else:
            assert grad_norm(encoder) > 0


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(POOLS))
def test_pooling_ignores_padding(kind, bf16):
    """Also under bf16 autocast (what --precision auto picks on a bf16 CPU): the attention pool's mask fill must fit
    in bf16."""
    torch.manual_seed(0)
    pool = make_pool(kind, 16)
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    garbage = x.clone()
    garbage[mask == 0] = 1e4  # whatever sits in the padded positions must not matter
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        clean, dirty = pool(x, mask), pool(garbage, mask)
    assert torch.isfinite(clean).all()
    torch.testing.assert_close(clean, dirty)


def test_masked_mean_is_the_mean_of_real_tokens():
    x = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0]])
    torch.testing.assert_close(masked_mean(x, mask), x[:, :2].mean(1))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_padding_does_not_change_the_prediction(fusion, tiny_cfg, tokenizer):
    """The same caption, padded to different lengths, gives the same logit."""
    model = build_model(tiny_cfg(fusion)).eval()
    images = torch.randn(1, 3, 64, 64)
    short = tokenizer(["a red circle"], return_tensors="pt")
    long = tokenizer(["a red circle"], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        a = model(images, short["input_ids"], short["attention_mask"])
        b = model(images, long["input_ids"], long["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_flops_and_parameters_are_counted(fusion, tiny_cfg):
    model = build_model(tiny_cfg(fusion))
    flops = forward_flops(model)
    params = count_parameters(model)
    assert flops["total"] >= flops["image_encoder"] + flops["text_encoder"] + flops["fusion"] > 0
    assert flops["image_encoder"] > flops["text_encoder"]  # the ResNet dominates the tiny preset
    assert params["total"] >= params["image_encoder"] + params["text_encoder"] + params["fusion"]


def test_the_contrastive_loss_never_contrasts_two_captions_of_one_image():
    """Pairs 0 and 1 are two captions of one image: neither is the other's negative (COCO has five an image)."""
    from fusionprof.models.layers import masked_mean
    from fusionprof.models.model import Alignment

    torch.manual_seed(0)
    align = Alignment(8, 8, 4)
    image_map, text = torch.randn(4, 8, 2, 2), torch.randn(4, 3, 8)
    image_map[1] = image_map[0]
    mask, labels = torch.ones(4, 3, dtype=torch.long), torch.tensor([1.0, 1.0, 1.0, 0.0])
    with torch.no_grad():
        image = F.normalize(align.image_proj(image_map.mean((2, 3))), dim=-1)
        words = F.normalize(align.text_proj(masked_mean(text, mask)), dim=-1)
        sim = align.log_scale.exp() * image @ words.T
    allowed = {0: [0, 2], 1: [1, 2], 2: [0, 1, 2]}  # each positive against the positives of other images
    expected = sum((sim[i, cols].logsumexp(0) - sim[i, i]) + (sim[cols, i].logsumexp(0) - sim[i, i])
                   for i, cols in allowed.items()) / (2 * 3)
    with torch.no_grad():
        together = align(image_map, text, mask, labels, torch.tensor([7, 7, 9, 9]))
        apart = align(image_map, text, mask, labels, torch.tensor([7, 8, 9, 9]))  # as before: all contrasted
        unkeyed = align(image_map, text, mask, labels)
    assert together == pytest.approx(float(expected), rel=1e-5)
    assert apart == pytest.approx(float(unkeyed), rel=1e-6) and abs(float(together) - float(apart)) > 1e-3


@pytest.mark.parametrize("train", [False, True])
def test_cross_attention_equals_multihead_attention_over_the_same_parameters(train):
    """CrossAttention computes attention itself (torch 2.11's export could not prove nn.MultiheadAttention's
    padding-mask guard over a dynamic caption length): the same numbers as nn.MultiheadAttention with its weights,
    padding masked out, in eval and in training (dropout 0), and a checkpoint's keys unchanged."""
    from fusionprof.models.layers import CrossAttention

    torch.manual_seed(0)
    block = CrossAttention(32, 4, dropout=0.0).train(train)
    q, kv = torch.randn(3, 5, 32), torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:], mask[2, 1:] = 0, 0  # padded captions, one with a single real token
    kv_n = block.norm_kv(kv)
    reference = q + block.attn(block.norm_q(q), kv_n, kv_n, key_padding_mask=mask == 0, need_weights=False)[0]
    torch.testing.assert_close(block(q, kv, mask), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block(q, kv), q + block.attn(block.norm_q(q), kv_n, kv_n, need_weights=False)[0],
                               rtol=1e-5, atol=1e-5)
    # what sits under a padded position changes nothing
    noisy = kv.clone()
    noisy[0, 4:] += 100
    torch.testing.assert_close(block(q, noisy, mask), block(q, kv, mask))
    assert {k for k in block.state_dict() if k.startswith("attn.")} == {
        "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}
