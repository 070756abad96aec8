"""``fusionprof evaluate``: a checkpoint's ITM accuracy and AUC on one split."""

from __future__ import annotations

from pathlib import Path

from fusionprof.config import ModelConfig, TrainConfig, from_dict
from fusionprof.data import prepare_data
from fusionprof.data.text import build_tokenizer
from fusionprof.errors import UserError
from fusionprof.models import FusionModel, build_model
from fusionprof.runtime import resolve_device
from fusionprof.train import evaluate_split, load_checkpoint, with_run_tokenizer


def load_model(checkpoint: str | Path, device: str = "cpu") -> tuple[FusionModel, TrainConfig]:
    ckpt = load_checkpoint(checkpoint)
    model_cfg = from_dict(ModelConfig, ckpt["model_config"])
    model_cfg.pretrained = False  # the checkpoint holds the weights: fetch nothing
    model_cfg.image_weights = None
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # e.g. an early-fusion state dict under a mid-fusion config
        detail = " ".join(str(e).split())[:160]
        raise UserError(f"{checkpoint}: its weights do not fit the {model_cfg.fusion} model its config describes "
                        f"({detail}...)") from None
    return model.to(resolve_device(device)).eval(), from_dict(TrainConfig, ckpt["train_config"])


def evaluate(checkpoint: str | Path, split: str = "test", data: str | None = None, device: str = "cpu",
             batch_size: int | None = None, progress: bool = True) -> dict:
    model, cfg = load_model(checkpoint, device)
    tokenizer = build_tokenizer(with_run_tokenizer(model.cfg, Path(checkpoint).parent))
    limit = cfg.limit_train if split == "train" else cfg.limit_eval
    splits, source = prepare_data(data or cfg.data, tokenizer, model.cfg.image_size, model.cfg.max_text_len,
                                  cfg.seed, limit_train=limit, limit_eval=limit, splits=(split,), progress=progress)
    result = evaluate_split(model, splits[split], cfg.seed, batch_size or cfg.batch_size, resolve_device(device))
    return {**result, "checkpoint": str(checkpoint), "data": source, "fusion": model.cfg.fusion}
