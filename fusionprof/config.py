"""Configs as dataclasses, and the presets that fill them.

A checkpoint stores ``ModelConfig`` and ``TrainConfig`` as plain dicts, so a model can be rebuilt from
its checkpoint alone (nanoGPT-style) and loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from fusionprof.errors import UserError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[T], d: dict) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"{cls.__name__} has no field(s) {sorted(unknown)}; was it written by another version?")
    return cls(**d)


@dataclass
class ModelConfig:
    fusion: str = "mid"
    # Image encoder: a torchvision ResNet name ("resnet50") or "resnet10" (BasicBlock, one block per stage).
    image_encoder: str = "resnet50"
    image_size: int = 224
    # Text encoder: a Hugging Face name or local directory, or "config" to build a BERT from the fields below.
    text_model: str = "bert-base-uncased"
    tokenizer: str | None = None  # name or folder; None: the text model's (the shipped vocabulary for "config")
    text_hidden: int = 768
    text_layers: int = 12
    text_heads: int = 12
    max_text_len: int = 32
    pretrained: bool = True  # ImageNet / HF weights for the encoders; False = random init
    image_weights: str | None = None  # a local state_dict file for the image encoder
    text_pool: str = "mean"  # mean (masked) | cls | attn
    fusion_dim: int = 256  # the shared width of the fusion head
    fusion_layers: int = 2  # K cross-attention blocks (mid) / latent self-attention blocks (bottleneck)
    fusion_heads: int = 4
    bottleneck_tokens: int = 8  # M latent tokens (bottleneck)
    dropout: float = 0.1
    freeze_encoders: bool = False
    vocab_size: int = 0  # at least the tokenizer's; set from the model when pretrained weights are loaded


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # None: the embedded synthetic dataset, created on first use
    data_layout: str | None = None  # the layout found under data when the run started (data.coco.LAYOUTS)
    run: str | None = None
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    encoder_lr: float = 1e-3  # encoders often want a smaller rate than the fresh fusion head
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    grad_accum: int = 1
    align_weight: float = 1.0  # image–text contrastive loss beside ITM (see models.model.Alignment); 0 = ITM only
    device: str = "cpu"
    precision: str = "auto"  # auto (bf16 where the hardware has native bf16, else fp32) | fp32 | bf16 | fp16
    compile: str = "off"  # off | model (torch.compile the whole step model) | regions (each repeated block)
    #                       | cudagraphs (the whole model, its kernels replayed as CUDA graphs; CUDA only)
    seed: int = 0
    workers: int = 0
    profile: bool = False  # a separate short profiled run: traces + the training-step breakdown
    cache_features: bool = False  # with frozen encoders: encode each split once, train the head on the features
    image_cache: bool = True  # False: decode the JPEGs every step (the study's way; for comparison)
    limit_train: int | None = None  # use only the first N train images (quick runs, tests)
    limit_eval: int | None = None
    models_dir: str = "models"
    profiles_dir: str = "profiles"

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # checkpoints written before the scopes stored a flag
            self.compile = "model" if self.compile else "off"
        if self.compile not in COMPILE_SCOPES:
            raise UserError(f"--compile {self.compile}: choose from {', '.join(COMPILE_SCOPES)}")
        if self.compile == "cudagraphs" and not self.device.startswith("cuda"):
            raise UserError(f"--compile cudagraphs needs a CUDA device (--device cuda:N), not {self.device}; "
                            "--compile model compiles the same model without the graphs")


COMPILE_SCOPES = ("off", "model", "regions", "cudagraphs")


# The tiny preset trains in minutes on a 2-core CPU; the seed preset is the study's setting.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "model": dict(image_encoder="resnet10", image_size=64, text_model="config", text_hidden=128,
                      text_layers=2, text_heads=2, max_text_len=24, pretrained=False, fusion_dim=128,
                      fusion_layers=2, fusion_heads=4, bottleneck_tokens=8, dropout=0.1),
        "train": dict(epochs=3, batch_size=64, lr=1e-3, encoder_lr=1e-3, warmup_steps=100),
    },
    "seed": {
        "model": dict(image_encoder="resnet50", image_size=224, text_model="bert-base-uncased",
                      text_hidden=768, text_layers=12, text_heads=12, vocab_size=30522, max_text_len=32,
                      pretrained=True,
                      fusion_dim=512, fusion_layers=2, fusion_heads=8, bottleneck_tokens=8, dropout=0.1),
        "train": dict(epochs=5, batch_size=64, lr=1e-4, encoder_lr=2e-5, warmup_steps=500),
    },
}


def preset(name: str) -> dict[str, dict[str, Any]]:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def model_config(preset_name: str, **overrides: Any) -> ModelConfig:
    values = {**preset(preset_name)["model"], **{k: v for k, v in overrides.items() if v is not None}}
    return from_dict(ModelConfig, values)


def train_config(preset_name: str, **overrides: Any) -> TrainConfig:
    values = {**preset(preset_name)["train"], **{k: v for k, v in overrides.items() if v is not None}}
    return from_dict(TrainConfig, {"preset": preset_name, **values})
