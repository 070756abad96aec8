"""Frozen-encoder feature cache: encode each split once, then train only the fusion head on stored features.

With ``--freeze-encoders --cache-features`` the encoders' outputs are a pure function of the input, so they
are computed once per split and kept in memory-mapped ``.npy`` files under the cache folder:

- images: the feature map [N, C, h, w], or only its mean [N, C, 1, 1] when the fusion reads nothing else
  (``pooled_image`` on the fusion class: early, late). The fusions' ``mean((2, 3))`` is then the identity.
- captions: the text encoder's token states [N, L, D] at full length, trimmed per batch like the token ids.

The key covers everything the features depend on: the encoders' architecture and every weight byte, the
split's images (the image source's file key and which rows are usable) and token ids, the image size, the
precision they were computed in and what the fusion reads. Change any of them and a new cache is built.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fusionprof.atomic import write_json
from fusionprof.data import Rows, SplitData
from fusionprof.data.images import cache_root, normalize
from fusionprof.models import FusionModel
from fusionprof.runtime import autocast

FEATURE_CACHE_VERSION = 1


def _update(h, tensor: torch.Tensor) -> None:
    h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def feature_key(model: FusionModel, split: SplitData, precision: str) -> str:
    cfg = model.cfg
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({
        "version": FEATURE_CACHE_VERSION, "split": split.name, "precision": precision,
        "pooled_image": pools_image(model),
        "encoders": {k: getattr(cfg, k) for k in ("image_encoder", "image_size", "text_model", "text_hidden",
                                                  "text_layers", "text_heads", "max_text_len", "vocab_size")},
        "images": split.image.source.key,
    }, sort_keys=True).encode())
    for encoder in model.encoders():
        for name, tensor in encoder.state_dict().items():
            h.update(name.encode())
            _update(h, tensor)
    for array in (split.image.rows, split.text, split.attention_mask):
        _update(h, torch.as_tensor(array))
    return h.hexdigest()


def pools_image(model: FusionModel) -> bool:
    return bool(getattr(model.fusion, "pooled_image", False))


class _Features:
    """Image features by usable-row index; the same ``get`` as the image sources, so batching is unchanged."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.array[index]


@dataclass
class FeatureCache:
    key: str
    image: np.ndarray  # float32 [N_images, C, h, w] (memory-mapped)
    text: np.ndarray  # float32 [N_captions, L, D] (memory-mapped)
    built: bool  # False: read back from an earlier run
    seconds: float  # to build (or to open)

    def split(self, split: SplitData) -> SplitData:
        """The split with encoder outputs in place of pixels and token ids (same pairs, same batching)."""
        rows = np.arange(len(self.image))
        return replace(split, image=Rows(_Features(self.image), rows), text=torch.from_numpy(self.text))


def _partial(folder: Path, name: str, shape: tuple) -> np.ndarray:
    """A float32 array being written; renamed to ``<name>.npy`` only once it is complete."""
    return np.lib.format.open_memmap(folder / f".{name}.npy.partial", mode="w+", dtype=np.float32, shape=shape)


@torch.inference_mode()
def _encode(model: FusionModel, split: SplitData, device: torch.device, precision: str, batch_size: int,
            folder: Path, progress: bool) -> dict[str, list[int]]:
    """Write the split's encoder outputs to ``folder``'s partial files; returns their shapes."""
    was_training = model.training
    model.eval()
    pooled = pools_image(model)
    image_array = text_array = None
    n_images, n_captions = split.n_images, split.n_captions
    with autocast(device, precision):
        for start in tqdm(range(0, n_images, batch_size), desc=f"encoding {split.name} images",
                          disable=not progress, leave=False):
            index = np.arange(start, min(start + batch_size, n_images))
            pixels = torch.from_numpy(np.ascontiguousarray(split.image.get(index))).to(device)
            feature_map = model.image_encoder(normalize(pixels, channels_last=True))
            if pooled:
                feature_map = feature_map.mean((2, 3), keepdim=True)
            if image_array is None:  # the shapes are known once the encoders have run
                image_array = _partial(folder, "image", (n_images, *feature_map.shape[1:]))
            image_array[index] = feature_map.float().cpu().numpy()
        for start in tqdm(range(0, n_captions, batch_size), desc=f"encoding {split.name} captions",
                          disable=not progress, leave=False):
            end = min(start + batch_size, n_captions)
            ids, mask = split.text[start:end].to(device), split.attention_mask[start:end].to(device)
            states = model.text_encoder(ids, mask)
            if text_array is None:
                text_array = _partial(folder, "text", (n_captions, *states.shape[1:]))
            text_array[start:end] = states.float().cpu().numpy()
    for array in (image_array, text_array):
        array.flush()
    model.train(was_training)
    return {"image": list(image_array.shape), "text": list(text_array.shape)}


def cached_features(model: FusionModel, split: SplitData, device: torch.device, precision: str = "fp32",
                    batch_size: int = 256, progress: bool = True, log: Callable[[str], None] = print,
                    root: Path | None = None) -> FeatureCache:
    """The split's encoder outputs, from the cache if its key matches, else computed now and stored."""
    if not model.cfg.freeze_encoders:
        raise ValueError("a feature cache needs frozen encoders: trained ones change their features every step")
    start = time.perf_counter()
    key = feature_key(model, split, precision)
    folder = (root or cache_root() / "features") / key
    manifest = folder / "manifest.json"
    built = not manifest.exists()
    if built:
        log(f"feature cache: encoding the {split.name} split once ({split.n_images} images, "
            f"{split.n_captions} captions) → {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        shapes = _encode(model, split, device, precision, batch_size, folder, progress)
        for name in ("image", "text"):  # a killed build leaves only .partial files and no manifest
            (folder / f".{name}.npy.partial").replace(folder / f"{name}.npy")
        write_json(manifest, {"version": FEATURE_CACHE_VERSION, "key": key, "split": split.name,
                              "shapes": shapes, "precision": precision})
    image = np.load(folder / "image.npy", mmap_mode="c")  # copy-on-write: torch may wrap it without a warning
    text = np.load(folder / "text.npy", mmap_mode="c")
    return FeatureCache(key, image, text, built, time.perf_counter() - start)
