"""The training loop: one flat loop a reader can hold in their head (nanoGPT-style).

``_train`` is the spine — set up, resume, epochs, test, record — and everything it calls has a name that says
what it does, below it in the order it is called. AdamW, linear warm-up + cosine decay, gradient clipping,
autocast, gradient accumulation, optional ``torch.compile``. Each epoch ends with validation and an atomic
checkpoint that holds everything needed to continue bit-for-bit (weights, optimizer, scheduler, scaler, RNG,
configs, history); ``resume=True`` picks it up after a kill. At the end: the test split, and ``metrics.json``.

Under ``torchrun`` the same loop runs data-parallel (``DistributedDataParallel``, see ``distributed.py``):
``--batch-size`` stays the *global* batch, split evenly over the processes, and the global batch k of an epoch
holds the same pairs whatever the number of processes. Only rank 0 writes files.

Nothing but the CLI, ``compare`` and the benchmarks imports this module: the stages that read a run use
``checkpoint.py`` and ``evaluate.py``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
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

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.atomic import write_json
from fusionprof.checkpoint import (
    CHECKPOINT,
    TOKENIZER,
    checkpoint_hash,
    load_checkpoint,
    metrics_path,
    run_name,
    save_checkpoint,
    with_run_tokenizer,
)
from fusionprof.config import ModelConfig, TrainConfig, from_dict, to_dict
from fusionprof.data import SplitData, default_data_dir, prepare_data
from fusionprof.data.coco import find_layout
from fusionprof.data.itm import Batch, Pairs, loader
from fusionprof.data.text import build_tokenizer
from fusionprof.distributed import (
    Dist,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    local_first,
    setup,
    teardown,
)
from fusionprof.env import fingerprint, utc_stamp
from fusionprof.errors import UserError
from fusionprof.evaluate import evaluate_split, to_inputs
from fusionprof.features import cached_features
from fusionprof.measure import datasheet_tflops
from fusionprof.metrics import describe_scores, time_to_best
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


def train(cfg: TrainConfig, model_cfg: ModelConfig, resume: bool = False, fresh: bool = False,
          progress: bool = True, log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int], None] | None = None, asked: Collection[str] = ()) -> dict:
    """Train one fusion model; returns the metrics record (also written to ``profiles/<run>/metrics.json``).

    One process, or one of ``torchrun``'s: then only rank 0 logs and writes, and every rank returns the record.
    ``asked``: the config fields the user set (the CLI's explicit options). A resumed run keeps its own settings,
    so one of these that differs from the run's is refused, unless it says only how the run is carried out
    (``RESUME_MAY_CHANGE``).
    """
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.grad_accum < 1:
        raise UserError("--batch-size, --epochs and --grad-accum must be at least 1")
    if cfg.cache_features and not model_cfg.freeze_encoders:
        raise UserError("--cache-features needs --freeze-encoders: trained encoders change their features every step")
    if cfg.data is not None:  # the run records its dataset: evaluate, export and load read it from any folder
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)  # "auto" made concrete: records say which
    d, device = setup(device)
    try:
        if cfg.batch_size % d.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch: it must split evenly over "
                            f"{d.world_size} processes")
        return _train(cfg, model_cfg, d, device, precision, resume, fresh, progress and d.is_main,
                      log if d.is_main else _quiet, on_epoch_end, asked)
    finally:
        teardown(d)


def _train(cfg: TrainConfig, model_cfg: ModelConfig, d: Dist, device: torch.device, precision: str, resume: bool,
           fresh: bool, progress: bool, log: Callable[[str], None], on_epoch_end: Callable[[int], None] | None,
           asked: Collection[str]) -> dict:
    """The spine: set up → resume → epochs → test → record."""
    run = run_name(cfg.preset, model_cfg.fusion, cfg.run)
    ckpt_path = Path(cfg.models_dir) / run / CHECKPOINT
    ckpt, cfg, model_cfg = resume_or_start(ckpt_path, cfg, model_cfg, d, resume, fresh, log, asked, precision)
    seed_everything(cfg.seed)  # the same initial weights on every rank
    data, data_source, model_cfg = prepare_run_data(cfg, model_cfg, ckpt_path.parent, d, ckpt is None, progress, log)
    raw_model = build_model(model_cfg).to(device)
    # NHWC convolutions: faster with cuDNN, and with oneDNN on the CPU too (tiny/mid: 12 % per step on the
    # reference 2-core CPU, benchmarks/train_throughput.py); the inputs follow in to_inputs.
    raw_model = raw_model.to(memory_format=torch.channels_last)
    if d.enabled:
        seed_everything(cfg.seed + d.rank)  # but each rank its own dropout
    rank_batch = cfg.batch_size // d.world_size  # --batch-size is global; checked to divide in train()
    opt = Optimization.create(raw_model, cfg, device, cfg.epochs * steps_per_epoch(data["train"], cfg, d))
    start_epoch, history, train_seconds = 0, [], 0.0
    if ckpt is not None:
        start_epoch, history, train_seconds = restore(ckpt, raw_model, opt, d, device, cfg.seed)
    data, net, feature_cache = with_feature_cache(raw_model, data, cfg, device, d, progress, log)
    step_profile = None
    if cfg.profile and d.is_main:
        step_profile = profile_steps(net, opt, data["train"], rank_batch, cfg, device, run, log)
    barrier(d)  # the other ranks wait for rank 0's profile
    # Under DDP the gradients are averaged across ranks during backward; the ITC-free run leaves `align` unused.
    model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                    find_unused_parameters=not cfg.align_weight) if d.enabled else net
    no_sync = model.no_sync if d.enabled else None
    model = compiled(model, cfg.compile, log)  # the timed epochs run compiled; the profile shows the eager step
    reset_peak_memory(device)
    log(describe_run(run, raw_model, data["train"], cfg, device, d))
    writer = SummaryWriter(str(Path(cfg.profiles_dir) / "tensorboard" / run)) if d.is_main else None

    ours = contention.tree_of_this_run(torchrun=d.enabled)  # DataLoader workers and local ranks are no neighbours
    for epoch in range(start_epoch, cfg.epochs):
        with contention.watch(ours) as others:
            loss, seconds = run_epoch(model, opt, data["train"], epoch, cfg, d, device, progress, no_sync)
        train_seconds += seconds
        broadcast_buffers(d, raw_model)  # BatchNorm statistics of rank 0 everywhere: all ranks evaluate one model
        val = evaluate_split(net, data["val"], cfg.seed, cfg.batch_size, device, cfg.precision, d)
        history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": val["accuracy"], "val_auc": val["auc"],
                        "val_non_finite": val["non_finite"], "epoch_seconds": seconds,
                        "samples_per_s": pairs_per_epoch(data["train"]) / seconds,
                        "lr": opt.scheduler.get_last_lr()[-1], "contention": others,
                        "first_in_process": epoch == start_epoch})  # a warm-up epoch, also after --resume
        log(describe_epoch(history[-1], cfg.epochs))
        rank_rng = all_gather_objects(d, rng_state(device))
        if d.is_main:
            log_scalars(writer, history[-1])
            save_checkpoint(ckpt_path, epoch=epoch + 1, model=raw_model, optimizer=opt.optimizer,
                            scheduler=opt.scheduler, scaler=opt.scaler, rank_rng=rank_rng, model_cfg=model_cfg,
                            cfg=cfg, history=history, train_seconds=train_seconds)
        barrier(d)  # nobody runs ahead of a checkpoint that is not written yet
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1)
    if writer is not None:
        writer.close()

    test = evaluate_split(net, data["test"], cfg.seed, cfg.batch_size, device, cfg.precision, d)
    log(f"test: {describe_scores(test)}  on {test['pairs']} pairs")
    metrics = build_metrics(run, cfg, model_cfg, raw_model, data, data_source, history, train_seconds, test,
                            step_profile, feature_cache, d, device, ckpt_path)
    if d.is_main:
        write_json(metrics_path(cfg.profiles_dir, run), metrics)
    return metrics


# --- set up and resume ------------------------------------------------------------------------------------------


# On --resume the run keeps the settings it was started with. These say where and how it is carried out, not what
# is trained, so the caller's win: always for the device and the workers, and when asked for the others.
RESUME_TAKES = ("device", "workers")
DERIVED = ("data_layout",)  # found when the run started, never asked for
RESUME_MAY_CHANGE = ("profile", "compile", "image_cache", "profiles_dir")
OPTION_NAMES = {"models_dir": "--out", "profiles_dir": "--profiles", "run": "--run-name"}


def resume_or_start(ckpt_path: Path, cfg: TrainConfig, model_cfg: ModelConfig, d: Dist, resume: bool, fresh: bool,
                    log: Callable[[str], None], asked: Collection[str] = (), precision: str | None = None
                    ) -> tuple[dict | None, TrainConfig, ModelConfig]:
    """The run's checkpoint and the configs it was written with when resuming; (None, the given configs, in
    ``precision``: ``cfg``'s made concrete) when starting. A checkpoint that exists is never overwritten by accident,
    and a setting the user asked for is never silently dropped: one that would change what the run trains is refused
    (see ``train``)."""
    _check_same_view(d, ckpt_path)
    model_cfg = dataclasses.replace(model_cfg)  # filled in later (vocabulary, tokenizer): keep the caller's
    asked_precision, cfg = cfg.precision, dataclasses.replace(cfg, precision=precision or cfg.precision)
    if not ckpt_path.exists() or fresh:
        return None, cfg, model_cfg
    if not resume:
        raise UserError(f"{ckpt_path} exists: pass --resume to continue it, --fresh to start over, "
                        "or --run-name NAME for a new run")
    ckpt = load_checkpoint(ckpt_path)
    saved = from_dict(ModelConfig, ckpt["model_config"])
    if (saved.fusion, ckpt["train_config"]["preset"]) != (model_cfg.fusion, cfg.preset):
        raise UserError(f"{ckpt_path} is a {ckpt['train_config']['preset']}/{saved.fusion} run, not "
                        f"{cfg.preset}/{model_cfg.fusion}")
    run_cfg = from_dict(TrainConfig, ckpt["train_config"])
    changed = [name for name in asked if name in RESUME_MAY_CHANGE and getattr(cfg, name) != getattr(run_cfg, name)]
    where = {"run", "models_dir"}  # they found the checkpoint, however they are spelt
    shown = {"precision": f"auto ({cfg.precision} here)"} if asked_precision == "auto" else {}
    refused = _differences(asked, cfg, run_cfg, {*RESUME_TAKES, *RESUME_MAY_CHANGE, *where, *DERIVED}, shown) + \
        _differences(asked, model_cfg, saved, {"fusion", "tokenizer", "vocab_size"})
    if refused:
        raise OtherSettings(ckpt_path, refused)
    cfg = dataclasses.replace(run_cfg, **{name: getattr(cfg, name) for name in (*RESUME_TAKES, *changed)})
    now = ", ".join(f"{_option(name)} {getattr(cfg, name)}" for name in changed)
    log(f"resuming {ckpt_path.parent.name} after epoch {ckpt['epoch']}/{cfg.epochs}" + (f" (now {now})" if now else ""))
    return ckpt, cfg, saved


class OtherSettings(UserError):
    """--resume of a run started with other settings than those asked for; ``differences`` names each one."""

    def __init__(self, checkpoint: Path, differences: list[str]):
        self.checkpoint, self.differences = checkpoint, differences
        super().__init__(f"--resume continues {checkpoint.parent.name} as it was started, and these differ from it: "
                         f"{'; '.join(differences)}. Leave them out, or start over with --fresh or a new --run-name")


def _differences(asked: Collection[str], given: object, run: object, free: set[str],
                 shown: dict[str, str] | None = None) -> list[str]:
    """'--option given (the run's: value)' for each asked field of ``given`` that is not ``run``'s; ``shown``: how
    to print a given value that is not the one typed (``auto``)."""
    out = []
    for name in sorted(set(asked) & {f.name for f in dataclasses.fields(run)} - free):
        a, b = getattr(given, name), getattr(run, name)
        if name in ("data", "image_weights") and a is not None and b is not None:
            a, b = str(Path(a).resolve()), str(Path(b).resolve())  # one file, however it is spelt
        if a != b:
            out.append(f"{_option(name)} {(shown or {}).get(name, getattr(given, name))} "
                       f"(the run's: {getattr(run, name)})")
    return out


def _option(name: str) -> str:
    return OPTION_NAMES.get(name, "--" + name.replace("_", "-"))


def _check_same_view(d: Dist, ckpt_path: Path) -> None:
    """Every rank must see the same checkpoint (multi-node runs need --out on a shared filesystem)."""
    views = all_gather_objects(d, ckpt_path.exists())
    if len(set(views)) > 1:
        missing = [rank for rank, seen in enumerate(views) if not seen]
        raise UserError(f"{ckpt_path} is visible to some ranks but not to rank(s) {missing}: put --out on a "
                        "filesystem every node shares")


def prepare_run_data(cfg: TrainConfig, model_cfg: ModelConfig, run_dir: Path, d: Dist, new_run: bool,
                     progress: bool, log: Callable[[str], None]) -> tuple[dict[str, SplitData], str, ModelConfig]:
    """The tokenized splits and where they came from; a new run keeps its tokenizer beside its checkpoint, so the
    checkpoint needs nothing from outside, and records the dataset's layout in ``cfg``, so what reads the run later
    reads the splits it was trained on."""
    with local_first(d):  # one process per node writes the data caches, its peers then read them
        tokenizer = build_tokenizer(with_run_tokenizer(model_cfg, run_dir), log)
        model_cfg.vocab_size = max(model_cfg.vocab_size, len(tokenizer))
        cfg.data_layout = cfg.data_layout or find_layout(cfg.data or default_data_dir(progress))
        data, data_source = prepare_data(cfg.data, tokenizer, model_cfg.image_size, model_cfg.max_text_len,
                                         cfg.seed, image_cache=cfg.image_cache, limit_train=cfg.limit_train,
                                         limit_eval=cfg.limit_eval, progress=progress, layout=cfg.data_layout)
    if len(layouts := set(all_gather_objects(d, cfg.data_layout))) > 1:
        raise UserError(f"the processes found different dataset layouts under {cfg.data or 'the embedded dataset'} "
                        f"({', '.join(sorted(layouts))}): every node needs the same copy of the dataset")
    for name, split in data.items():
        for line in split.report.lines(name):
            log(line)
    if new_run:
        if d.is_main:
            tokenizer.save_pretrained(run_dir / TOKENIZER)
        model_cfg.tokenizer = TOKENIZER
    return data, data_source, model_cfg


def pairs_per_epoch(split: SplitData) -> int:
    return 2 * split.n_captions  # one positive + one negative per caption


def steps_per_epoch(split: SplitData, cfg: TrainConfig, d: Dist) -> int:
    rank_batch = cfg.batch_size // d.world_size
    n_batches = math.ceil(math.ceil(pairs_per_epoch(split) / rank_batch) / d.world_size)  # as DistributedSampler deals
    return math.ceil(n_batches / cfg.grad_accum)


@dataclass
class Optimization:
    """What steps the weights: AdamW, its learning-rate schedule and the fp16 gradient scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, model: FusionModel, cfg: TrainConfig, device: torch.device, total_steps: int,
               fused: bool | None = None) -> Optimization:
        optimizer = make_optimizer(model, cfg, fused=fused)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup_steps, total_steps))
        return cls(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16"))

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


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


def lr_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to 1, then cosine decay to 0 over the remaining steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def restore(ckpt: dict, model: FusionModel, opt: Optimization, d: Dist, device: torch.device,
            seed: int) -> tuple[int, list[dict], float]:
    """Weights, optimizer, schedule, scaler and RNG as the checkpoint left them; returns (epochs done, history,
    training seconds so far)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt)
    per_rank = ckpt.get("rank_rng") or [ckpt["rng"]]
    if len(per_rank) == d.world_size:  # each rank's own RNG stream (dropout)
        set_rng_state(per_rank[d.rank], device)
    else:  # written by another number of ranks: a fresh stream per rank
        seed_everything(seed + d.rank + 1000 * ckpt["epoch"])
    return ckpt["epoch"], ckpt["history"], ckpt["train_seconds"]


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def with_feature_cache(model: FusionModel, data: dict[str, SplitData], cfg: TrainConfig, device: torch.device,
                       d: Dist, progress: bool, log: Callable[[str], None]
                       ) -> tuple[dict[str, SplitData], nn.Module, dict | None]:
    """(the splits, the module the batches feed, what the feature cache did): with ``--cache-features`` every
    split is encoded once and its batches hold features, fed to the fusion head; else pixels, fed to the model."""
    if not cfg.cache_features:
        return data, model, None
    with local_first(d):
        caches = {name: cached_features(model, split, device, cfg.precision, progress=progress, log=log)
                  for name, split in data.items()}
    record = {name: {"key": c.key, "built": c.built, "seconds": c.seconds, "image_shape": list(c.image.shape),
                     "text_shape": list(c.text.shape)} for name, c in caches.items()}
    return {name: caches[name].split(split) for name, split in data.items()}, FusionHead(model), record


def profile_steps(net: nn.Module, opt: Optimization, split: SplitData, batch_size: int, cfg: TrainConfig,
                  device: torch.device, run: str, log: Callable[[str], None]) -> dict:
    """Trace a few training steps in a run of their own (the timed epochs are never profiled), then put the
    weights, optimizer, schedule, scaler and RNG back as they were: the run goes on as if it had not happened."""
    saved = copy.deepcopy({"net": net.state_dict(), "opt": opt.state_dict()})
    rng = rng_state(device)
    batches = cycle(loader(split.batches(split.pairs(cfg.seed), batch_size), cfg.workers,
                           pin_memory=device.type == "cuda"))
    out = trace_dir(cfg.profiles_dir, f"train-{run}")
    trace = run_profiled(lambda i: micro_step(net, opt, batches, cfg, device), out, device)
    net.load_state_dict(saved["net"])
    opt.load_state_dict(saved["opt"])
    set_rng_state(rng, device)
    profile = step_breakdown(trace, TRAIN_RANGES)
    log(describe_step_profile(profile))
    return profile


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


# --- the epoch ---------------------------------------------------------------------------------------------------


def run_epoch(model: nn.Module, opt: Optimization, split: SplitData, epoch: int, cfg: TrainConfig, d: Dist,
              device: torch.device, progress: bool, no_sync: Callable | None) -> tuple[float, float]:
    """One pass over the split's pairs: (mean loss over every rank's batches, seconds)."""
    # Every rank draws the same pairs in the same order; the sampler then deals batch i to rank i % world_size,
    # so global batch k is the same pairs whatever the world size.
    pairs, order = epoch_pairs(split, cfg.seed, epoch)
    epoch_batches = split.batches(pairs, cfg.batch_size // d.world_size, order)
    sampler = DistributedSampler(epoch_batches, d.world_size, d.rank, shuffle=False) if d.enabled else None
    batches = loader(epoch_batches, cfg.workers, pin_memory=device.type == "cuda", sampler=sampler)
    model.train()
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync per step
    synchronize(device)
    start = time.perf_counter()
    batch_iter = iter(batches)
    bar = tqdm(range(len(batches)), desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
    for i in bar:
        last_micro_batch = (i + 1) % cfg.grad_accum == 0 or i + 1 == len(batches)
        group = accumulation_group(i, len(batches), cfg.grad_accum)
        loss_sum += micro_step(model, opt, batch_iter, cfg, device, last_micro_batch, no_sync, group)
        if progress and i % 20 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / (i + 1):.3f}")
    all_reduce_sum(d, loss_sum)  # also waits for the slowest rank: the epoch ends when all ranks are done
    synchronize(device)
    seconds = time.perf_counter() - start
    return loss_sum.item() / (len(batches) * d.world_size), seconds


def epoch_pairs(split: SplitData, seed: int, epoch: int) -> tuple[Pairs, np.ndarray]:
    """An epoch's pairs (fresh negatives every epoch) and the order they are visited in, both from seed and epoch."""
    pairs = split.pairs(seed, epoch)
    return pairs, np.random.default_rng([seed, 100, epoch]).permutation(len(pairs))


def accumulation_group(i: int, n: int, accum: int) -> int:
    """How many micro-batches the optimizer step of micro-batch ``i`` (of an epoch's ``n``) averages: ``accum``, and
    the rest in an epoch's last group when ``n`` is no multiple of it."""
    return min(accum, n - i // accum * accum)


def micro_step(model: nn.Module, opt: Optimization, batches: Iterator[Batch], cfg: TrainConfig, device: torch.device,
               last_micro_batch: bool = True, no_sync: Callable | None = None,
               group: int | None = None) -> torch.Tensor:
    """One micro-batch: fetch it, then ``train_step``; the optimizer steps on the last micro-batch of its ``group``."""
    with record_function("data"):  # waiting for the loader + the host→device copy (of every field, once)
        batch = next(batches).to(device, non_blocking=device.type == "cuda")
        inputs, labels = to_inputs(batch, device)  # on the device already: only the images' normalisation is left
    # Under DDP, the gradients of accumulated micro-batches are reduced once, with the last one.
    accumulate = no_sync() if no_sync is not None and not last_micro_batch else contextlib.nullcontext()
    with accumulate:
        return train_step(model, opt, inputs, labels, cfg, last_micro_batch, batch.image_index, group)


def train_step(model: nn.Module, opt: Optimization, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor,
               cfg: TrainConfig, step_optimizer: bool = True, image_index: torch.Tensor | None = None,
               group: int | None = None) -> torch.Tensor:
    """Forward, loss (ITM + ``align_weight`` × ITC), backward; then, on the last micro-batch, the optimizer step.
    The loss is divided by the micro-batches of its step (``group``; ``--grad-accum`` if not given), so that an
    epoch's short last group steps with their mean gradient, not a fraction of it.

    Returns the loss on the device: reading it is left to the caller, so a step never waits for the device.
    """
    if cfg.compile == "cudagraphs":  # a new iteration: the graphs may overwrite the previous step's outputs
        torch.compiler.cudagraph_mark_step_begin()
    with autocast(labels.device, cfg.precision):
        logits, align_loss = model(*inputs, labels, image_index) if cfg.align_weight else (model(*inputs), 0.0)
    with record_function("loss"):
        loss = F.binary_cross_entropy_with_logits(logits.float(), labels) + cfg.align_weight * align_loss
    with record_function("backward"):
        opt.scaler.scale(loss / (group or cfg.grad_accum)).backward()
    if step_optimizer:
        with record_function("optimizer_step"):
            opt.scaler.unscale_(opt.optimizer)
            # the optimizer's parameters are the trainable ones: no walk over (frozen) modules every step
            nn.utils.clip_grad_norm_([p for group in opt.optimizer.param_groups for p in group["params"]],
                                     cfg.grad_clip)
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.optimizer.zero_grad(set_to_none=True)
            opt.scheduler.step()
    return loss.detach()


# --- what the run says and records -------------------------------------------------------------------------------


def _quiet(line: str) -> None:
    pass


def describe_run(run: str, model: FusionModel, split: SplitData, cfg: TrainConfig, device: torch.device,
                 d: Dist) -> str:
    return (f"{run}: {model.cfg.fusion} fusion, {count_parameters(model)['total'] / 1e6:.2f} M parameters, "
            f"{split.n_captions} train captions → {pairs_per_epoch(split)} pairs/epoch, on {device} "
            f"({cfg.precision})" + (f", {d.world_size} processes ({d.backend}) × {cfg.batch_size // d.world_size} "
                                    f"= global batch {cfg.batch_size}" if d.enabled else ""))


def describe_epoch(record: dict, epochs: int) -> str:
    val = (f"val acc {record['val_accuracy']:.1%}  auc {record['val_auc']:.3f}" if record["val_accuracy"] is not None
           else f"val acc –  auc –  ({record['val_non_finite']} non-finite logits)")
    return (f"epoch {record['epoch']}/{epochs}  loss {record['loss']:.4f}  {val}  {record['samples_per_s']:.0f} "
            f"samples/s  {record['epoch_seconds']:.1f} s" + contention.tag(record.get("contention")))


def log_scalars(writer: SummaryWriter, record: dict) -> None:
    """The epoch's curves for TensorBoard's scalars tab; a validation score that is undefined (non-finite logits)
    leaves a gap, not a point."""
    for key in ("loss", "val_accuracy", "val_auc", "samples_per_s", "lr"):
        if record[key] is not None:
            writer.add_scalar(f"train/{key}", record[key], record["epoch"])
    writer.flush()


def training_flops(model: FusionModel, cfg: TrainConfig, seq_len: float, samples_per_s: float,
                   device: torch.device, world_size: int = 1) -> dict:
    """What a training sample costs and the rate the run achieved: the forward counted at the epoch's mean caption
    length; ×3 for what trains (the backward costs about two forwards), ×1 for frozen encoders, nothing for
    encoders read from the feature cache. MFU against the datasheet peak on a known GPU in bf16 / fp16.

    ``samples_per_s`` is the whole run's rate, so ``achieved_tflops`` is all ``world_size`` processes together;
    the MFU divides each process's share by one GPU's peak (``datasheet_tflops``), not the sum by one GPU's.
    """
    f = forward_flops(model, seq_len=round(seq_len))
    encoders = f["image_encoder"] + f["text_encoder"]
    head = f["total"] - encoders
    per_sample = 3 * head + (0 if cfg.cache_features else 1 if model.cfg.freeze_encoders else 3) * encoders
    achieved = per_sample * samples_per_s / 1e12
    per_process = achieved / world_size
    peak = datasheet_tflops(torch.cuda.get_device_name(device), cfg.precision) if device.type == "cuda" else None
    return {"seq_len": seq_len, "forward_flops": f, "gflop_per_sample": per_sample / 1e9,
            "achieved_tflops": achieved, "achieved_tflops_per_process": per_process, "datasheet_tflops": peak,
            "mfu": per_process / peak if peak else None}


def warm_up_epoch(history: list[dict], index: int) -> bool:
    """Whether ``history[index]`` was the first epoch of its process, which pays for compiling, cache warm-up,
    the allocator and first-shape kernel plans: the run's first, and the first after each ``--resume``. Histories
    written before epochs said so (no ``first_in_process``) know only of the run's first."""
    return index == 0 or bool(history[index].get("first_in_process"))


def steady_samples_per_s(history: list[dict], pairs: int) -> float | None:
    """Samples/s over the epochs that were no process's first (``warm_up_epoch``); None when every one was."""
    steady = [h["epoch_seconds"] for i, h in enumerate(history) if not warm_up_epoch(history, i)]
    return len(steady) * pairs / sum(steady) if steady else None


def build_metrics(run: str, cfg: TrainConfig, model_cfg: ModelConfig, model: FusionModel,
                  data: dict[str, SplitData], data_source: str, history: list[dict], train_seconds: float,
                  test: dict, step_profile: dict | None, feature_cache: dict | None, d: Dist, device: torch.device,
                  ckpt_path: Path) -> dict:
    """The training record: what was trained, on what, how fast, how well, and on which machine."""
    train_split = data["train"]
    rank_batch = cfg.batch_size // d.world_size
    samples_per_s = len(history) * pairs_per_epoch(train_split) / train_seconds
    steady = steady_samples_per_s(history, pairs_per_epoch(train_split))
    mean_length = train_split.batches(train_split.pairs(cfg.seed), rank_batch).mean_length()
    return {
        "schema_version": SCHEMA_VERSION, "kind": "train", "created": utc_stamp(), "run": run,
        "fusion": model_cfg.fusion, "preset": cfg.preset, "checkpoint": str(ckpt_path), "data": data_source,
        # which model this is where one path later holds another (the same /tmp folder on another day's machine)
        "checkpoint_hash": checkpoint_hash(ckpt_path) if ckpt_path.exists() else None,
        "parameters": count_parameters(model), "forward_flops_per_sample": forward_flops(model),
        "flops_seq_len": model_cfg.max_text_len, "step_breakdown": step_profile and step_profile["ranges"],
        "step_profile": step_profile and step_profile["step"],
        "train_seconds": train_seconds, "time_to_best": time_to_best(history), "epochs": cfg.epochs,
        "train_samples_per_s": samples_per_s,
        "contention": contention.combine([h.get("contention") or {} for h in history]),  # beside other processes?
        "first_epoch_seconds": history[0]["epoch_seconds"], "steady_samples_per_s": steady,
        # the sustained rate where there is one: a first epoch's compile or cache build is not training speed
        "train_flops": training_flops(model, cfg, mean_length, steady or samples_per_s, device, d.world_size),
        "feature_cache": feature_cache,
        "distributed": {"world_size": d.world_size, "backend": d.backend, "batch_per_process": rank_batch},
        "peak_memory": peak_memory_mib(device),
        "val": {"accuracy": history[-1]["val_accuracy"], "auc": history[-1]["val_auc"],
                "non_finite": history[-1].get("val_non_finite", 0)},  # histories before the count: finite
        "test": test, "history": history,
        "data_summary": {name: {"images": split.n_images, "captions": split.n_captions, **split.report.to_dict()}
                         for name, split in data.items()},
        "skipped_total": sum(sum(split.report.skipped.values()) for split in data.values()),
        "environment": fingerprint(), "model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
    }
