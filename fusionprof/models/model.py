"""The whole model: image encoder + text encoder + a fusion head, with profiler ranges per stage."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import record_function
from torch.utils.flop_counter import FlopCounterMode

from fusionprof.config import ModelConfig
from fusionprof.models.encoders import ImageEncoder, TextEncoder
from fusionprof.models.layers import masked_mean
from fusionprof.models.registry import create_fusion


class Alignment(nn.Module):
    """Image–text contrastive loss on the unimodal features, beside the ITM loss ("align before fuse", ALBEF).

    From random initialisation, ITM alone sits on a long plateau: the pooled features of different captions
    start nearly identical and the match signal is second order. Contrasting every positive pair of the batch
    against all the others gives the encoders a first-order signal; it is the same for every fusion method
    and is not part of the exported model. ``TrainConfig.align_weight`` = 0 turns it off.
    """

    def __init__(self, image_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.image_proj, self.text_proj = nn.Linear(image_dim, dim), nn.Linear(text_dim, dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                labels: torch.Tensor, image_index: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE over the batch's positive pairs: row i's match is column i, among positives only.
        Given ``image_index``, two positives of one image are no negatives of each other (COCO has five captions an
        image): those off-diagonal pairs leave both softmaxes.

        Written with masks rather than by selecting the positives, so it never waits on the device for a count
        and every parameter is in the graph even when a batch has no positives (DDP then reduces all of them).
        """
        positive = labels > 0.5
        image = F.normalize(self.image_proj(image_map.mean((2, 3)).float()), dim=-1)
        words = F.normalize(self.text_proj(masked_mean(text, text_mask).float()), dim=-1)
        sim = self.log_scale.exp().clamp(max=100) * image @ words.T
        pair = positive[:, None] & positive[None, :]
        if image_index is not None:
            eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
            pair &= (image_index[:, None] != image_index[None, :]) | eye
        sim = sim.masked_fill(~pair, -1e4)  # finite: the rows of negatives stay finite and get weight 0 below
        diagonal = sim.diagonal()
        per_row = (sim.logsumexp(1) - diagonal) + (sim.logsumexp(0) - diagonal)
        weight = positive.float()
        return (per_row * weight).sum() / (2 * weight.sum().clamp_min(1.0))


class FusionModel(nn.Module):
    """(images float [B,3,S,S], input_ids [B,L], attention_mask [B,L]) → ITM logits [B]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = TextEncoder(cfg)
        self.fusion = create_fusion(cfg, self.image_encoder.out_dim, self.text_encoder.out_dim)
        self.align = Alignment(self.image_encoder.out_dim, self.text_encoder.out_dim, cfg.fusion_dim)
        if cfg.freeze_encoders:
            for encoder in self.encoders():
                encoder.requires_grad_(False)

    def encoders(self) -> tuple[nn.Module, nn.Module]:
        return self.image_encoder, self.text_encoder

    def train(self, mode: bool = True) -> FusionModel:
        super().train(mode)
        if self.cfg.freeze_encoders:  # frozen means frozen: BatchNorm statistics and dropout too
            for encoder in self.encoders():
                encoder.eval()
        return self

    def encode(self, images: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoders' outputs: image feature map [B, C, h, w] and text token states [B, L, D]."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoders):
            with record_function("image_encoder"):
                image_map = self.image_encoder(images)
            with record_function("text_encoder"):
                text = self.text_encoder(input_ids, attention_mask)
        return image_map, text

    def fuse(self, image_map: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor,
             labels: torch.Tensor | None = None,
             image_index: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The fusion head on encoder outputs (computed now, or read from a feature cache)."""
        with record_function("fusion"):
            logits = self.fusion(image_map, text, attention_mask)
        if labels is None:
            return logits
        with record_function("align"):
            return logits, self.align(image_map, text, attention_mask, labels, image_index)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ITM logits; given ``labels`` (training), also the alignment loss over the batch's positive pairs (and
        ``image_index``: which image each pair shows)."""
        return self.fuse(*self.encode(images, input_ids, attention_mask), attention_mask, labels, image_index)


class FusionHead(nn.Module):
    """A FusionModel fed cached encoder outputs: ``(image_map, text, attention_mask[, labels])`` → as forward."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(self, image_map: torch.Tensor, text: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.model.fuse(image_map, text, attention_mask, labels, image_index)


def build_model(cfg: ModelConfig) -> FusionModel:
    return FusionModel(cfg)


class InferenceGraph(nn.Module):
    """The model with exactly the inputs and output an exported artifact (ONNX, ``.pt2``) has."""

    def __init__(self, model: FusionModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(images, input_ids, attention_mask)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks an architecture repeats: the items of every ``nn.ModuleList``, and of every ``nn.Sequential``
    whose items are all of one class (a ResNet stage's residual blocks; not an MLP's Linear, GELU, Linear).

    That is each residual block of the ResNet, each BERT layer and each block of the mid / bottleneck fusions;
    a new fusion that keeps its blocks in a ModuleList is covered without a change here.
    """
    blocks = []
    for module in model.modules():
        items = list(module.children())
        if isinstance(module, nn.ModuleList) or (
                isinstance(module, nn.Sequential) and len({type(m) for m in items}) == 1):
            blocks += [m for m in items if any(True for _ in m.parameters())]
    return blocks


def compile_regions(model: nn.Module, dynamic: bool | None = None) -> int:
    """Regional compilation: ``torch.compile`` each repeated block in place, the rest of the model stays eager.

    Blocks of one class share their forward's code, so what Dynamo compiles for one block serves every copy of the
    same shape (BERT-base's 12 layers share their graphs): the compile costs a few blocks, not the whole network,
    and keeps the fusion inside them (PyTorch's "regional compilation" recipe). ``dynamic`` as ``torch.compile``
    takes it. Returns the number of blocks compiled.
    """
    allow_recompiles()
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def allow_recompiles(limit: int = 64) -> None:
    """Each block shape, caption length and the shorter last batch of an epoch is one more compiled entry for the
    same code: past Dynamo's default limit of 8 it would run the rest eager, with only a warning."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def count_parameters(model: nn.Module) -> dict[str, int]:
    def n(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    return {"total": n(model), "image_encoder": n(model.image_encoder), "text_encoder": n(model.text_encoder),
            "fusion": n(model.fusion), "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def example_inputs(cfg: ModelConfig, batch: int = 2, seq_len: int | None = None,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random but valid inputs: what latency sweeps and FLOP counts feed the model."""
    seq_len = seq_len or cfg.max_text_len
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(5, max(cfg.vocab_size, 6), (batch, seq_len), generator=g)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    return images.to(device), ids.to(device), mask.to(device)


def count_flops(module: nn.Module, *inputs: torch.Tensor) -> FlopCounterMode:
    """The counter after one forward of ``module`` (multiply-add = 2 FLOPs), counted the same way on every device.

    Attention runs through SDPA's math backend while counting: its matmuls are then plain ``bmm``s, which the
    counter knows, where the CPU's fused attention kernel has no FLOP formula and counted as zero (tiny/mid:
    0.1866 GFLOP on a CPU against 0.1874 on a GPU). Eager, also when blocks are compiled in place
    (--compile regions): counting is not worth a recompile. Autograd stays on: the counter's module tracker fails
    on parameter views made under no_grad.
    """
    with (FlopCounterMode(display=False) as counter, torch.compiler.set_stance("force_eager"),
          sdpa_kernel(SDPBackend.MATH)):
        module(*inputs)
    return counter


def forward_flops(model: FusionModel, seq_len: int | None = None) -> dict[str, float]:
    """Forward FLOPs per sample, counted at batch 1, in total and per part of the model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    counter = count_flops(model, *example_inputs(model.cfg, batch=1, seq_len=seq_len, device=device))
    model.train(was_training)
    by_module = counter.get_flop_counts()
    parts = {k: float(sum(by_module.get(f"FusionModel.{k}", {}).values()))
             for k in ("image_encoder", "text_encoder", "fusion")}
    return {"total": float(counter.get_total_flops()), **parts}
