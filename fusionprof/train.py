"""The training loop: one flat loop a reader can hold in their head (nanoGPT-style).

AdamW, linear warm-up + cosine decay, gradient clipping, autocast, gradient accumulation, optional
``torch.compile``. Each epoch ends with validation and an atomic checkpoint that holds everything needed
to continue bit-for-bit (weights, optimizer, scheduler, scaler, RNG, configs, history); ``resume=True``
picks it up after a kill. At the end: the test split, and ``metrics.json``.

Under ``torchrun`` the same loop runs data-parallel (``DistributedDataParallel``, see ``distributed.py``):
``--batch-size`` stays the *global* batch, split evenly over the processes, and the global batch k of an epoch
holds the same pairs whatever the number of processes. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from itertools import chain, cycle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torch.utils.data import DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from fusionprof import SCHEMA_VERSION, __version__
from fusionprof.atomic import torch_save, write_json
from fusionprof.config import ModelConfig, TrainConfig, from_dict, to_dict
from fusionprof.data import SplitData, prepare_data
from fusionprof.data.images import normalize
from fusionprof.data.itm import Batch, loader
from fusionprof.data.text import build_tokenizer
from fusionprof.distributed import (
    SINGLE,
    Dist,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    local_first,
    setup,
    teardown,
)
from fusionprof.env import fingerprint
from fusionprof.errors import UserError
from fusionprof.features import cached_features
from fusionprof.measure import datasheet_tflops
from fusionprof.metrics import itm_metrics, predict
from fusionprof.models import (
    FusionHead,
    FusionModel,
    allow_recompiles,
    build_model,
    compile_regions,
    count_parameters,
    forward_flops,
)
from fusionprof.profiling import TRAIN_RANGES, describe_step_profile, run_profiled, step_breakdown, trace_dir
from fusionprof.runtime import (
    autocast,
    peak_memory_mib,
    reset_peak_memory,
    resolve_device,
    resolve_precision,
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
    """A Batch on the host → model inputs on ``device``: uint8 pixels travel, then normalise there; float
    "images" are cached encoder features (``features.py``) and pass as they are."""
    batch = batch.to(device, non_blocking=device.type == "cuda")
    images = batch.images
    if not images.is_floating_point():
        images = normalize(images, channels_last=True)
    return (images, batch.input_ids, batch.attention_mask), batch.labels


def compiled(model: nn.Module, scope: str, log: Callable[[str], None] = print) -> nn.Module:
    """``model`` as ``--compile scope`` runs it: as it is, through ``torch.compile`` (with CUDA graphs for
    ``cudagraphs``), or with its repeated blocks compiled in place. Shapes are Dynamo's default: static first,
    dynamic where a second call changes them (caption lengths vary per batch)."""
    if scope in ("model", "cudagraphs"):
        allow_recompiles()
        # reduce-overhead: inductor's kernels recorded into a CUDA graph per input shape and replayed with one
        # launch, the parameters and buffers at fixed addresses (optimizer and BatchNorm update them in place)
        return torch.compile(model, mode="reduce-overhead" if scope == "cudagraphs" else None)
    if scope == "regions":
        log(f"compiling {compile_regions(model)} repeated blocks (regional compilation)")
    return model


def training_flops(model: FusionModel, cfg: TrainConfig, seq_len: float, samples_per_s: float,
                   device: torch.device) -> dict:
    """What a training sample costs and the rate the run achieved: the forward counted at the epoch's mean caption
    length; ×3 for what trains (the backward costs about two forwards), ×1 for frozen encoders, nothing for
    encoders read from the feature cache. MFU against the datasheet peak on a known GPU in bf16 / fp16."""
    f = forward_flops(model, seq_len=round(seq_len))
    encoders = f["image_encoder"] + f["text_encoder"]
    head = f["total"] - encoders
    per_sample = 3 * head + (0 if cfg.cache_features else 1 if model.cfg.freeze_encoders else 3) * encoders
    achieved = per_sample * samples_per_s / 1e12
    peak = datasheet_tflops(torch.cuda.get_device_name(device), cfg.precision) if device.type == "cuda" else None
    return {"seq_len": seq_len, "forward_flops": f, "gflop_per_sample": per_sample / 1e9,
            "achieved_tflops": achieved, "datasheet_tflops": peak, "mfu": achieved / peak if peak else None}


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler: torch.amp.GradScaler,
               inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, cfg: TrainConfig,
               step_optimizer: bool = True) -> torch.Tensor:
    """Forward, loss (ITM + ``align_weight`` × ITC), backward; then, on the last micro-batch, the optimizer step.

    Returns the loss on the device: reading it is left to the caller, so a step never waits for the device.
    """
    if cfg.compile == "cudagraphs":  # a new iteration: the graphs may overwrite the previous step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(labels.device, cfg.precision):
        logits, align_loss = net(*inputs, labels) if cfg.align_weight else (net(*inputs), 0.0)
    with record_function("loss"):
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels) + cfg.align_weight * align_loss
    with record_function("backward"):
        scaler.scale(loss / cfg.grad_accum).backward()
    if step_optimizer:
        with record_function("optimizer_step"):
            scaler.unscale_(optimizer)
            # the optimizer's parameters are the trainable ones: no walk over (frozen) modules every step
            nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
    return loss.detach()


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
    return itm_metrics(logits, labels, split.name)


def lr_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(model: nn.Module, cfg: TrainConfig, fused: bool | None = None,
                   foreach: bool | None = None) -> torch.optim.AdamW:
    """Encoders at ``encoder_lr``, the fusion head at ``lr``; no weight decay on biases and norms.

    Fused by default (a few multi-tensor kernels per parameter group on CUDA, one vectorised pass per tensor on the
    CPU) where the parameters' device has it: the per-tensor loop's dozen ops per parameter are launches on a GPU,
    and on the reference CPU clip + step is 2.1–3.8× faster fused for the tiny models
    (``benchmarks/optimizer_step.py``, which passes ``fused`` / ``foreach`` as AdamW takes them to compare).
    """
    groups = []
    for params, lr in ((model.image_encoder.parameters(), cfg.encoder_lr),
                       (model.text_encoder.parameters(), cfg.encoder_lr),
                       (chain(model.fusion.parameters(), model.align.parameters()), cfg.lr)):
        params = [p for p in params if p.requires_grad]
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": cfg.weight_decay})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused, foreach=foreach)


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


def _restore_rng(ckpt: dict, d: Dist, device: torch.device, seed: int) -> None:
    """Each rank's own RNG stream (dropout) if the checkpoint was written by as many ranks, else a fresh one."""
    per_rank = ckpt.get("rank_rng") or [ckpt["rng"]]
    if len(per_rank) == d.world_size:
        _set_rng_state(per_rank[d.rank], device)
    else:
        seed_everything(seed + d.rank + 1000 * ckpt["epoch"])


def _check_same_view(d: Dist, ckpt_path: Path) -> None:
    """Every rank must see the same checkpoint (multi-node runs need --out on a shared filesystem)."""
    views = all_gather_objects(d, ckpt_path.exists())
    if len(set(views)) > 1:
        missing = [rank for rank, seen in enumerate(views) if not seen]
        raise UserError(f"{ckpt_path} is visible to some ranks but not to rank(s) {missing}: put --out on a "
                        "filesystem every node shares")


def _report_data(data: dict[str, SplitData], log: Callable[[str], None]) -> dict:
    out = {}
    for name, split in data.items():
        for line in split.report.lines(name):
            log(line)
        out[name] = {"images": split.n_images, "captions": split.n_captions, **split.report.to_dict()}
    return out


def _quiet(line: str) -> None:
    pass


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False, fresh: bool = False,
          progress: bool = True, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train one fusion model; returns the metrics record (also written to ``profiles/<run>/metrics.json``).

    One process, or one of ``torchrun``'s: then only rank 0 logs and writes, and every rank returns the record.
    """
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size, --epochs and --grad-accum must be at least 1")
    if cfg.cache_features and not model_cfg.freeze_encoders:
        raise UserError("--cache-features needs --freeze-encoders: trained encoders change their features every step")
    device = resolve_device(cfg.device)
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))  # records say which
    d, device = setup(device)
    try:
        if cfg.batch_size % d.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over "
                            f"{d.world_size} processes")
        return _train(cfg, model_cfg, d, device, resume, fresh, progress and d.is_main,
                      log if d.is_main else _quiet, on_epoch_end)
    finally:
        teardown(d)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, d: Dist, device: torch.device, resume: bool, fresh: bool,
           progress: bool, log: Callable[[str], None], on_epoch_end: Callable[[int], None] | None) -> dict:
    model_cfg = dataclasses.replace(model_cfg)  # filled in below (vocabulary, tokenizer): keep the caller's
    run = run_name(cfg, model_cfg)
    run_dir, profile_dir = Path(cfg.models_dir) / run, Path(cfg.profiles_dir) / run
    ckpt_path = run_dir / CHECKPOINT
    _check_same_view(d, ckpt_path)
    ckpt = None
    if ckpt_path.exists() and not fresh:
        if not resume:
            raise UserError(f"{ckpt_path} exists: pass --resume to continue it, --fresh to start over, "
                            "or --run-name NAME for a new run")
        ckpt = load_checkpoint(ckpt_path)
        saved = from_dict(ModelConfig, ckpt["model_config"])
        if (saved.fusion, ckpt["train_config"]["preset"]) != (model_cfg.fusion, cfg.preset):
            raise UserError(f"{ckpt_path} is a {ckpt['train_config']['preset']}/{saved.fusion} run, not "
                            f"{cfg.preset}/{model_cfg.fusion}")
        model_cfg = saved
        cfg = from_dict(TrainConfig, {**ckpt["train_config"], "device": cfg.device, "workers": cfg.workers})
        log(f"resuming {run} after epoch {ckpt['epoch']}/{cfg.epochs}")
    rank_batch = cfg.batch_size // d.world_size  # --batch-size is global; checked to divide in train()

    seed_everything(cfg.seed)  # the same initial weights on every rank
    with local_first(d):  # one process per node writes the data caches, its peers then read them
        tokenizer = build_tokenizer(with_run_tokenizer(model_cfg, run_dir), log)
        model_cfg.vocab_size = max(model_cfg.vocab_size, len(tokenizer))
        data, data_source = prepare_data(cfg.data, tokenizer, model_cfg.image_size, model_cfg.max_text_len,
                                         cfg.seed, image_cache=cfg.image_cache, limit_train=cfg.limit_train,
                                         limit_eval=cfg.limit_eval, progress=progress)
    data_summary = _report_data(data, log)
    train_split = data["train"]

    model = build_model(model_cfg).to(device)
    if d.enabled:
        seed_everything(cfg.seed + d.rank)  # but each rank its own dropout
    if ckpt is None:  # keep the tokenizer with the run: the checkpoint then needs nothing from outside
        if d.is_main:
            tokenizer.save_pretrained(run_dir / TOKENIZER)
        model_cfg.tokenizer = TOKENIZER
    # NHWC convolutions: faster with cuDNN, and with oneDNN on the CPU too (tiny/mid: 12 % per step on the
    # reference 2-core CPU, benchmarks/train_throughput.py); the inputs follow in to_inputs.
    model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    n_pairs = 2 * train_split.n_captions  # one positive + one negative per caption
    n_batches = math.ceil(math.ceil(n_pairs / rank_batch) / d.world_size)  # per rank, as DistributedSampler deals
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
        _restore_rng(ckpt, d, device, cfg.seed)
        start_epoch, history, train_seconds = ckpt["epoch"], ckpt["history"], ckpt["train_seconds"]
    net_model, feature_cache = model, None
    if cfg.cache_features:  # encode every split once; from here on the batches hold features, not pixels
        with local_first(d):
            caches = {name: cached_features(model, split, device, cfg.precision, progress=progress, log=log)
                      for name, split in data.items()}
        data = {name: caches[name].split(split) for name, split in data.items()}
        net_model = FusionHead(model)
        feature_cache = {name: {"key": c.key, "built": c.built, "seconds": c.seconds,
                                "image_shape": list(c.image.shape), "text_shape": list(c.text.shape)}
                         for name, c in caches.items()}
        train_split = data["train"]
    ddp = None
    if d.enabled:  # gradients are averaged across ranks during backward; the ITC-free run leaves `align` unused
        ddp = DistributedDataParallel(net_model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=not cfg.align_weight)
    step_model = ddp or net_model
    writer = SummaryWriter(str(Path(cfg.profiles_dir) / "tensorboard" / run)) if d.is_main else None

    def step(net, opt, sched, scl, batches, last_micro_batch: bool) -> torch.Tensor:
        """One micro-batch: fetch, then ``train_step``; the optimizer steps on the last micro-batch."""
        with record_function("data"):  # waiting for the loader + the host→device copy
            inputs, labels = to_inputs(next(batches), device)
        # Under DDP, the gradients of accumulated micro-batches are reduced once, with the last one.
        accumulate = ddp.no_sync() if ddp is not None and not last_micro_batch else contextlib.nullcontext()
        with accumulate:
            return train_step(net, opt, sched, scl, inputs, labels, cfg, last_micro_batch)

    step_profile = None
    if cfg.profile and d.is_main:  # a separate short run on a copy: the timed epochs are never profiled
        rng = _rng_state(device)
        net = copy.deepcopy(model)
        opt = make_optimizer(net, cfg)
        net = FusionHead(net) if cfg.cache_features else net
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        scl = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        batches = cycle(loader(train_split.batches(train_split.pairs(cfg.seed), rank_batch), cfg.workers,
                               pin_memory=device.type == "cuda"))
        trace = run_profiled(lambda i: step(net, opt, sched, scl, batches, True),
                             trace_dir(cfg.profiles_dir, f"train-{run}"), device)
        step_profile = step_breakdown(trace, TRAIN_RANGES)
        _set_rng_state(rng, device)
        del net, opt
        log(describe_step_profile(step_profile))
    barrier(d)  # the other ranks wait for rank 0's profile
    # After the profiled copy (deepcopy of a module compiled in place would call the original's blocks): the
    # timed epochs run compiled; the profile shows the eager step.
    step_model = compiled(step_model, cfg.compile, log)
    reset_peak_memory(device)
    log(f"{run}: {model_cfg.fusion} fusion, {count_parameters(model)['total'] / 1e6:.2f} M parameters, "
        f"{train_split.n_captions} train captions → {n_pairs} pairs/epoch, on {device} ({cfg.precision})"
        + (f", {d.world_size} processes ({d.backend}) × {rank_batch} = global batch {cfg.batch_size}"
           if d.enabled else ""))

    for epoch in range(start_epoch, cfg.epochs):
        # Every rank draws the same negatives and the same order (both from seed and epoch); the sampler then
        # deals batch i to rank i % world_size, so global batch k is the same pairs whatever the world size.
        pairs = train_split.pairs(cfg.seed, epoch)  # fresh negatives every epoch
        order = np.random.default_rng([cfg.seed, 100, epoch]).permutation(len(pairs))
        epoch_batches = train_split.batches(pairs, rank_batch, order)
        sampler = DistributedSampler(epoch_batches, d.world_size, d.rank, shuffle=False) if d.enabled else None
        batches = loader(epoch_batches, cfg.workers, pin_memory=device.type == "cuda", sampler=sampler)
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
        all_reduce_sum(d, loss_sum)  # also waits for the slowest rank: the epoch ends when all ranks are done
        synchronize(device)
        epoch_seconds = time.perf_counter() - epoch_start
        train_seconds += epoch_seconds
        broadcast_buffers(d, model)  # BatchNorm statistics of rank 0 everywhere: all ranks evaluate one model
        val = evaluate_split(net_model, data["val"], cfg.seed, cfg.batch_size, device, cfg.precision, d)
        record = {"epoch": epoch + 1, "loss": loss_sum.item() / (len(batches) * d.world_size),
                  "val_accuracy": val["accuracy"], "val_auc": val["auc"], "epoch_seconds": epoch_seconds,
                  "samples_per_s": n_pairs / epoch_seconds, "lr": scheduler.get_last_lr()[-1]}
        history.append(record)
        log(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  val acc {val['accuracy']:.1%}  "
            f"auc {val['auc']:.3f}  {record['samples_per_s']:.0f} samples/s  {epoch_seconds:.1f} s")
        rng = all_gather_objects(d, _rng_state(device))
        if d.is_main:
            for key in ("loss", "val_accuracy", "val_auc", "samples_per_s", "lr"):
                writer.add_scalar(f"train/{key}", record[key], epoch + 1)
            writer.flush()
            torch_save(ckpt_path, {
                "schema_version": SCHEMA_VERSION, "fusionprof_version": __version__, "epoch": epoch + 1,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng[0],
                "rank_rng": rng if d.enabled else None, "world_size": d.world_size,
                "model_config": to_dict(model_cfg), "train_config": to_dict(cfg), "history": history,
                "train_seconds": train_seconds,
            })
        barrier(d)  # nobody runs ahead of a checkpoint that is not written yet
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if writer is not None:
        writer.close()

    test = evaluate_split(net_model, data["test"], cfg.seed, cfg.batch_size, device, cfg.precision, d)
    log(f"test: accuracy {test['accuracy']:.1%}  auc {test['auc']:.3f}  on {test['pairs']} pairs")
    samples_per_s = len(history) * n_pairs / train_seconds
    metrics = {
        "schema_version": SCHEMA_VERSION, "kind": "train", "run": run, "fusion": model_cfg.fusion,
        "preset": cfg.preset, "checkpoint": str(ckpt_path), "data": data_source,
        "parameters": count_parameters(model), "forward_flops_per_sample": forward_flops(model),
        "flops_seq_len": model_cfg.max_text_len, "step_breakdown": step_profile and step_profile["ranges"],
        "step_profile": step_profile and step_profile["step"],
        "train_seconds": train_seconds, "epochs": cfg.epochs,
        "train_samples_per_s": samples_per_s,
        "train_flops": training_flops(model, cfg, train_split.batches(train_split.pairs(cfg.seed), rank_batch)
                                      .mean_length(), samples_per_s, device),
        "feature_cache": feature_cache,
        "distributed": {"world_size": d.world_size, "backend": d.backend, "batch_per_process": rank_batch},
        "peak_memory": peak_memory_mib(device),
        "val": {"accuracy": history[-1]["val_accuracy"], "auc": history[-1]["val_auc"]},
        "test": test, "history": history, "data_summary": data_summary,
        "skipped_total": sum(sum(split.report.skipped.values()) for split in data.values()),
        "environment": fingerprint(), "model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
    }
    if d.is_main:
        write_json(profile_dir / METRICS, metrics)
    return metrics
