"""Early fusion: pooled image vector ‖ pooled text vector → MLP → logit."""

import torch
from torch import nn

from fusionprof.models.layers import make_pool, mlp
from fusionprof.models.registry import register_fusion


@register_fusion("early")
class EarlyFusion(nn.Module):
    pooled_image = True  # reads only the image map's mean: a feature cache keeps [C, 1, 1] per image

    def __init__(self, cfg, image_dim: int, text_dim: int):
        super().__init__()
        self.text_pool = make_pool(cfg.text_pool, text_dim)
        self.head = mlp(image_dim + text_dim, cfg.fusion_dim, 1, cfg.dropout)

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        image = image_map.mean((2, 3))  # ResNet's global average pool
        return self.head(torch.cat([image, self.text_pool(text, text_mask)], dim=-1)).squeeze(-1)
