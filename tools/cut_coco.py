"""Cut a small, self-contained subset of a COCO-style dataset, in the layout fusionprof reads.

    python tools/cut_coco.py --data /datasets/coco --out /tmp/coco-mini --images 500

Takes the first N images of each split (train / val / test, as fusionprof splits the source: Karpathy
or COCO 2017), copies them and writes ``annotations/captions_{train,val,test}.json``. Handy for trying the
``seed`` preset on real images without the full 19 GB.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from fusionprof.atomic import write_json
from fusionprof.data.coco import SPLITS, load_splits


def cut(data: Path, out: Path, images: int, seed: int = 0) -> None:
    splits, layout = load_splits(data, seed)
    for name in SPLITS:
        split = splits[name].subset(images)
        (out / name).mkdir(parents=True, exist_ok=True)
        entries, annotations = [], []
        for i, path in enumerate(split.image_paths):
            if not path.exists():
                continue
            file_name = f"{i + 1:012d}{path.suffix}"
            shutil.copy(path, out / name / file_name)
            entries.append({"id": i + 1, "file_name": file_name, "source": str(path)})
        kept = {e["id"] for e in entries}
        for caption, owner in zip(split.captions, split.caption_image, strict=True):
            if int(owner) + 1 in kept:
                annotations.append({"id": len(annotations) + 1, "image_id": int(owner) + 1, "caption": caption})
        write_json(out / "annotations" / f"captions_{name}.json",
                   {"info": {"description": f"cut from {data} ({layout})"}, "images": entries,
                    "annotations": annotations})
        print(f"{name}: {len(entries)} images, {len(annotations)} captions")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=500, help="images per split")
    args = parser.parse_args()
    cut(args.data, args.out, args.images)
