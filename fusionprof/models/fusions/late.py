"""Late fusion: each modality encoded and projected on its own, then combined by learned, normalised
weights → head → logit. Nothing crosses between the modalities before that weighted sum."""

import torch
from torch import nn

from fusionprof.models.layers import make_pool, mlp
from fusionprof.models.registry import register_fusion


@register_fusion("late")
class LateFusion(nn.Module):
    pooled_image = True  # reads only the image map's mean: a feature cache keeps [C, 1, 1] per image

    def __init__(self, cfg, image_dim: int, text_dim: int):
        super().__init__()
        d = cfg.fusion_dim
        self.text_pool = make_pool(cfg.text_pool, text_dim)
        self.image_branch = mlp(image_dim, d, d, cfg.dropout)
        self.text_branch = mlp(text_dim, d, d, cfg.dropout)
        self.modality_logits = nn.Parameter(torch.zeros(2))  # softmax → weights that sum to 1
        self.head = mlp(d, d, 1, cfg.dropout)

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        image = self.image_branch(image_map.mean((2, 3)))
        words = self.text_branch(self.text_pool(text, text_mask))
        w = self.modality_logits.softmax(0)
        return self.head(w[0] * image + w[1] * words).squeeze(-1)
