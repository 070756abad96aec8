"""Bottleneck fusion (Perceiver / MBT style): M learned latent tokens cross-attend to the image and text
tokens, then self-attend among themselves; the head reads the latents. Attention cost grows with
M · (N_img + N_txt) instead of N_img · N_txt."""

import torch
from torch import nn

from fusionprof.models.layers import CrossAttention, FeedForward, PositionEmbedding2D, flatten_map, mlp
from fusionprof.models.registry import register_fusion


class LatentBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.read = CrossAttention(dim, heads, dropout)
        self.think = CrossAttention(dim, heads, dropout)  # self-attention: the latents attend to themselves
        self.ffn = FeedForward(dim, dropout)

    def forward(self, latents, context, context_mask):
        latents = self.read(latents, context, context_mask)
        return self.ffn(self.think(latents, latents))


@register_fusion("bottleneck")
class BottleneckFusion(nn.Module):
    def __init__(self, cfg, image_dim: int, text_dim: int):
        super().__init__()
        d = cfg.fusion_dim
        self.latents = nn.Parameter(torch.randn(cfg.bottleneck_tokens, d) * 0.02)
        self.image_proj, self.text_proj = nn.Linear(image_dim, d), nn.Linear(text_dim, d)
        self.position = PositionEmbedding2D(d)
        self.modality = nn.Parameter(torch.zeros(2, d))  # tells the latents which tokens are which
        self.blocks = nn.ModuleList(LatentBlock(d, cfg.fusion_heads, cfg.dropout) for _ in range(cfg.fusion_layers))
        self.head = mlp(d, d, 1, cfg.dropout)

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        height, width = image_map.shape[-2:]
        image = self.image_proj(flatten_map(image_map)) + self.position(height, width) + self.modality[0]
        words = self.text_proj(text) + self.modality[1]
        context = torch.cat([image, words], dim=1)
        context_mask = torch.cat([text_mask.new_ones(image.shape[:2]), text_mask], dim=1)
        latents = self.latents.expand(text.shape[0], -1, -1)
        for block in self.blocks:
            latents = block(latents, context, context_mask)
        return self.head(latents.mean(1)).squeeze(-1)
