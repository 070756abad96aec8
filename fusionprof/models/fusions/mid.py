"""Mid fusion: image tokens (projected to the text width, plus a 2-D position embedding) and text tokens
exchange information through K bidirectional, masked cross-attention blocks; pooled → MLP → logit.
Attention cost grows with N_img · N_txt per block."""

import torch
from torch import nn

from fusionprof.models.layers import (
    CrossAttention,
    FeedForward,
    PositionEmbedding2D,
    flatten_map,
    make_pool,
    mlp,
)
from fusionprof.models.registry import register_fusion


class BidirectionalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.image_from_text = CrossAttention(dim, heads, dropout)
        self.text_from_image = CrossAttention(dim, heads, dropout)
        self.image_ffn, self.text_ffn = FeedForward(dim, dropout), FeedForward(dim, dropout)

    def forward(self, image, text, text_mask):
        # Both directions read the block's inputs, so neither modality sees the other's update first.
        image, text = self.image_from_text(image, text, text_mask), self.text_from_image(text, image)
        return self.image_ffn(image), self.text_ffn(text)


@register_fusion("mid")
class MidFusion(nn.Module):
    def __init__(self, cfg, image_dim: int, text_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_dim, text_dim)
        self.position = PositionEmbedding2D(text_dim)
        self.blocks = nn.ModuleList(BidirectionalBlock(text_dim, cfg.fusion_heads, cfg.dropout)
                                    for _ in range(cfg.fusion_layers))
        self.text_pool = make_pool(cfg.text_pool, text_dim)
        self.head = mlp(2 * text_dim, cfg.fusion_dim, 1, cfg.dropout)

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        height, width = image_map.shape[-2:]
        image = self.image_proj(flatten_map(image_map)) + self.position(height, width)
        for block in self.blocks:
            image, text = block(image, text, text_mask)
        pooled = torch.cat([image.mean(1), self.text_pool(text, text_mask)], dim=-1)
        return self.head(pooled).squeeze(-1)
