"""The training loop: one flat loop a reader can hold in their head (nanoGPT-style).

AdamW, linear warm-up + cosine decay, gradient clipping, autocast, gradient accumulation, optional
``torch.compile``. Each epoch ends with validation and an atomic checkpoint that holds everything needed
to continue bit-for-bit (weights, optimizer, scheduler, scaler, RNG, configs, history); ``resume=True``
picks it up after a kill. At the end: the test split, and ``metrics.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from itertools import chain, cycle
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fusionprof import SCHEMA_VERSION, __version__
from fusionprof.atomic import torch_save, write_json
from fusionprof.config import ModelConfig, TrainConfig, from_dict, to_dict
from fusionprof.data import SplitData, prepare_data
from fusionprof.data.images import normalize
from fusionprof.data.itm import Batch, loader
from fusionprof.data.text import build_tokenizer
from fusionprof.env import fingerprint
from fusionprof.errors import UserError
from fusionprof.metrics import itm_metrics, predict
from fusionprof.models import build_model, count_parameters, forward_flops
from fusionprof.profiling import ACTIVE, TRAIN_RANGES, range_breakdown, run_profiled, trace_dir
from fusionprof.runtime import (
    autocast,
    check_precision,
    peak_memory_mib,
    reset_peak_memory,
    resolve_device,
    seed_everything,
    synchronize,
)

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
TOKENIZER = "tokenizer"  # a folder beside the checkpoint


def with_run_tokenizer(model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
    """A checkpoint names its tokenizer relative to its own folder, wherever that folder has moved."""
    if model_cfg.tokenizer == TOKENIZER:
        return dataclasses.replace(model_cfg, tokenizer=str(run_dir / TOKENIZER))
    return model_cfg


def run_name(cfg: TrainConfig, model_cfg: ModelConfig) -> str:
    return cfg.run or f"{cfg.preset}-{model_cfg.fusion}"


def to_inputs(batch: Batch, device: torch.device) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """A Batch on the host → model inputs on ``device`` (uint8 images travel, then normalise there)."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    images = normalize(batch.images, channels_last=device.type == "cuda")
    return (images, batch.input_ids, batch.attention_mask), batch.labels


def evaluate_split(model: nn.Module, split: SplitData, seed: int, batch_size: int, device: torch.device,
                   precision: str = "fp32") -> dict:
    """ITM accuracy and AUC on a split's fixed pairs (its negatives depend only on the seed)."""
    batches = loader(split.batches(split.pairs(seed), batch_size), pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    with torch.inference_mode(), autocast(device, precision):
        logits, labels = predict(lambda b: model(*to_inputs(b, device)[0]).float().cpu(), batches)
    model.train(was_training)
    return itm_metrics(logits, labels, split.name)


def lr_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Encoders at ``encoder_lr``, the fusion head at ``lr``; no weight decay on biases and norms."""
    groups = []
    for params, lr in ((model.image_encoder.parameters(), cfg.encoder_lr),
                       (model.text_encoder.parameters(), cfg.encoder_lr),
                       (chain(model.fusion.parameters(), model.align.parameters()), cfg.lr)):
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch all raise their own types
        raise UserError(f"{path}: not a readable fusionprof checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "model" not in ckpt:
        raise UserError(f"{path}: not a fusionprof checkpoint")
    return ckpt


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _report_data(data: dict[str, SplitData], log: Callable[[str], None]) -> dict:
    out = {}
    for name, split in data.items():
        for line in split.report.lines(name):
            log(line)
        out[name] = {"images": split.n_images, "captions": split.n_captions, **split.report.to_dict()}
    return out


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False, fresh: bool = False,
          progress: bool = True, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train one fusion model; returns the metrics record (also written to ``profiles/<run>/metrics.json``)."""
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size, --epochs and --grad-accum must be at least 1")
    model_cfg = dataclasses.replace(model_cfg)  # filled in below (vocabulary, tokenizer): keep the caller's
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    run = run_name(cfg, model_cfg)
    run_dir, profile_dir = Path(cfg.models_dir) / run, Path(cfg.profiles_dir) / run
    ckpt_path = run_dir / CHECKPOINT
    ckpt = None
    if ckpt_path.exists() and not fresh:
        if not resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue it, --fresh to start over, "
                            "or --run NAME for a new run")
        ckpt = load_checkpoint(ckpt_path)
        saved = from_dict(ModelConfig, ckpt["model_config"])
        if (saved.fusion, ckpt["train_config"]["preset"]) != (model_cfg.fusion, cfg.preset):
            raise UserError(f"{ckpt_path} is a {ckpt['train_config']['preset']}/{saved.fusion} run, not "
                            f"{cfg.preset}/{model_cfg.fusion}")
        model_cfg = saved
        cfg = from_dict(TrainConfig, {**ckpt["train_config"], "device": cfg.device, "workers": cfg.workers})
        log(f"resuming {run} after epoch {ckpt['epoch']}/{cfg.epochs}")

    seed_everything(cfg.seed)
    tokenizer = build_tokenizer(with_run_tokenizer(model_cfg, run_dir), log)
    model_cfg.vocab_size = max(model_cfg.vocab_size, len(tokenizer))
    data, data_source = prepare_data(cfg.data, tokenizer, model_cfg.image_size, model_cfg.max_text_len, cfg.seed,
                                     image_cache=cfg.image_cache, limit_train=cfg.limit_train,
                                     limit_eval=cfg.limit_eval, progress=progress)
    data_summary = _report_data(data, log)
    train_split = data["train"]

    model = build_model(model_cfg).to(device)
    if ckpt is None:  # keep the tokenizer with the run: the checkpoint then needs nothing from outside
        tokenizer.save_pretrained(run_dir / TOKENIZER)
        model_cfg.tokenizer = TOKENIZER
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    n_batches = math.ceil(2 * train_split.n_captions / cfg.batch_size)  # one positive + one negative per caption
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps,
                                                                         cfg.epochs * steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    start_epoch, history, train_seconds = 0, [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], device)
        start_epoch, history, train_seconds = ckpt["epoch"], ckpt["history"], ckpt["train_seconds"]
    step_model = torch.compile(model) if cfg.compile else model
    writer = SummaryWriter(str(Path(cfg.profiles_dir) / "tensorboard" / run))
    loss_fn = nn.BCEWithLogitsLoss()

    def step(net, opt, sched, scl, batches, last_micro_batch: bool) -> torch.Tensor:
        """One micro-batch: fetch, forward, loss, backward; the optimizer steps on the last micro-batch."""
        with record_function("data"):  # waiting for the loader + the host→device copy
            inputs, labels = to_inputs(next(batches), device)
        with autocast(device, cfg.precision):
            logits, align_loss = net(*inputs, labels) if cfg.align_weight else (net(*inputs), 0.0)
        with record_function("loss"):
            loss = loss_fn(logits.float(), labels) + cfg.align_weight * align_loss
        with record_function("backward"):
            scl.scale(loss / cfg.grad_accum).backward()
        if last_micro_batch:
            with record_function("optimizer_step"):
                scl.unscale_(opt)
                nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
                scl.step(opt)
                scl.update()
                opt.zero_grad(set_to_none=True)
                sched.step()
        return loss.detach()

    step_breakdown = None
    if cfg.profile:  # a separate short run on a copy: the timed epochs are never profiled
        rng = _rng_state(device)
        net = copy.deepcopy(model)
        opt = make_optimizer(net, cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scl = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        batches = cycle(loader(train_split.batches(train_split.pairs(cfg.seed), cfg.batch_size), cfg.workers,
                               pin_memory=device.type == "cuda"))
        out = trace_dir(cfg.profiles_dir, f"train-{run}")
        prof = run_profiled(lambda i: step(net, opt, sched, scl, batches, True), out, device)
        step_breakdown = range_breakdown(prof, TRAIN_RANGES, ACTIVE, device)
        _set_rng_state(rng, device)
        del net, opt, prof
        log(f"training step profile ({out}): " + ", ".join(
            f"{name} {v['ms_per_step']:.1f} ms ({v['share']:.0%})" for name, v in step_breakdown.items()))
    reset_peak_memory(device)
    log(f"{run}: {model_cfg.fusion} fusion, {count_parameters(model)['total'] / 1e6:.2f} M parameters, "
        f"{train_split.n_captions} train captions → {2 * train_split.n_captions} pairs/epoch, on {device} "
        f"({cfg.precision})")

    for epoch in range(start_epoch, cfg.epochs):
        pairs = train_split.pairs(cfg.seed, epoch)  # fresh negatives every epoch
        order = np.random.default_rng([cfg.seed, 100, epoch]).permutation(len(pairs))
        batches = loader(train_split.batches(pairs, cfg.batch_size, order), cfg.workers,
                         pin_memory=device.type == "cuda")
        model.train()
        loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
        synchronize(device)
        epoch_start = time.perf_counter()
        batch_iter = iter(batches)
        bar = tqdm(range(len(batches)), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for i in bar:
            last_micro_batch = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches)
            loss_sum += step(step_model, optimizer, scheduler, scaler, batch_iter, last_micro_batch)
            if progress and i % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}")
        synchronize(device)
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        val = evaluate_split(model, data["val"], cfg.seed, cfg.batch_size, device, cfg.precision)
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / len(batches), "val_accuracy": val["accuracy"],
                  "val_auc": val["auc"], "epoch_seconds": epoch_seconds,
                  "samples_per_s": len(pairs) / epoch_seconds, "lr": scheduler.get_last_lr()[-1]}
        history.append(record)
        for key in ("loss", "val_accuracy", "val_auc", "samples_per_s", "lr"):
            writer.add_scalar(f"train/{key}", record[key], epoch + 1)
        writer.flush()
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  val acc {val['accuracy']:.1%}  "
            f"auc {val['auc']:.3f}  {record['samples_per_s']:.0f} samples/s  {epoch_seconds:.1f} s")
        torch_save(ckpt_path, {
            "schema_version": SCHEMA_VERSION, "fusionprof_version": __version__, "epoch": epoch + 1,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": _rng_state(device), "model_config": to_dict(model_cfg),
            "train_config": to_dict(cfg), "history": history, "train_seconds": train_seconds,
        })
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    writer.close()

    test = evaluate_split(model, data["test"], cfg.seed, cfg.batch_size, device, cfg.precision)
    log(f"test: accuracy {test['accuracy']:.1%}  auc {test['auc']:.3f}  on {test['pairs']} pairs")
    metrics = {
        "schema_version": SCHEMA_VERSION, "kind": "train", "run": run, "fusion": model_cfg.fusion,
        "preset": cfg.preset, "checkpoint": str(ckpt_path), "data": data_source,
        "parameters": count_parameters(model), "forward_flops_per_sample": forward_flops(model),
        "flops_seq_len": model_cfg.max_text_len, "step_breakdown": step_breakdown,
        "train_seconds": train_seconds, "epochs": cfg.epochs,
        "train_samples_per_s": len(history) * 2 * train_split.n_captions / train_seconds,
        "peak_memory": peak_memory_mib(device),
        "val": {"accuracy": history[-1]["val_accuracy"], "auc": history[-1]["val_auc"]},
        "test": test, "history": history, "data_summary": data_summary,
        "skipped_total": sum(sum(split.report.skipped.values()) for split in data.values()),
        "environment": fingerprint(), "model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
    }
    write_json(profile_dir / METRICS, metrics)
    return metrics
