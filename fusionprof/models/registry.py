"""Fusion methods by name: ``@register_fusion("name")`` on a class in ``fusionprof/models/fusions/``."""

from __future__ import annotations

from torch import nn

from fusionprof.config import ModelConfig
from fusionprof.registry import Registry

FUSIONS: Registry = Registry("fusion", "fusionprof.models.fusions")
register_fusion = FUSIONS.register
fusion_names = FUSIONS.names


def create_fusion(cfg: ModelConfig, image_dim: int, text_dim: int) -> nn.Module:
    """A fusion head: forward(image_map [B,C,H,W], text_tokens [B,L,D], text_mask [B,L]) → logits [B]."""
    return FUSIONS.get(cfg.fusion)(cfg, image_dim, text_dim)
