"""Training samples/s with the memory-mapped image cache vs decoding JPEGs every step, side by side.

    python benchmarks/image_cache.py [--fusion mid] [--images 500] [--size 96] [--rounds 2]

Both modes run the shipped training loop (``fusionprof.train.train``, one epoch on the first N train images,
same model, seed and batches), alternating cache / decode for ``--rounds`` rounds so that drift on a shared
machine hits both; it prints the median samples/s of each and their ratio, with the environment.
``--size`` is the side of the dataset's JPEG files: the embedded default is 96 px; 512 is closer to COCO's
640×480 files and so to what decoding costs on real data.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from fusionprof.config import model_config, train_config
from fusionprof.data import DEFAULT_SYNTH
from fusionprof.data.images import cache_root
from fusionprof.data.synth import synth_dir_name, write_synth
from fusionprof.env import fingerprint, machine_name
from fusionprof.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--images", type=int, default=500, help="train images per epoch")
    parser.add_argument("--size", type=int, default=DEFAULT_SYNTH["size"], help="side of the JPEG files")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    counts = {"train": args.images, "val": 50, "test": 50}
    data = write_synth(cache_root() / "data" / synth_dir_name(counts, args.size, 0), counts, args.size, 0)
    rates: dict[str, list[float]] = {"cache": [], "decode": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(args.rounds):
            for mode in rates:
                cfg = train_config("tiny", data=str(data), epochs=1, image_cache=mode == "cache", workers=args.workers,
                                   run=f"bench-{mode}", models_dir=f"{out}/m", profiles_dir=f"{out}/p")
                metrics = train(cfg, model_config("tiny", fusion=args.fusion), fresh=True, progress=False,
                                log=lambda s: None)
                rates[mode].append(metrics["history"][0]["samples_per_s"])
                print(f"  {mode:<6} {rates[mode][-1]:7.1f} samples/s", flush=True)
    cache, decode = statistics.median(rates["cache"]), statistics.median(rates["decode"])
    print(f"{machine_name(fingerprint())}: tiny/{args.fusion}, {args.images} images of {args.size}px, "
          f"workers={args.workers}")
    print(f"image cache {cache:.1f} samples/s, decoding JPEGs {decode:.1f} samples/s: ratio {cache / decode:.2f}×")


if __name__ == "__main__":
    main()
