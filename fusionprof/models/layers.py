"""Building blocks the fusion methods share: pooling, MLP heads, attention blocks, 2-D positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
    """Pre-norm residual cross-attention: queries attend to a (masked) context.

    The parameters are ``nn.MultiheadAttention``'s (so checkpoints load either way), but the attention is computed
    here with ``scaled_dot_product_attention`` and a ``[B, 1, 1, L]`` mask: ``nn.MultiheadAttention``'s padding-mask
    path leaves a guard (``min(L, heads·L) == L``) that torch 2.11's ``torch.export`` cannot prove over a dynamic
    caption length, so a mid or bottleneck model could not be exported as a ``.pt2`` there (the GPU machines'
    version; ``profiles/h200/latency-seed-cuda-bf16-20261204T154100Z.json``)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None) -> torch.Tensor:
        a, kv_n = self.attn, self.norm_kv(kv)
        batch, length, dim = q.shape
        w_q, w_k, w_v = a.in_proj_weight.chunk(3)
        b_q, b_k, b_v = a.in_proj_bias.chunk(3)

        def heads(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [B, T, D] → [B, H, T, D/H]
            return F.linear(x, w, b).unflatten(-1, (a.num_heads, a.head_dim)).transpose(1, 2)

        keep = None if kv_mask is None else (kv_mask != 0)[:, None, None, :]  # True: attend (a real token)
        out = F.scaled_dot_product_attention(heads(self.norm_q(q), w_q, b_q), heads(kv_n, w_k, b_k),
                                             heads(kv_n, w_v, b_v), attn_mask=keep,
                                             dropout_p=a.dropout if self.training else 0.0)
        return q + a.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


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
