"""Images: decode + resize once into a memory-mapped uint8 cache, so a training step never waits on JPEGs.

``ImageCache`` is the lean path; ``DecodedImages`` decodes files on every access (the study's way, kept
for comparison). Both hand out uint8 arrays [B, S, S, 3]; normalisation happens on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fusionprof.atomic import atomic_write, write_json
from fusionprof.data.report import DataReport

CACHE_VERSION = 2  # 2: 16-bit and float grayscale rescaled to 8 bits, where 1 clipped them
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXPECTED_FORMAT = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}
_WIDE_GRAYSCALE_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # more than 8 bits: rescaled, not clipped
_GRAYSCALE_MODES = {"1", "L"} | _WIDE_GRAYSCALE_MODES
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class BadImage(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def cache_root() -> Path:
    """Where derived data lives: $FUSIONPROF_CACHE, else ~/.cache/fusionprof."""
    return Path(os.environ.get("FUSIONPROF_CACHE", Path.home() / ".cache" / "fusionprof"))


def load_rgb(path: Path, size: int, report: DataReport | None = None) -> np.ndarray:
    """One image as uint8 [size, size, 3]; repairs (grayscale, CMYK, alpha, wrong extension) are counted."""
    try:
        with Image.open(path) as img:
            kind = img.format
            if report is not None:
                expected = _EXPECTED_FORMAT.get(path.suffix.lower())
                if expected and kind != expected:
                    report.convert("format_mismatch", f"{path.name} is {kind}")
                if img.mode in _GRAYSCALE_MODES:
                    report.convert("grayscale", path.name)
                elif img.mode == "CMYK":
                    report.convert("cmyk", path.name)
                elif img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
                    report.convert("alpha", path.name)
            img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when much larger than needed
            if img.mode in _WIDE_GRAYSCALE_MODES:
                img = _wide_to_8bit(img)
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except FileNotFoundError:
        raise BadImage("missing_image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise BadImage("unreadable_image") from None


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit or float grayscale → 8-bit "L", scaled by the mode's range: ``convert("RGB")`` clips instead (a
    0–60000 PNG comes out nearly white, a float image in [0, 1] black).

    I;16 and I span 0–65535 (I is how older Pillows open a 16-bit PNG; wider values clip). F in [0, 1] is taken
    as such; any other float range is stretched from its minimum to its maximum.
    """
    x = np.nan_to_num(np.asarray(img, dtype=np.float32))
    lo, hi = 0.0, 65535.0
    if img.mode == "F":
        lo, hi = (0.0, 1.0) if x.size == 0 or (x.min() >= 0 and x.max() <= 1) else (float(x.min()), float(x.max()))
    scaled = (x - lo) * (255 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))  # uint8 [H, W]: mode L


def _key(paths: list[Path], size: int) -> str:
    h = hashlib.sha1(f"v{CACHE_VERSION}|{size}".encode())
    for p in paths:
        try:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except (OSError, ValueError):  # ValueError: a NUL byte in the name, which load_rgb then skips as unreadable
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()[:20]


class ImageCache:
    """uint8 [N, S, S, 3] in a .npy file opened with mmap, plus which images were usable.

    Keyed by every file's path, size and mtime and by the resolution: another dataset, a changed file or
    another size builds a new cache.
    """

    def __init__(self, paths: list[Path], size: int, progress: bool = True, desc: str = "images"):
        self.size = size
        self.key = key = _key(paths, size)
        folder = cache_root() / "images"
        array_path, manifest_path = folder / f"{key}.npy", folder / f"{key}.json"
        if not manifest_path.exists():
            self._build(paths, size, array_path, manifest_path, progress, desc)
        manifest = json.loads(manifest_path.read_text())
        self.valid = np.asarray(manifest["valid"], dtype=bool)
        self.report = DataReport.from_dict(manifest["report"])
        self.array = np.load(array_path, mmap_mode="r")
        self.path = array_path

    @staticmethod
    def _build(paths, size, array_path, manifest_path, progress, desc) -> None:
        report = DataReport()
        valid = np.zeros(len(paths), dtype=bool)

        def fill(tmp: Path) -> None:
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
            for i, path in enumerate(tqdm(paths, desc=f"caching {desc} at {size}px", disable=not progress,
                                          leave=False)):
                try:
                    array[i] = load_rgb(path, size, report)
                    valid[i] = True
                except BadImage as e:
                    report.skip(e.reason, str(path))
            array.flush()
            del array

        atomic_write(array_path, fill)
        write_json(manifest_path, {"version": CACHE_VERSION, "size": size, "n": len(paths),
                                   "valid": valid.astype(int).tolist(), "report": report.to_dict()})

    def __getstate__(self) -> dict:  # DataLoader workers reopen the file instead of receiving a copy
        return {**self.__dict__, "array": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.array = np.load(self.path, mmap_mode="r")

    def get(self, index: np.ndarray) -> np.ndarray:
        return self.array[np.sort(index)][np.argsort(np.argsort(index))]  # sorted reads are kinder to mmap


class DecodedImages:
    """Decode and resize the files on every access (the study's input path)."""

    def __init__(self, paths: list[Path], size: int):
        self.paths, self.size = paths, size
        self.key = _key(paths, size)

    def get(self, index: np.ndarray) -> np.ndarray:
        return np.stack([load_rgb(self.paths[i], self.size) for i in index])


def normalize(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, H, W, 3] (on any device) → float [B, 3, H, W] with ImageNet mean/std."""
    x = images.permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()
