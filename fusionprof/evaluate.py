"""ITM accuracy and AUC of a model on one split: what training validates with, ``fusionprof evaluate`` reports and
the export gate compares against.

A checkpoint is evaluated in the precision it was trained (and tested) in unless the caller says otherwise, so
``fusionprof evaluate`` reproduces the test accuracy in ``metrics.json`` on any CPU: bf16 autocast rounds
differently from fp32, enough to move a pair or two across the decision boundary.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusionprof.checkpoint import load_model, with_run_tokenizer
from fusionprof.data import SplitData, prepare_data
from fusionprof.data.images import normalize
from fusionprof.data.itm import Batch, loader
from fusionprof.data.text import build_tokenizer
from fusionprof.distributed import SINGLE, Dist, all_gather_objects
from fusionprof.errors import UserError
from fusionprof.metrics import itm_metrics, predict
from fusionprof.runtime import autocast, check_precision, resolve_device


def to_inputs(batch: Batch, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A Batch on the host → model inputs on ``device``: uint8 pixels travel, then normalise there; float
    "images" are cached encoder features (``features.py``) and pass as they are."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    image = batch.image if batch.image.is_floating_point() else normalize(batch.image, channels_last=True)
    return (image, batch.text, batch.attention_mask), batch.labels


def evaluate_split(model: nn.Module, split: SplitData, seed: int, batch_size: int, device: torch.device,
                   precision: str = "fp32", d: Dist = SINGLE) -> dict:
    """ITM accuracy and AUC on a split's fixed pairs (its negatives depend only on the seed).

    Under DDP each rank predicts every world_size-th batch and the predictions are gathered: every pair
    counts exactly once, and every rank returns the same metrics.
    """
    batches = split.batches(split.pairs(seed), batch_size)
    shard = range(d.rank, len(batches), d.world_size)
    was_training = model.training
    model.eval()
    # Eager, also when the training step is compiled: in inference mode every compiled block would compile again
    # (and a few shapes more would reach Dynamo's recompile limit, past which it silently runs eager anyway).
    with torch.inference_mode(), autocast(device, precision), torch.compiler.set_stance("force_eager"):
        logits, labels = predict(lambda b: model(*to_inputs(b, device)[0]).float().cpu(),
                                 loader(batches, pin_memory=device.type == "cuda", sampler=shard))
    model.train(was_training)
    if d.enabled:
        logits, labels = (np.concatenate(part) for part in zip(*all_gather_objects(d, (logits, labels)), strict=True))
    return {**itm_metrics(logits, labels, split.name), "precision": precision}


def _same_data(asked: str | None, trained: str | None) -> bool:
    """Whether ``--data`` is the run's own dataset (then read in the layout it was trained on; another dataset is
    read in the layout found there)."""
    return asked is None or (trained is not None and Path(asked).resolve() == Path(trained).resolve())


def evaluate(checkpoint: str | Path, split: str = "test", data: str | None = None, device: str = "cpu",
             batch_size: int | None = None, precision: str | None = None, progress: bool = True) -> dict:
    """A checkpoint's metrics on ``split``, in ``precision`` (None: the precision it was trained in)."""
    torch_device = resolve_device(device)
    model, cfg = load_model(checkpoint, torch_device)
    if precision is None and cfg.precision == "fp16" and torch_device.type != "cuda":
        raise UserError(f"{checkpoint} was trained in fp16, which needs a CUDA device: pass --device cuda:N, "
                        "or --precision fp32 (or bf16) to evaluate it in another precision")
    precision = precision or cfg.precision
    check_precision(precision, torch_device)
    # as training ran it: NHWC convolutions pick other kernels, and in bf16 other kernels round differently
    model = model.to(memory_format=torch.channels_last)
    tokenizer = build_tokenizer(with_run_tokenizer(model.cfg, Path(checkpoint).parent))
    limit = cfg.limit_train if split == "train" else cfg.limit_eval
    splits, source = prepare_data(data or cfg.data, tokenizer, model.cfg.image_size, model.cfg.max_text_len,
                                  cfg.seed, limit_train=limit, limit_eval=limit, splits=(split,), progress=progress,
                                  layout=cfg.data_layout if _same_data(data, cfg.data) else None)
    result = evaluate_split(model, splits[split], cfg.seed, batch_size or cfg.batch_size, torch_device, precision)
    return {**result, "checkpoint": str(checkpoint), "data": source, "fusion": model.cfg.fusion}
