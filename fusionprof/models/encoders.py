"""Image and text encoders, built from config, from standard pretrained weights, or from local files."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fusionprof.config import ModelConfig
from fusionprof.errors import OFFLINE_HINT, UserError
from fusionprof.hub import offline, require, require_huggingface


def _pretrained_resnet(name: str) -> nn.Module:
    """torchvision's default ImageNet weights, fetched the standard way (torch hub cache)."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.exists():
        if offline():
            raise UserError(f"ImageNet weights for {name} are not in {cached.parent} and we are offline; "
                            f"{OFFLINE_HINT}")
        require(weights.url, f"ImageNet weights for {name}")
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(f"cannot fetch ImageNet weights for {name} ({e}); {OFFLINE_HINT}") from None


def build_resnet(cfg: ModelConfig) -> nn.Module:
    if cfg.image_encoder == "resnet10":  # the tiny preset: torchvision's ResNet, one BasicBlock per stage
        model = ResNet(BasicBlock, [1, 1, 1, 1])
    elif cfg.image_encoder not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown image encoder {cfg.image_encoder!r}; use resnet10 or a torchvision ResNet")
    elif cfg.pretrained and not cfg.image_weights:
        model = _pretrained_resnet(cfg.image_encoder)
    else:
        model = torchvision.models.get_model(cfg.image_encoder, weights=None)
    if cfg.image_weights:
        try:
            state = torch.load(cfg.image_weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # a missing, truncated or foreign file: pickle, zip and torch raise their own types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--image-weights {cfg.image_weights}: not a {cfg.image_encoder} state_dict ({first})") \
                from None
    return model


class ImageEncoder(nn.Module):
    """A ResNet trunk up to ``layer4``: float [B, 3, S, S] → feature map [B, C, S/32, S/32]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        r = build_resnet(cfg)
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3, r.layer4)
        self.out_dim = r.fc.in_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)


def _bert(cfg: ModelConfig) -> nn.Module:
    """Pretrained weights by name or local directory; otherwise a BERT built from the config's fields.

    After loading pretrained weights the config's fields are set from the loaded model, so a checkpoint can
    rebuild the same architecture later without fetching anything.
    """
    from transformers import BertConfig, BertModel

    if cfg.pretrained and cfg.text_model != "config":
        require_huggingface(cfg.text_model, "config.json", f"text model {cfg.text_model!r}")
        try:
            bert = BertModel.from_pretrained(cfg.text_model, add_pooling_layer=False)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load text model {cfg.text_model!r} ({str(e).splitlines()[0]}); {OFFLINE_HINT}") \
                from None
        c = bert.config
        cfg.text_hidden, cfg.text_layers, cfg.text_heads, cfg.vocab_size = (
            c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size)
        return bert
    config = BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.text_hidden, num_hidden_layers=cfg.text_layers,
                        num_attention_heads=cfg.text_heads, intermediate_size=4 * cfg.text_hidden)
    return BertModel(config, add_pooling_layer=False)


class TextEncoder(nn.Module):
    """A BERT: input ids + attention mask [B, L] → token states [B, L, D]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = _bert(cfg)
        self.out_dim = self.bert.config.hidden_size
        self.max_positions = self.bert.config.max_position_embeddings  # the longest caption it can read

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
