"""Frozen-encoder epochs with and without the feature cache, side by side.

    python benchmarks/feature_cache.py [--preset tiny] [--fusion early,late,mid,bottleneck] [--epochs 3]
        [--limit-train N] [--random-init] [--device cpu]

For each fusion, the shipped loop (``fusionprof.train.train``) trains the fusion head twice on the embedded data
with ``--freeze-encoders``: once running the frozen encoders every step, once with ``--cache-features``. The
epoch-time ratio compares the median epoch of each after the first (which warms up); the one-time cost of
encoding the splits is reported beside it, as is whether the two runs reached the same test accuracy (they
train on the same batches with the same dropout draws, so they should). Results go to
``profiles/<host>/feature-cache-<preset>-<device>.json``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.config import model_config, train_config
from fusionprof.data.images import cache_root
from fusionprof.env import fingerprint, machine_name
from fusionprof.train import train


def warm_epoch_seconds(metrics: dict) -> float:
    return statistics.median(h["epoch_seconds"] for h in metrics["history"][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="early,late,mid,bottleneck")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit-train", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--random-init", action="store_true",
                        help="random-init encoders and the shipped vocabulary: the preset's architecture, no downloads")
    parser.add_argument("--out", default="profiles", help="the record goes to OUT/<host>/")
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as out:
        for fusion in args.fusion.split(","):
            runs = {}
            for cached in (False, True):
                cfg = train_config(args.preset, epochs=args.epochs, cache_features=cached, device=args.device,
                                   limit_train=args.limit_train, limit_eval=args.limit_train and 100,
                                   run=f"{fusion}-{cached}", models_dir=f"{out}/m", profiles_dir=f"{out}/p")
                mcfg = model_config(args.preset, fusion=fusion, freeze_encoders=True,
                                    **({"pretrained": False, "text_model": "config"} if args.random_init else {}))
                runs[cached] = train(cfg, mcfg, fresh=True, progress=False, log=lambda s: None)
            plain, fast = runs[False], runs[True]
            results[fusion] = {
                "epoch_seconds": {"encoders": warm_epoch_seconds(plain), "cached": warm_epoch_seconds(fast)},
                "cache_build_seconds": sum(s["seconds"] for s in fast["feature_cache"].values()),
                "cache_built": all(s["built"] for s in fast["feature_cache"].values()),
                "precision": fast["train_config"]["precision"],
                "test_accuracy": {"encoders": plain["test"]["accuracy"], "cached": fast["test"]["accuracy"]},
            }
            r = results[fusion]
            r["ratio"] = r["epoch_seconds"]["encoders"] / r["epoch_seconds"]["cached"]
            print(f"{fusion:<10} epoch {r['epoch_seconds']['encoders']:6.2f} s → {r['epoch_seconds']['cached']:6.3f} s"
                  f"  ({r['ratio']:5.1f}×)  cache {'built' if r['cache_built'] else 'read'} in "
                  f"{r['cache_build_seconds']:.1f} s  test acc {r['test_accuracy']['encoders']:.1%} / "
                  f"{r['test_accuracy']['cached']:.1%}", flush=True)
    env = fingerprint()
    path = Path(args.out) / env["host"] / f"feature-cache-{args.preset}-{args.device.split(':')[0]}.json"
    print(f"{machine_name(env, args.device)}: {args.preset} preset ({results[fusion]['precision']}) on {args.device}")
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "feature_cache", "args": vars(args),
                      "results": results, "environment": env,
                      "cache_folder": str(cache_root() / "features")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
