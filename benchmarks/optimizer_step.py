"""The optimizer step (gradient clipping + AdamW) per implementation, side by side.

    python benchmarks/optimizer_step.py [--preset tiny] [--fusion early,late,mid,bottleneck] [--freeze-encoders]
        [--device cpu] [--rounds 5] [--steps 50]

``fusionprof.train.make_optimizer`` builds AdamW fused where the device has it. This times, on each fusion
model's trainable parameters (random gradients), ``clip_grad_norm_`` + ``AdamW.step`` as the loop runs them with
the three implementations PyTorch has: the per-tensor loop (the CPU's default), foreach (multi-tensor, CUDA's
default) and fused. Rounds alternate the three; medians are printed, with the ratio to fused.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from fusionprof.config import model_config, train_config
from fusionprof.data.text import build_tokenizer
from fusionprof.models import build_model
from fusionprof.runtime import resolve_device, synchronize
from fusionprof.train import make_optimizer

IMPLEMENTATIONS = {"loop": {"fused": False, "foreach": False}, "foreach": {"fused": False, "foreach": True},
                   "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="early,late,mid,bottleneck")
    parser.add_argument("--freeze-encoders", action="store_true", help="the fusion head's parameters only")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50, help="optimizer steps timed per round")
    args = parser.parse_args()
    device = resolve_device(args.device)
    cfg = train_config(args.preset)
    print(f"clip + AdamW step, ms (median of {args.rounds} rounds × {args.steps} steps) on {device}, "
          f"{torch.get_num_threads()} threads{', encoders frozen' if args.freeze_encoders else ''}")
    for fusion in args.fusion.split(","):
        mcfg = model_config(args.preset, fusion=fusion, pretrained=False, text_model="config",
                            freeze_encoders=args.freeze_encoders or None)
        mcfg.vocab_size = max(mcfg.vocab_size, len(build_tokenizer(mcfg)))
        model = build_model(mcfg).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizers = {name: make_optimizer(model, cfg, **flags) for name, flags in IMPLEMENTATIONS.items()}
        times: dict[str, list[float]] = {name: [] for name in optimizers}
        for _ in range(args.rounds):
            for name, optimizer in optimizers.items():
                synchronize(device)
                start = time.perf_counter()
                for _ in range(args.steps):
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                synchronize(device)
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"{fusion:<10} {len(params):>4} tensors {sum(p.numel() for p in params) / 1e6:7.2f} M  "
              + "  ".join(f"{name} {ms:7.3f}" + (f" ({ms / median['fused']:.1f}×)" if name != "fused" else "")
                          for name, ms in median.items()))


if __name__ == "__main__":
    main()
