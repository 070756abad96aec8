"""Fusion methods by name (timm-style): ``@register_fusion("name")`` on a class, ``create_fusion`` to build.

Every module in ``fusionprof/models/fusions/`` is imported on first use, so a new method is one new file.
"""

from __future__ import annotations

import importlib
import pkgutil

from torch import nn

from fusionprof.config import ModelConfig
from fusionprof.errors import UserError

_FUSIONS: dict[str, type[nn.Module]] = {}


def register_fusion(name: str):
    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _FUSIONS:
            raise ValueError(f"fusion {name!r} registered twice")
        _FUSIONS[name] = cls
        cls.fusion_name = name
        return cls
    return add


def _discover() -> None:
    from fusionprof.models import fusions

    for module in pkgutil.iter_modules(fusions.__path__):
        importlib.import_module(f"{fusions.__name__}.{module.name}")


def fusion_names() -> list[str]:
    if not _FUSIONS:
        _discover()
    return sorted(_FUSIONS)


def create_fusion(cfg: ModelConfig, image_dim: int, text_dim: int) -> nn.Module:
    """A fusion head: forward(image_map [B,C,H,W], text_tokens [B,L,D], text_mask [B,L]) → logits [B]."""
    if cfg.fusion not in fusion_names():
        raise UserError(f"unknown fusion {cfg.fusion!r}; choose from {', '.join(fusion_names())}")
    return _FUSIONS[cfg.fusion](cfg, image_dim, text_dim)
