"""Data: COCO-style captions → validated, cached images + tokenized captions → ITM pairs and batches."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from fusionprof.data.coco import CaptionSplit, load_splits
from fusionprof.data.images import DecodedImages, ImageCache, cache_root
from fusionprof.data.itm import PairBatches, Pairs, make_pairs, split_rng
from fusionprof.data.report import DataReport
from fusionprof.data.synth import SPLITS, synth_dir_name, write_synth
from fusionprof.data.text import tokenize
from fusionprof.errors import UserError

# The embedded dataset the default commands use: enough to learn the task well, small enough for minutes.
DEFAULT_SYNTH = {"counts": {"train": 2000, "val": 250, "test": 500}, "size": 96, "seed": 0}


def default_data_dir(progress: bool = True) -> Path:
    """The embedded dataset, written on first use under the cache folder."""
    spec = DEFAULT_SYNTH
    out = cache_root() / "data" / synth_dir_name(spec["counts"], spec["size"], spec["seed"])
    return write_synth(out, spec["counts"], spec["size"], spec["seed"], progress=progress)


class Rows:
    """A view of an image source restricted to its usable rows."""

    def __init__(self, source, rows: np.ndarray):
        self.source, self.rows = source, rows

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.source.get(self.rows[index])


@dataclass
class SplitData:
    """One split ready to batch: the model's two inputs per image and per caption, and which image each caption
    describes. The inputs are raw (pixels, token ids) or, with the feature cache, the frozen encoders' outputs."""

    name: str
    image: Rows  # uint8 pixels [S, S, 3] per image, or a cached feature map [C, h, w] (features.py)
    text: torch.Tensor  # int64 token ids [N, L], or cached token states [N, L, D] (features.py)
    attention_mask: torch.Tensor
    caption_image: np.ndarray
    report: DataReport

    @property
    def n_images(self) -> int:
        return len(self.image.rows)

    @property
    def n_captions(self) -> int:
        return len(self.caption_image)

    def pairs(self, seed: int, epoch: int = 0) -> Pairs:
        return make_pairs(self.caption_image, split_rng(seed, self.name, epoch))

    def batches(self, pairs: Pairs, batch_size: int, order: np.ndarray | None = None) -> PairBatches:
        return PairBatches(self.image, self.text, self.attention_mask, pairs, batch_size, order)


def _prepare_split(split: CaptionSplit, source: str, tokenizer, image_size: int, max_len: int,
                   image_cache: bool, limit: int | None, progress: bool) -> SplitData:
    if limit is not None:
        split = split.subset(limit)
    cache = ImageCache(split.image_paths, image_size, progress=progress, desc=split.name)
    split.report.merge(cache.report)
    rows = np.flatnonzero(cache.valid)
    usable = split.keep_images(cache.valid)
    if len(rows) < 2 or not usable.captions:
        raise UserError(f"{source}: split {split.name!r} has {len(rows)} usable image(s) with captions "
                        f"(skipped: {dict(split.report.skipped) or 'none'}; e.g. "
                        f"{'; '.join(list(chain(*split.report.examples.values()))[:2]) or 'no files listed'})")
    images = cache if image_cache else DecodedImages(split.image_paths, image_size)
    ids, mask = tokenize(tokenizer, usable.captions, max_len)
    return SplitData(split.name, Rows(images, rows), ids, mask, usable.caption_image, split.report)


def prepare_data(data: str | Path | None, tokenizer, image_size: int, max_len: int, seed: int = 0,
                 image_cache: bool = True, limit_train: int | None = None, limit_eval: int | None = None,
                 splits: tuple[str, ...] = SPLITS, progress: bool = True,
                 layout: str | None = None) -> tuple[dict[str, SplitData], str]:
    """The requested splits, ready to batch, and the dataset's location and layout (the embedded dataset if ``data``
    is None). ``layout``: the one a run was trained on (``TrainConfig.data_layout``); None: the one found."""
    root = Path(data) if data else default_data_dir(progress)
    captions, layout = load_splits(root, seed, layout)
    out = {}
    for name in splits:
        limit = limit_train if name == "train" else limit_eval
        out[name] = _prepare_split(captions[name], str(root), tokenizer, image_size, max_len, image_cache, limit,
                                   progress)
    return out, f"{root} ({layout})"
