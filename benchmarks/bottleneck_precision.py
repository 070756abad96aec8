"""The bottleneck fusion's test accuracy trained in fp32 against bf16 autocast, and bf16 with the fusion module
alone kept in fp32 (a diagnosis, not a shipped option), per seed.

    python benchmarks/bottleneck_precision.py [--fusions bottleneck,mid] [--seeds 0,1]

The tiny study trains in bf16 where the CPU has it (``--precision auto``), and its bottleneck row lands 10+ points
below the other fusions. This trains tiny models on the embedded data with the preset's settings (3 epochs), each
fusion and seed in fp32, in bf16, and (bottleneck only) in bf16 with ``BottleneckFusion.forward`` run under
``torch.autocast(enabled=False)`` on fp32 inputs: the encoders stay in bf16, the fusion computes in fp32. Same seed,
same data order in every variant. Writes ``profiles/<host>/bottleneck-precision-tiny-cpu.json``.
"""

from __future__ import annotations

import argparse
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.config import model_config, train_config
from fusionprof.env import fingerprint, machine_name, utc_stamp
from fusionprof.models.fusions.bottleneck import BottleneckFusion
from fusionprof.train import train


@contextmanager
def fusion_in_fp32():
    """BottleneckFusion computes in fp32 under an outer bf16 autocast (its inputs cast up, autocast off inside)."""
    forward = BottleneckFusion.forward

    def fp32_forward(self, image_map, text, text_mask):
        with torch.autocast(image_map.device.type, enabled=False):
            return forward(self, image_map.float(), text.float(), text_mask)
    BottleneckFusion.forward = fp32_forward
    try:
        yield
    finally:
        BottleneckFusion.forward = forward


def run(fusion: str, seed: int, variant: str, folder: Path) -> dict:
    precision = "fp32" if variant == "fp32" else "bf16"
    name = f"{fusion}-{variant}-{seed}".replace(", ", "-").replace(" ", "-")
    cfg = train_config("tiny", precision=precision, seed=seed, models_dir=str(folder / "m"),
                       profiles_dir=str(folder / "p"), run=name)
    model = model_config("tiny", fusion=fusion)
    with fusion_in_fp32() if variant == "bf16, fusion in fp32" else nullcontext():
        metrics = train(cfg, model, progress=False, log=lambda _: None)
    row = {"fusion": fusion, "seed": seed, "variant": variant, "test_accuracy": metrics["test"]["accuracy"],
           "test_auc": metrics["test"]["auc"],
           "val_accuracy_by_epoch": [e["val_accuracy"] for e in metrics["history"]],
           "train_seconds": metrics["train_seconds"], "samples_per_s": metrics["train_samples_per_s"]}
    print(f"{fusion} seed {seed} {variant}: test {row['test_accuracy']:.2%}, val by epoch "
          + " ".join(f"{a:.1%}" for a in row["val_accuracy_by_epoch"]) + f", {row['samples_per_s']:.0f} samples/s",
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", default="bottleneck,mid")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    env = fingerprint()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bottleneck-precision-") as folder:
        for fusion in args.fusions.split(","):
            variants = ["fp32", "bf16"] + (["bf16, fusion in fp32"] if fusion == "bottleneck" else [])
            seeds = [int(s) for s in args.seeds.split(",")] if fusion == "bottleneck" else [0]
            rows += [run(fusion, seed, variant, Path(folder)) for seed in seeds for variant in variants]
    record = {"schema_version": SCHEMA_VERSION, "kind": "bottleneck-precision", "created": utc_stamp(),
              "args": vars(args), "preset": "tiny", "data": "embedded", "rows": rows, "environment": env}
    path = Path(args.out) / env["host"] / "bottleneck-precision-tiny-cpu.json"
    write_json(path, record)
    print(f"{machine_name(env, 'cpu')}: wrote {path}")


if __name__ == "__main__":
    main()
