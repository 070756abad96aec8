"""Building blocks the fusion methods share: pooling, MLP heads, attention blocks, 2-D positions."""

from __future__ import annotations

import torch
from torch import nn

from fusionprof.errors import UserError


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is 1: padding never enters the average."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class MeanPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(x, mask)


class ClsPool(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


class AttnPool(nn.Module):
    """Learned attention pooling: a scored, masked softmax over the tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        score = self.score(x).squeeze(-1)
        # the fill in the score's own dtype: under bf16/fp16 autocast it is narrower than x's, and fp32's minimum
        # does not fit. Finite, not -inf, so an all-padding row gives a uniform average instead of NaN.
        score = score.masked_fill(mask == 0, torch.finfo(score.dtype).min)
        return (score.softmax(-1).unsqueeze(-1) * x).sum(1)


POOLS = {"mean": lambda dim: MeanPool(), "cls": lambda dim: ClsPool(), "attn": AttnPool}


def make_pool(kind: str, dim: int) -> nn.Module:
    if kind not in POOLS:
        raise UserError(f"unknown text pooling {kind!r}; choose from {', '.join(POOLS)}")
    return POOLS[kind](dim)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class CrossAttention(nn.Module):
    """Pre-norm residual cross-attention: queries attend to a (masked) context."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        kv_n = self.norm_kv(kv)
        pad = None if kv_mask is None else kv_mask == 0
        out, _ = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=pad, need_weights=False)
        return q + out


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class PositionEmbedding2D(nn.Module):
    """Learned row + column embeddings for a feature map of up to ``max_side`` × ``max_side``."""

    def __init__(self, dim: int, max_side: int = 32):
        super().__init__()
        self.row = nn.Parameter(torch.randn(max_side, dim) * 0.02)
        self.col = nn.Parameter(torch.randn(max_side, dim) * 0.02)

    def forward(self, height: int, width: int) -> torch.Tensor:
        return (self.row[:height, None, :] + self.col[None, :width, :]).reshape(height * width, -1)


def flatten_map(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → tokens [B, H·W, C]."""
    return feature_map.flatten(2).transpose(1, 2)
