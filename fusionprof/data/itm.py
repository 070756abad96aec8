"""Image–text matching pairs and batches.

Every caption gives one positive (its own image) and one negative: the same image with a caption of a
*different* image (never another caption of the same image). Train negatives are re-drawn each epoch;
val/test negatives come from a fixed seed, so accuracy is comparable run to run and machine to machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fusionprof.errors import UserError

_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}


@dataclass
class Pairs:
    image: np.ndarray  # int64 [P]: image index
    caption: np.ndarray  # int64 [P]: caption index
    label: np.ndarray  # float32 [P]: 1 = the caption describes the image

    def __len__(self) -> int:
        return len(self.label)


def draw_negatives(caption_image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each caption c, the index of a caption whose image differs from c's image."""
    if len(np.unique(caption_image)) < 2:
        raise UserError("image–text matching needs captions of at least two different images in a split")
    n = len(caption_image)
    negative = rng.integers(0, n, size=n)
    same = caption_image[negative] == caption_image
    while same.any():  # redraw only the clashes; the expected number of rounds is tiny
        negative[same] = rng.integers(0, n, size=int(same.sum()))
        same = caption_image[negative] == caption_image
    return negative


def make_pairs(caption_image: np.ndarray, rng: np.random.Generator) -> Pairs:
    n = len(caption_image)
    negative = draw_negatives(caption_image, rng)
    return Pairs(
        image=np.concatenate([caption_image, caption_image]),
        caption=np.concatenate([np.arange(n), negative]),
        label=np.concatenate([np.ones(n, np.float32), np.zeros(n, np.float32)]),
    )


def split_rng(seed: int, split: str, epoch: int = 0) -> np.random.Generator:
    """Train: a new draw per epoch. Val/test: one fixed draw per (seed, split), whatever the epoch."""
    return np.random.default_rng([seed, _SPLIT_CODE[split], epoch if split == "train" else 0])


@dataclass
class Batch:
    image: torch.Tensor  # uint8 pixels [B, S, S, 3], or float32 cached feature maps [B, C, h, w]
    text: torch.Tensor  # int64 token ids [B, L], or float32 cached token states [B, L, D]
    attention_mask: torch.Tensor  # int64 [B, L]
    labels: torch.Tensor  # float32 [B]
    image_index: torch.Tensor | None = None  # int64 [B]: which image each pair shows (the contrastive loss's key)

    def _map(self, f) -> Batch:
        return Batch(*(None if t is None else f(t)
                       for t in (self.image, self.text, self.attention_mask, self.labels, self.image_index)))

    def pin_memory(self) -> Batch:
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


class PairBatches(Dataset):
    """Item i is the whole i-th batch, gathered with one fancy-index per tensor (no per-sample collate)."""

    def __init__(self, image, text: torch.Tensor, attention_mask: torch.Tensor, pairs: Pairs,
                 batch_size: int, order: np.ndarray | None = None):
        self.image, self.text, self.attention_mask = image, text, attention_mask
        self.pairs, self.batch_size = pairs, batch_size
        self.order = np.arange(len(pairs)) if order is None else order

    def __len__(self) -> int:
        return (len(self.pairs) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)  # also ends plain iteration over the batches
        sel = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        caption = torch.from_numpy(self.pairs.caption[sel])
        mask = self.attention_mask[caption]
        length = int(mask.sum(1).max())  # trim padding to this batch's longest caption
        return Batch(
            image=torch.from_numpy(np.ascontiguousarray(self.image.get(self.pairs.image[sel]))),
            text=self.text[caption, :length],
            attention_mask=mask[:, :length],
            labels=torch.from_numpy(self.pairs.label[sel]),
            image_index=torch.from_numpy(self.pairs.image[sel]),
        )

    def mean_length(self) -> float:
        """The caption length of the average sample's batch (each batch is trimmed to its longest caption),
        without gathering a batch: the sequence length the step's FLOPs are counted at."""
        per_pair = self.attention_mask.sum(1).numpy()[self.pairs.caption[self.order]]
        starts = np.arange(0, len(per_pair), self.batch_size)
        return float(np.maximum.reduceat(per_pair, starts) @ np.diff(np.append(starts, len(per_pair)))) / len(per_pair)


def loader(batches: PairBatches, workers: int = 0, pin_memory: bool = False, sampler=None) -> DataLoader:
    """Batches in order, or in the order of ``sampler`` (e.g. one rank's share under DDP)."""
    return DataLoader(batches, batch_size=None, shuffle=False, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=False, prefetch_factor=4 if workers else None)
