"""A training run on disk: where its folder is, what its checkpoint holds, and how a stage reads it back.

Every stage that needs a trained model (evaluate, export, latency, compare) comes here, never to ``train.py``:
reading a checkpoint must not pull in the loop, TensorBoard or DDP. The layout of one run:

    <models_dir>/<run>/checkpoint.pt     weights, optimizer, scheduler, scaler, RNG, both configs, history
    <models_dir>/<run>/tokenizer/        the tokenizer it was trained with (the run needs nothing from outside)
    <profiles_dir>/<run>/metrics.json    the training record

``<run>`` is ``--run-name`` when given, else ``<preset>-<fusion>``: the one place that rule is spelled.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch

from fusionprof import SCHEMA_VERSION, __version__
from fusionprof.atomic import torch_save
from fusionprof.config import ModelConfig, TrainConfig, from_dict, to_dict
from fusionprof.errors import UserError
from fusionprof.models import FusionModel, build_model

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
TOKENIZER = "tokenizer"  # a folder beside the checkpoint
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")  # what save_pretrained writes, one of them at least


def run_name(preset: str, fusion: str, run: str | None = None) -> str:
    """A run's name: the one given, else ``<preset>-<fusion>``."""
    return run or f"{preset}-{fusion}"


def checkpoint_path(models_dir: str | Path, preset: str, fusion: str, run: str | None = None) -> Path:
    return Path(models_dir) / run_name(preset, fusion, run) / CHECKPOINT


def metrics_path(profiles_dir: str | Path, run: str) -> Path:
    return Path(profiles_dir) / run / METRICS


def with_run_tokenizer(model_cfg: ModelConfig, run_dir: Path) -> ModelConfig:
    """A checkpoint names its tokenizer relative to its own folder, wherever that folder has moved.

    Every run saves that folder, whatever tokenizer it used, so one that is gone is an error: the shipped
    vocabulary would stand in without a word, give the captions other token ids, and a wrong accuracy."""
    if model_cfg.tokenizer != TOKENIZER:
        return model_cfg
    folder = run_dir / TOKENIZER
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problem = "holds no tokenizer.json or vocab.txt" if folder.is_dir() else "no such folder"
        raise UserError(f"{folder}: {problem}; the run was trained with the tokenizer saved there, and any other "
                        f"vocabulary gives its captions other token ids: copy the run's {TOKENIZER}/ folder back "
                        f"beside {CHECKPOINT}")
    return dataclasses.replace(model_cfg, tokenizer=str(folder))


def save_checkpoint(path: Path, *, epoch: int, model: torch.nn.Module, optimizer, scheduler, scaler,
                    rank_rng: list[dict], model_cfg: ModelConfig, cfg: TrainConfig, history: list[dict],
                    train_seconds: float) -> None:
    """Everything needed to continue bit for bit, written atomically (a kill never leaves half a file).

    ``rank_rng`` holds every rank's RNG state, rank 0's first."""
    torch_save(path, {
        "schema_version": SCHEMA_VERSION, "fusionprof_version": __version__, "epoch": epoch,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(), "rng": rank_rng[0], "rank_rng": rank_rng if len(rank_rng) > 1 else None,
        "world_size": len(rank_rng), "model_config": to_dict(model_cfg), "train_config": to_dict(cfg),
        "history": history, "train_seconds": train_seconds,
    })


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


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[FusionModel, TrainConfig]:
    """The checkpoint's model in eval mode on ``device``, and the config it was trained with."""
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
    return model.to(device).eval(), from_dict(TrainConfig, ckpt["train_config"])



def find_checkpoint(models_dir: str | Path, preset: str, fusion: str) -> Path | None:
    """A trained run of ``preset`` / ``fusion``: the default folder's checkpoint when there is one, else the newest
    ``*/checkpoint.pt`` (a run named with ``--run-name``) whose configs say that preset and fusion, else None."""
    default = checkpoint_path(models_dir, preset, fusion)
    if default.exists():
        found = _preset_fusion(default)
        if found not in (None, (preset, fusion)):  # timed and labelled as the folder's, it would be another model's
            raise UserError(f"{default}: holds a {found[0]} {found[1]} model, not {preset} {fusion}; move it to "
                            f"its own run folder")
        return default  # unreadable: whoever loads it says so
    for path in sorted(Path(models_dir).glob(f"*/{CHECKPOINT}"), key=lambda p: p.stat().st_mtime, reverse=True):
        if _preset_fusion(path) == (preset, fusion):
            return path
    return None


def _preset_fusion(path: Path) -> tuple[str, str] | None:
    """The preset and fusion a checkpoint's configs say; None for a half-written or foreign file. mmap: only the two
    small config dicts are read, not the weights and optimizer state."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return ckpt["train_config"]["preset"], ckpt["model_config"]["fusion"]
    except Exception:  # torch, zip and pickle raise their own types
        return None


def checkpoint_hash(checkpoint: str | Path) -> str:
    """A digest of the checkpoint file: an export records it, and an export whose checkpoint has changed since
    (retrained, resumed, replaced) is never reused as if it were the checkpoint's.

    Computed once per version of the file (its path, size and modification time): a sweep asks for it for every
    artifact of every fusion, and a seed checkpoint with its optimizer state is over a gigabyte."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


_HASHES: dict[tuple[Path, int, int], str] = {}
