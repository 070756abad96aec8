"""Reading COCO-style caption datasets into splits of (image file, captions).

Three layouts, tried in this order under ``root`` (a run records the one it found, ``TrainConfig.data_layout``,
and everything that reads the run afterwards asks for that one):

1. Karpathy ``dataset_coco.json`` (train = train + restval; val; test). Images are found at
   ``root/<filepath>/<filename>``, or by COCO id in ``train2017/`` / ``val2017/`` when only the 2017
   folders exist. (Karpathy test images come from val2014, which 2017 spreads over train2017 and
   val2017: mixing Karpathy splits with the 2017 files would leak test images into training.)
2. ``annotations/captions_{train,val,test}.json`` with ``{train,val,test}/`` images: the embedded
   dataset's layout.
3. COCO 2017 ``annotations/captions_{train,val}2017.json``: val2017 is the test split, and a seeded
   slice of train2017 is held out for validation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusionprof.data.report import DataReport
from fusionprof.errors import UserError

KARPATHY_FILE = "dataset_coco.json"
SPLITS = ("train", "val", "test")
COCO2017_VAL_HOLDOUT = 5000  # train2017 images held out for validation (fewer on small datasets)


@dataclass
class CaptionSplit:
    """One split: image files, and captions each pointing at their image by index."""

    name: str
    image_paths: list[Path]
    captions: list[str]
    caption_image: np.ndarray  # int64 [n_captions]: index into image_paths
    report: DataReport = field(default_factory=DataReport)

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, n_images: int) -> CaptionSplit:
        """The first ``n_images`` images and their captions (for quick runs)."""
        keep = self.caption_image < n_images
        captions = [c for c, k in zip(self.captions, keep, strict=True) if k]
        return CaptionSplit(self.name, self.image_paths[:n_images], captions, self.caption_image[keep], self.report)

    def keep_images(self, valid: np.ndarray) -> CaptionSplit:
        """Drop the images marked invalid (and their captions), re-indexing the rest."""
        new_index = np.cumsum(valid) - 1
        keep = valid[self.caption_image]
        return CaptionSplit(self.name, [p for p, v in zip(self.image_paths, valid, strict=True) if v],
                            [c for c, k in zip(self.captions, keep, strict=True) if k],
                            new_index[self.caption_image[keep]].astype(np.int64), self.report)


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, found {type(data).__name__}")
    return data


def _build_split(name: str, entries: list[tuple[Path, list[str]]], report: DataReport,
                 source: str) -> CaptionSplit:
    """From (image path, captions) entries: drop empty captions and images without any (counted)."""
    paths, captions, owner = [], [], []
    for path, texts in entries:
        kept = []
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                report.skip("empty_caption", f"{source}: image {path.name}")
            else:
                kept.append(" ".join(text.split()))
        if not kept:
            report.skip("image_without_captions", f"{source}: {path.name}")
            continue
        captions.extend(kept)
        owner.extend([len(paths)] * len(kept))
        paths.append(path)
    return CaptionSplit(name, paths, captions, np.asarray(owner, dtype=np.int64), report)


def _is_id(value) -> bool:
    """An id a dict can key on: a JSON list or object in its place is a malformed entry, not a crash."""
    return isinstance(value, int | str)


def read_coco_captions(json_path: Path, image_dir: Path, split: str) -> CaptionSplit:
    """A COCO captions file (``images`` + ``annotations``) into a split."""
    data = _read_json(json_path)
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise UserError(f"{json_path}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    report = DataReport()
    by_id: dict[int | str, tuple[Path, list[str]]] = {}
    for k, img in enumerate(images):
        if not isinstance(img, dict) or not _is_id(img.get("id")) or not isinstance(img.get("file_name"), str):
            report.skip("malformed_entry", f"{json_path.name}: images[{k}]")
            continue
        by_id[img["id"]] = (image_dir / img["file_name"], [])
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict) or not _is_id(ann.get("image_id")) or ann["image_id"] not in by_id:
            report.skip("malformed_entry", f"{json_path.name}: annotations[{k}]")
            continue
        by_id[ann["image_id"]][1].append(ann.get("caption"))
    return _build_split(split, list(by_id.values()), report, json_path.name)


def _karpathy_image(root: Path, entry: dict) -> Path:
    path = root / entry.get("filepath", "") / entry["filename"]
    if path.exists() or "cocoid" not in entry:
        return path
    for folder in ("train2017", "val2017"):  # only the 2017 folders on disk: find the image by id
        alt = root / folder / f"{int(entry['cocoid']):012d}.jpg"
        if alt.exists():
            return alt
    return path


def read_karpathy(json_path: Path, root: Path) -> dict[str, CaptionSplit]:
    data = _read_json(json_path)
    images = data.get("images")
    if not isinstance(images, list):
        raise UserError(f"{json_path}: not a Karpathy split file (needs an 'images' list)")
    entries: dict[str, list] = {s: [] for s in SPLITS}
    report = {s: DataReport() for s in SPLITS}
    for k, img in enumerate(images):
        try:
            split = {"restval": "train"}.get(img["split"], img["split"])
            texts = [s.get("raw") for s in img["sentences"]]
            path = _karpathy_image(root, img)
        except (KeyError, TypeError, AttributeError, ValueError):  # ValueError: a cocoid that is not a number
            report["train"].skip("malformed_entry", f"{json_path.name}: images[{k}]")
            continue
        if split in entries:
            entries[split].append((path, texts))
    return {s: _build_split(s, entries[s], report[s], json_path.name) for s in SPLITS}


def _holdout(split: CaptionSplit, n: int, seed: int) -> tuple[CaptionSplit, CaptionSplit]:
    """Split images (never captions of one image) into (rest, held out) with a fixed seed."""
    order = np.random.default_rng(seed).permutation(len(split.image_paths))
    held = np.zeros(len(split.image_paths), dtype=bool)
    held[order[:n]] = True
    val = split.keep_images(held)
    val.name, val.report = "val", DataReport()
    return split.keep_images(~held), val


LAYOUTS = ("karpathy", "coco-splits", "coco2017")  # in the order they are looked for


def _layout_files(root: Path, layout: str) -> list[Path]:
    """The caption files that make ``root`` a dataset of ``layout``."""
    if layout == "karpathy":
        return [root] if root.is_file() else [root / KARPATHY_FILE]
    ann = root / "annotations"
    if layout == "coco-splits":
        return [ann / f"captions_{s}.json" for s in SPLITS]
    if layout == "coco2017":
        return [ann / "captions_train2017.json", ann / "captions_val2017.json"]
    raise UserError(f"unknown dataset layout {layout!r}; one of {', '.join(LAYOUTS)}")


# What a dataset folder must hold (one of the layouts), for the errors that say why a --data is none
CAPTION_FILES = (f"{KARPATHY_FILE}, annotations/captions_{{train,val,test}}.json or "
                 "annotations/captions_{train,val}2017.json")


def find_layout(root: str | Path) -> str:
    """The layout of the dataset at ``root``: the first of ``LAYOUTS`` whose caption files are all there."""
    root = Path(root)
    if root.is_file() and root.name.endswith(".json"):
        return "karpathy"
    if root.is_file():  # a README or an image: "no such directory" would send the user looking for a typo
        raise UserError(f"--data {root}: a file, not a dataset; give the COCO folder (the one that holds "
                        f"{CAPTION_FILES}) or Karpathy's {KARPATHY_FILE} itself")
    if not root.is_dir():
        raise UserError(f"--data {root}: no such directory")
    for layout in LAYOUTS:
        if all(f.exists() for f in _layout_files(root, layout)):
            return layout
    raise UserError(f"--data {root}: no captions found; expected {CAPTION_FILES}")


def load_splits(root: str | Path, seed: int = 0, layout: str | None = None) -> tuple[dict[str, CaptionSplit], str]:
    """All three splits under ``root`` and the name of their layout: ``layout`` (a run reads the splits it was
    trained on, even after a folder gains a file that another layout would look for first), else the one found."""
    root = Path(root)
    if layout is None:
        layout = find_layout(root)
    missing = [f for f in _layout_files(root, layout) if not f.exists()]
    if missing:
        raise UserError(f"--data {root}: the run used its {layout} layout, and {missing[0]} is not there")
    if layout == "karpathy":
        file = root if root.is_file() else root / KARPATHY_FILE
        return read_karpathy(file, file.parent), layout
    ann = root / "annotations"
    if layout == "coco-splits":
        return {s: read_coco_captions(ann / f"captions_{s}.json", root / s, s) for s in SPLITS}, layout
    train = read_coco_captions(ann / "captions_train2017.json", root / "train2017", "train")
    test = read_coco_captions(ann / "captions_val2017.json", root / "val2017", "test")
    n_val = min(COCO2017_VAL_HOLDOUT, len(train.image_paths) // 10)
    train, val = _holdout(train, n_val, seed)
    return {"train": train, "val": val, "test": test}, layout
