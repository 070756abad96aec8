"""The embedded dataset: seeded, procedurally drawn scenes with captions, in the COCO captions layout.

Each image holds two coloured shapes in a spatial relation; each gets two captions that describe the
same scene from either object ("a small red circle left of a large blue square" / "a large blue square
right of a small red circle"). Matching a caption to its image needs colour, shape, size and position
from the image *and* the words of the caption, so neither modality alone beats chance.

Written as ``annotations/captions_<split>.json`` + ``<split>/<file>.jpg``: the same loader reads it and
real COCO.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fusionprof.atomic import write_json
from fusionprof.errors import UserError

COLOURS = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
    "yellow": (235, 210, 20), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.10, "large": 0.18}  # radius as a fraction of the image side
RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SYNTH_VERSION = 1
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


def _draw(draw: ImageDraw.ImageDraw, obj: Shape, cx: float, cy: float, side: int) -> None:
    r = SIZES[obj.size] * side
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = r * 0.85
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)


def _centres(relation: str, ra: float, rb: float, rng: np.random.Generator,
             side: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres for objects A and B (radii ra, rb) such that 'A <relation> B' holds clearly.

    Rejection sampling: both inside the frame, not touching, and apart along the relation's axis by
    more than along the other one, so "left of" is never a judgement call.
    """
    while True:
        a = rng.uniform(ra, side - ra, size=2)
        b = rng.uniform(rb, side - rb, size=2)
        dx, dy = b - a  # x grows rightwards, y downwards
        along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
        across = abs(dy) if relation in ("left of", "right of") else abs(dx)
        if np.hypot(dx, dy) > ra + rb + 2 and along > across:
            return (float(a[0]), float(a[1])), (float(b[0]), float(b[1]))


def make_scene(rng: np.random.Generator, side: int) -> tuple[Image.Image, list[str]]:
    def pick() -> Shape:
        return Shape(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(list(SIZES))))

    a, b = pick(), pick()
    while b == a:  # two identical objects make "left of" ambiguous
        b = pick()
    relation = str(rng.choice(list(RELATIONS)))
    base = rng.integers(150, 245)
    background = (base + rng.integers(-25, 25, size=3)).clip(0, 255)
    image = Image.new("RGB", (side, side), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(image)
    (ax, ay), (bx, by) = _centres(relation, SIZES[a.size] * side, SIZES[b.size] * side, rng, side)
    _draw(draw, a, ax, ay, side)
    _draw(draw, b, bx, by, side)
    noise = rng.normal(0, 6, size=(side, side, 3))
    image = Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))
    captions = [f"{a.words()} {relation} {b.words()}", f"{b.words()} {RELATIONS[relation]} {a.words()}"]
    return image, captions


def synth_dir_name(counts: dict[str, int], size: int, seed: int) -> str:
    n = "-".join(str(counts[s]) for s in SPLITS)
    return f"synth-v{SYNTH_VERSION}-n{n}-px{size}-s{seed}"


def write_synth(out: Path, counts: dict[str, int], size: int = 128, seed: int = 0,
                progress: bool = True) -> Path:
    """Write the dataset to ``out``; a finished dataset (marked by ``DONE``) is left as it is, and one of other
    counts, size or seed is an error: it would pass for the dataset asked for."""
    out = Path(out)
    spec = {"counts": counts, "size": size, "seed": seed}
    if (out / "DONE").exists():
        try:
            written = json.loads((out / "DONE").read_text())
        except ValueError:
            written = None
        if written != spec:
            raise UserError(f"{out} already holds an embedded dataset of other counts, size or seed ({written}); "
                            "give another folder, or delete this one to write it anew")
        return out
    for split_index, split in enumerate(SPLITS):
        rng = np.random.default_rng([seed, split_index])
        (out / split).mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in tqdm(range(counts[split]), desc=f"synth {split}", disable=not progress, leave=False):
            image, captions = make_scene(rng, size)
            image_id = i + 1
            file_name = f"{image_id:012d}.jpg"
            image.save(out / split / file_name, quality=92)
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
            for caption in captions:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "caption": caption})
        write_json(out / "annotations" / f"captions_{split}.json", {
            "info": {"description": "fusionprof embedded synthetic ITM dataset", "version": SYNTH_VERSION,
                     "seed": seed},
            "images": images, "annotations": annotations,
        })
    (out / "DONE").write_text(json.dumps(spec) + "\n")
    return out


def vocabulary_words() -> list[str]:
    """Every word the captions use: the tiny preset's tokenizer keeps them whole."""
    words = {"a"} | set(COLOURS) | set(SHAPES) | set(SIZES)
    for rel in RELATIONS:
        words |= set(rel.split())
    return sorted(words)
