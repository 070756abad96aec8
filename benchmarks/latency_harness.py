"""How much the latency harness adds, and whether it agrees with torch.utils.benchmark.

    python benchmarks/latency_harness.py [--fusion mid] [--batch-size 8] [--rounds 3]

1. Overhead: the protocol's samples for a call that does nothing (timer + loop), and for the ``torch``
   backend's ``run`` on a model that returns at once (what the backend wrapper adds). Target ≤ 20 µs.
2. Agreement: for one tiny model, our p50 beside ``torch.utils.benchmark.Timer(...).blocked_autorange()``'s
   median, alternated in one process for ``--rounds`` rounds. Target: within 5 %.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.utils.benchmark as tbench
from torch import nn

from fusionprof.backends import Artifacts, create_backend
from fusionprof.config import model_config
from fusionprof.env import fingerprint, machine_name
from fusionprof.measure import Protocol, sample_calls, summarize
from fusionprof.models import build_model
from fusionprof.models.model import example_inputs

CPU = torch.device("cpu")


class NoOp(nn.Module):
    def forward(self, images, input_ids, attention_mask):
        return images[:, 0, 0, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    protocol = Protocol(min_seconds=1.0, min_calls=1000, max_calls=200_000)
    print(machine_name(fingerprint()), f"torch threads {torch.get_num_threads()}")

    bare = summarize(sample_calls(lambda: None, lambda: None, protocol))
    noop_model = create_backend("torch", Artifacts(NoOp()), CPU)
    inputs = example_inputs(model_config("tiny"), args.batch_size, 24)
    wrapped = summarize(sample_calls(lambda: noop_model.run(*inputs), noop_model.synchronize, protocol))
    print(f"overhead, empty call:           p50 {bare['p50_ms'] * 1e3:6.2f} µs  mean {bare['mean_ms'] * 1e3:6.2f} µs")
    print(f"overhead, torch backend no-op:  p50 {wrapped['p50_ms'] * 1e3:6.2f} µs  "
          f"mean {wrapped['mean_ms'] * 1e3:6.2f} µs  (target ≤ 20 µs)")

    torch.manual_seed(0)
    model = build_model(model_config("tiny", fusion=args.fusion, vocab_size=1000)).eval()
    backend = create_backend("torch", Artifacts(model), CPU)
    inputs = example_inputs(model.cfg, args.batch_size, 24)
    ours, theirs = [], []
    for _ in range(args.rounds):
        ours.append(summarize(sample_calls(lambda: backend.run(*inputs), backend.synchronize, Protocol()))["p50_ms"])
        timer = tbench.Timer("backend.run(*inputs)", globals={"backend": backend, "inputs": inputs},
                             num_threads=torch.get_num_threads())  # its default is 1 thread
        theirs.append(timer.blocked_autorange(min_run_time=2.0).median * 1e3)
        print(f"  round: fusionprof p50 {ours[-1]:.3f} ms   torch.utils.benchmark median {theirs[-1]:.3f} ms")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"tiny/{args.fusion} bs {args.batch_size}: fusionprof p50 {a:.3f} ms, torch.utils.benchmark {b:.3f} ms, "
          f"ratio {a / b:.3f} ({abs(a / b - 1):.1%} apart; target within 5 %)")


if __name__ == "__main__":
    main()
