"""bf16 on the CPU in PyTorch: autocast over fp32 weights (the ``torch`` backend) against the weights cast to bf16.

    python benchmarks/cpu_bf16_weights.py [--preset seed] [--fusion all] [--batch-sizes 1,8] [--rounds 2]
        [--min-seconds 2] [--threads N] [--out profiles]

On a CPU with native bf16 the ``torch`` backend's bf16 ran little faster than its fp32 (on a 2-core AMX Xeon, seed
preset, batch 8: 1.1-1.7x, mid slower), while OpenVINO's bf16 ran 4.7-5.0x its fp32. Autocast keeps the model's
weights in fp32 and casts each weight of a matmul or convolution to bf16 on every call; a model cast to bf16 once
reads half the bytes and casts nothing. This times, per fusion and batch size, in one process and with the same
random-init model and inputs:

- ``fp32``: the model as trained, no autocast (the ``torch`` backend's fp32);
- ``autocast``: fp32 weights under ``torch.autocast("cpu", torch.bfloat16)`` (the ``torch`` backend's bf16);
- ``cast``: a copy with weights and images in bf16, no autocast.

The three alternate within each round (the order reverses every round, so a slow stretch falls on all), each
visit sampled with the latency sweep's protocol (``--min-seconds``); a cell's p50 is the median of its visits'. The
logits of ``autocast`` and ``cast`` are compared with fp32's (max absolute difference over the batch). Writes
``profiles/<host>/cpu-bf16-weights-<preset>-<isa tier>.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from fusionprof import SCHEMA_VERSION
from fusionprof.atomic import write_json
from fusionprof.env import cpu_isa, fingerprint, isa_tier
from fusionprof.latency import random_init_model
from fusionprof.measure import Protocol, sample_calls, summarize
from fusionprof.models import fusion_names
from fusionprof.models.model import example_inputs

MODES = ("fp32", "autocast", "cast")


def calls(model, batch: int) -> dict:
    """Each mode's forward at ``batch``, ready to time (inputs made once)."""
    images, ids, mask = example_inputs(model.cfg, batch)
    cast = copy.deepcopy(model).to(torch.bfloat16)
    bf16_images = images.to(torch.bfloat16)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(images, ids, mask)

    return {"fp32": lambda: model(images, ids, mask), "autocast": autocast,
            "cast": lambda: cast(bf16_images, ids, mask)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--fusion", default="all")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="profiles")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fusions = fusion_names() if args.fusion == "all" else args.fusion.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    protocol = Protocol(min_seconds=args.min_seconds, min_calls=5)
    env = fingerprint()
    created = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    cells = []
    for fusion in fusions:
        model = random_init_model(args.preset, fusion)
        for batch in batch_sizes:
            forward = calls(model, batch)
            with torch.inference_mode():
                reference = forward["fp32"]().float()
                differences = {m: float((forward[m]().float() - reference).abs().max()) for m in MODES[1:]}
                visits = {m: [] for m in MODES}
                for r in range(args.rounds):
                    for mode in MODES if r % 2 == 0 else reversed(MODES):
                        visits[mode].append(summarize(sample_calls(forward[mode], lambda: None, protocol)))
            p50 = {m: statistics.median(v["p50_ms"] for v in visits[m]) for m in MODES}
            cell = {"fusion": fusion, "batch_size": batch, "p50_ms": p50,
                    "visits_p50_ms": {m: [v["p50_ms"] for v in visits[m]] for m in MODES},
                    "max_cv": {m: max(v["cv"] or 0.0 for v in visits[m]) for m in MODES},
                    "max_abs_logit_difference": differences,
                    "cast_over_autocast": p50["autocast"] / p50["cast"], "fp32_over_cast": p50["fp32"] / p50["cast"],
                    "fp32_over_autocast": p50["fp32"] / p50["autocast"]}
            cells.append(cell)
            print(f"{fusion:<11} bs {batch:<3} p50 fp32 {p50['fp32']:8.2f} ms, autocast {p50['autocast']:8.2f} ms, "
                  f"cast {p50['cast']:8.2f} ms: cast is {cell['cast_over_autocast']:.2f}x autocast, "
                  f"{cell['fp32_over_cast']:.2f}x fp32 (logits within {differences['cast']:.3g} of fp32; autocast "
                  f"{differences['autocast']:.3g})", flush=True)
    tier = (isa_tier(cpu_isa()) or "none").lower()
    path = Path(args.out) / env["host"] / f"cpu-bf16-weights-{args.preset}-{tier}.json"
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "cpu-bf16-weights", "created": created,
                      "environment": env, "config": {**vars(args), "protocol": protocol.to_dict()}, "cells": cells})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
