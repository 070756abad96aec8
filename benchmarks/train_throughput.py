"""Training samples/s: the study's naive loop vs fusionprof's loop vs the compute-only ceiling, side by side.

    python benchmarks/train_throughput.py [--preset tiny] [--fusion mid] [--images 500] [--rounds 3]
        [--disk-size 96] [--device cpu] [--precision auto] [--compile [off,model,regions,cudagraphs]]
        [--workers 0,4] [--random-init] [--loops naive,shipped,ceiling]

(a) naive: the study's loop. A per-sample Dataset opens each JPEG with PIL, resizes and normalises it; the
    collate_fn tokenizes the batch's captions (padded to the maximum length); NCHW, no pinned memory, PyTorch's
    default AdamW (a loop over the tensors on the CPU, foreach on CUDA; fusionprof's is fused), and the loss read
    back (``.item()``) every step, as a loop that logs each step does.
(b) shipped: ``fusionprof.train.train`` as the CLI runs it; its second epoch (the first warms up).
(c) ceiling: the same model and ``train_step`` on one epoch of batches already normalised on the device.

What is compared is the loop, nothing else: all three run in the same precision (``--precision``; the precision's
own gain is a separate line, (b) against (b) in fp32), see the pairs of (b)'s timed epoch in its order, and use the
same model config, initial weights, batch size, optimizer hyper-parameters and step (``train_step``). (a) and (b)
run once per ``--workers`` count (0, and what a user would set: up to 4 by default), each beside the other. (a) and
(c) time their second epoch too. The runs alternate in one process for ``--rounds`` rounds, so drift on a shared
machine hits all of them; every rate and ratio is printed as the median and [min–max] of its rounds (a ratio per
round, from runs side by side). ``--disk-size`` is the side of the JPEG files: the embedded default is 96 px;
COCO's files are about 640×480, which is what (a) pays to decode on real data. It also prints (b)'s training
FLOP/s (3 × forward FLOPs per sample) as a share of a matmul measured in the same run and, on a known GPU in
bf16/fp16, the MFU against the datasheet peak. ``--compile off,regions`` runs (b) and (c) eager and compiled by
regions in the same rounds (compiled/eager side by side), with how much longer (b)'s first epoch took (the
compile); ``cudagraphs`` (CUDA only) also counts the graphs inductor skipped. The record, with the environment,
goes to ``profiles/<host>/train-throughput-<preset>-<fusion>-<device>-<precision>-<disk size>px.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader, Dataset

from fusionprof import SCHEMA_VERSION, contention
from fusionprof.atomic import write_json
from fusionprof.config import COMPILE_SCOPES, model_config, train_config
from fusionprof.data import DEFAULT_SYNTH, prepare_data
from fusionprof.data.coco import load_splits
from fusionprof.data.images import IMAGENET_MEAN, IMAGENET_STD, cache_root
from fusionprof.data.synth import synth_dir_name, write_synth
from fusionprof.data.text import build_tokenizer
from fusionprof.env import fingerprint, machine_name
from fusionprof.evaluate import to_inputs
from fusionprof.measure import matmul_rate
from fusionprof.models import build_model
from fusionprof.runtime import resolve_device, resolve_precision, seed_everything, synchronize
from fusionprof.train import Optimization, compiled, epoch_pairs, train, train_step, training_flops


class NaivePairs(Dataset):
    """One (image tensor, caption string, label) per pair, decoded from the JPEG on every access."""

    def __init__(self, image_paths, captions, pairs, size: int):
        self.image_paths, self.captions, self.pairs, self.size = image_paths, captions, pairs, size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        with Image.open(self.image_paths[self.pairs.image[i]]) as im:
            image = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        image = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return image, self.captions[self.pairs.caption[i]], float(self.pairs.label[i])


def naive_collate(tokenizer, max_len: int):
    def collate(items):
        images, captions, labels = zip(*items, strict=True)
        tokens = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_len,
                           return_tensors="pt")
        return torch.stack(images), tokens["input_ids"], tokens["attention_mask"], torch.tensor(labels)
    return collate


def fresh_model(mcfg, cfg, device, seed: int, naive: bool = False):
    seed_everything(seed)
    model = build_model(mcfg).to(device).train()
    if not naive:  # as train() does
        model = model.to(memory_format=torch.channels_last)
    # naive: the same groups and hyper-parameters in PyTorch's default AdamW (a loop on the CPU, foreach on CUDA)
    opt = Optimization.create(model, cfg, device, total_steps=10**6, fused=False if naive else None)
    return compiled(model, cfg.compile, log=lambda s: None), opt


def timed_epoch(step, n_batches: int, n_pairs: int, device) -> float:
    """Samples/s over one epoch of ``n_batches`` steps, after an untimed one: like (b)'s second epoch, every
    batch shape (captions are trimmed per batch) has been seen once, so oneDNN / cuDNN plans are built."""
    for _ in range(n_batches):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        step()
    synchronize(device)
    return n_pairs / (time.perf_counter() - start)


def run_naive(mcfg, cfg, device, caption_split, pairs, order, tokenizer) -> float:
    model, opt = fresh_model(mcfg, cfg, device, cfg.seed, naive=True)
    loader = DataLoader(NaivePairs(caption_split.image_paths, caption_split.captions, pairs, mcfg.image_size),
                        batch_size=cfg.batch_size, sampler=order.tolist(), num_workers=cfg.workers, pin_memory=False,
                        collate_fn=naive_collate(tokenizer, mcfg.max_text_len), drop_last=False)
    batches = iter(loop_forever(loader))

    def step():
        images, ids, mask, labels = (t.to(device) for t in next(batches))
        loss = train_step(model, opt, (images, ids, mask), labels, cfg)
        loss.item()  # the per-step log line
    return timed_epoch(step, len(loader), len(pairs), device)


def loop_forever(loader):
    while True:
        yield from loader


def run_ceiling(mcfg, cfg, device, split, pairs, order) -> float:
    model, opt = fresh_model(mcfg, cfg, device, cfg.seed)
    epoch = []  # all in memory, on the device
    for batch in split.batches(pairs, cfg.batch_size, order):
        batch = batch.to(device)
        epoch.append((*to_inputs(batch, device), batch.image_index))
    position = iter(range(10**9))

    def step():
        inputs, labels, image_index = epoch[next(position) % len(epoch)]
        train_step(model, opt, inputs, labels, cfg, image_index=image_index)  # the work the shipped loop does
    return timed_epoch(step, len(epoch), len(pairs), device)


def model_flops_utilisation(mcfg, split, pairs, cfg, device, samples_per_s: float) -> dict:
    """Training FLOP/s, counted as the training records count them (``fusionprof.train.training_flops``: 3 ×
    forward FLOPs at the epoch's mean caption length), against a matmul measured now and, on a known GPU in
    bf16/fp16, against the datasheet peak."""
    flops = training_flops(build_model(mcfg).to(device), cfg, split.batches(pairs, cfg.batch_size).mean_length(),
                           samples_per_s, device)
    achieved = flops["achieved_tflops"] * 1e3
    matmul = matmul_rate(device, cfg.precision)
    return {"seq_len": flops["seq_len"], "train_gflop_per_sample": flops["gflop_per_sample"],
            "achieved_gflops": achieved, "matmul": matmul, "share_of_matmul": achieved / matmul["gflops"],
            "datasheet_tflops": flops["datasheet_tflops"], "mfu_datasheet": flops["mfu"]}


def run_shipped(cfg, mcfg, out: str) -> tuple[float, float]:
    """(b): samples/s of the second epoch, and how much longer the first took (compiling, warming up)."""
    cfg = dataclasses.replace(cfg, epochs=2, run="bench-shipped", models_dir=f"{out}/m", profiles_dir=f"{out}/p")
    history = train(cfg, mcfg, fresh=True, progress=False, log=lambda s: None)["history"]
    return history[1]["samples_per_s"], history[0]["epoch_seconds"] - history[1]["epoch_seconds"]


LABELS = {"naive": "(a) naive", "shipped": "(b) shipped", "ceiling": "(c) ceiling"}


def key(loop: str, scope: str = "off", workers: int | None = None, precision: str | None = None) -> str:
    """The name of a run's rates: "shipped/w0" eager with no workers, "shipped+regions/w0" compiled by regions,
    "ceiling" (no loader), "shipped/w0@fp32" the precision baseline."""
    name = loop if scope == "off" or loop == "naive" else f"{loop}+{scope}"
    return name + (f"/w{workers}" if workers is not None else "") + (f"@{precision}" if precision else "")


def label(k: str) -> str:
    loop = re.split(r"[+/@]", k)[0]
    return LABELS[loop] + k[len(loop):]


def spread(values: list[float]) -> str:
    """median [min–max] over the rounds"""
    return f"{statistics.median(values):.2f} [{min(values):.2f}–{max(values):.2f}]"


def round_ratios(rates: dict[str, list[float]], a: str, b: str) -> list[float] | None:
    """a/b per round: the rounds alternate the loops, so each round's ratio is measured side by side."""
    if a not in rates or b not in rates:
        return None
    return [x / y for x, y in zip(rates[a], rates[b], strict=True)]


def plan_runs(loops, scopes, worker_counts, cfg, mcfg, device, split, caption_split, pairs, order, tokenizer,
              out) -> dict:
    """key → a function returning (samples/s, extra seconds of the first epoch or None)."""
    runs = {}
    for w in worker_counts:  # (a) at (b)'s precision: the loop's gain, not the precision's
        if "naive" in loops:
            c = dataclasses.replace(cfg, workers=w)
            runs[key("naive", workers=w)] = lambda c=c: (run_naive(mcfg, c, device, caption_split, pairs, order,
                                                                   tokenizer), None)
    for scope in scopes:
        scoped = dataclasses.replace(cfg, compile=scope)
        for w in worker_counts:
            if "shipped" in loops:
                c = dataclasses.replace(scoped, workers=w)
                runs[key("shipped", scope, w)] = lambda c=c: run_shipped(c, mcfg, out)
        if "ceiling" in loops:
            runs[key("ceiling", scope)] = lambda c=scoped: (run_ceiling(mcfg, c, device, split, pairs, order), None)
    if "shipped" in loops and cfg.precision != "fp32":  # the precision's gain, on its own line
        fp32 = dataclasses.replace(cfg, precision="fp32", workers=worker_counts[0])
        runs[key("shipped", "off", worker_counts[0], "fp32")] = lambda: run_shipped(fp32, mcfg, out)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--fusion", default="mid")
    parser.add_argument("--images", type=int, default=500, help="train images (2 captions each → 4 pairs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--disk-size", type=int, default=DEFAULT_SYNTH["size"], help="side of the JPEG files")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto",
                        help="for all three loops, as train takes it; (b) also runs in fp32 when this is not fp32")
    parser.add_argument("--compile", nargs="?", const="model", default="off", metavar="SCOPES",
                        help="torch.compile in (b) and (c): model (bare --compile: the whole model), regions (each "
                             "repeated block), cudagraphs (the whole model as CUDA graphs) or off; a list "
                             "(off,regions) runs (b) and (c) once per scope")
    parser.add_argument("--workers", default=f"0,{min(4, os.cpu_count() or 1)}",
                        help="DataLoader workers for (a) and (b), a list: each count runs both [default: 0 and "
                             "min(4, cores), as a user would set it]")
    parser.add_argument("--random-init", action="store_true",
                        help="random-init encoders and the shipped vocabulary: the preset's architecture, no downloads")
    parser.add_argument("--loops", default="naive,shipped,ceiling",
                        help="which of the three to run (a ratio is printed when both of its loops ran)")
    parser.add_argument("--out", default="profiles", help="the record goes to OUT/<host>/")
    args = parser.parse_args()
    loops, scopes = args.loops.split(","), args.compile.split(",")
    if unknown := set(loops) - LABELS.keys():
        parser.error(f"--loops: unknown {', '.join(sorted(unknown))}; choose from naive, shipped, ceiling")
    if unknown := set(scopes) - set(COMPILE_SCOPES):
        parser.error(f"--compile: unknown {', '.join(sorted(unknown))}; choose from {', '.join(COMPILE_SCOPES)}")
    try:
        worker_counts = sorted({int(w) for w in args.workers.split(",")})
    except ValueError:
        parser.error(f"--workers {args.workers}: a comma-separated list of whole numbers")

    device = resolve_device(args.device)
    if "cudagraphs" in scopes and device.type != "cuda":
        parser.error(f"--compile cudagraphs needs a CUDA device, not {device}")
    counts = {"train": args.images, "val": 50, "test": 50}
    root = write_synth(cache_root() / "data" / synth_dir_name(counts, args.disk_size, 0), counts, args.disk_size, 0,
                       progress=False)
    precision = resolve_precision(args.precision, device)
    cfg = train_config(args.preset, data=str(root), device=str(device), precision=precision)
    mcfg = model_config(args.preset, fusion=args.fusion,
                        **({"pretrained": False, "text_model": "config"} if args.random_init else {}))
    tokenizer = build_tokenizer(mcfg)
    mcfg.vocab_size = max(mcfg.vocab_size, len(tokenizer))
    split = prepare_data(root, tokenizer, mcfg.image_size, mcfg.max_text_len, splits=("train",),
                         progress=False)[0]["train"]
    caption_split = load_splits(root, 0)[0]["train"]
    pairs, order = epoch_pairs(split, cfg.seed, epoch=1)  # (b)'s timed epoch: all three see these pairs in this order

    with tempfile.TemporaryDirectory() as out:
        runs = plan_runs(loops, scopes, worker_counts, cfg, mcfg, device, split, caption_split, pairs, order,
                         tokenizer, out)
        with contention.watch(contention.tree_of_this_run(torchrun=False)) as others:  # its DataLoader workers: ours
            rates, first_epoch_extra, graph_skips = run_rounds(runs, args.rounds)
    median = {k: statistics.median(v) for k, v in rates.items()}
    env = fingerprint()
    print(f"{machine_name(env, str(device))}: {args.preset}/{args.fusion} on {device} ({precision}), {len(pairs)} "
          f"pairs per epoch from {args.images} images of {args.disk_size} px, batch {cfg.batch_size}, "
          f"{torch.get_num_threads()} threads; median [min–max] of {args.rounds} rounds; beside it "
          f"{contention.describe(others)}{' (a busy neighbour)' if contention.busy(others) else ''}")
    for k, v in rates.items():
        print(f"  {label(k):<32} {spread(v)} samples/s")
    by_scope, mfu = summarize(rates, first_epoch_extra, scopes, worker_counts, precision), {}
    for scope in scopes:
        b = key("shipped", scope, worker_counts[0])
        if b in median:
            m = mfu[scope] = model_flops_utilisation(mcfg, split, pairs, cfg, device, median[b])
            print(f"{label(b)} at {m['train_gflop_per_sample']:.3f} GFLOP per training sample: "
                  f"{m['achieved_gflops']:.1f} GFLOP/s = {m['share_of_matmul']:.1%} of a {m['matmul']['dtype']} "
                  f"{m['matmul']['n']}² matmul measured now ({m['matmul']['gflops']:.0f} GFLOP/s)"
                  + (f", MFU {m['mfu_datasheet']:.1%} of the {m['datasheet_tflops']:.0f}-TFLOP/s datasheet peak"
                     if m["mfu_datasheet"] is not None else ""))
    compiled = "" if scopes == ["off"] else "-compile-" + "+".join(scopes)
    name = f"train-throughput-{args.preset}-{args.fusion}-{device.type}-{precision}{compiled}-{args.disk_size}px.json"
    path = Path(args.out) / env["host"] / name
    write_json(path, {"schema_version": SCHEMA_VERSION, "kind": "train_throughput", "args": vars(args),
                      "precision": precision, "pairs_per_epoch": len(pairs), "workers": worker_counts,
                      "samples_per_s": rates, "median": median, "by_compile": by_scope,
                      "first_epoch_extra_s": first_epoch_extra, "cudagraph_skips": graph_skips,
                      "mfu_by_compile": mfu, "contention": others, "environment": env})
    print(f"wrote {path}")


def run_rounds(runs: dict, rounds: int) -> tuple[dict, dict, dict]:
    """Every run once per round, in turn, so drift on a shared machine hits all of them alike."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    first_epoch_extra: dict[str, list[float]] = {}
    graph_skips: dict[str, int] = {}  # CUDA graphs inductor gave up on (kernels launched one by one instead)
    for round_ in range(1, rounds + 1):
        for k, run in runs.items():
            skips = counters["inductor"]["cudagraph_skips"]
            rate, extra = run()
            if "+cudagraphs" in k:
                graph_skips[k] = graph_skips.get(k, 0) + counters["inductor"]["cudagraph_skips"] - skips
            rates[k].append(rate)
            if extra is not None:
                first_epoch_extra.setdefault(k, []).append(extra)
            # one line per run: a run cut short (a lease's time limit) still leaves the ones before it
            print(f"  round {round_}: {k} {rate:.1f} samples/s"
                  + (f", first epoch {extra:+.1f} s" if extra is not None else "")
                  + (f", CUDA graphs skipped: {graph_skips[k]} (TORCH_LOGS=perf_hints says why)"
                     if graph_skips.get(k) else ""), flush=True)
    return rates, first_epoch_extra, graph_skips


def summarize(rates, first_epoch_extra, scopes, worker_counts, precision) -> dict:
    """The ratios, each as the median and the range of its per-round values, printed and returned per scope."""
    by_scope = {}
    for scope in scopes:
        r = by_scope[scope] = {"first_epoch_extra_s": None}
        for w in worker_counts:
            b = key("shipped", scope, w)
            for name, a in ((f"shipped_over_naive/w{w}", key("naive", workers=w)),
                            (f"shipped_over_ceiling/w{w}", key("ceiling", scope)),
                            (f"shipped_over_eager/w{w}", key("shipped", "off", w) if scope != "off" else None)):
                if a and (ratios := round_ratios(rates, b, a)):
                    r[name] = {"median": statistics.median(ratios), "rounds": ratios}
                    print(f"{'eager' if scope == 'off' else 'compile ' + scope}, {w} workers: "
                          f"{label(b)} / {label(a)} = {spread(ratios)}×")
            if b in first_epoch_extra and w == worker_counts[0]:  # round 1's: later rounds find compiled code cached
                r["first_epoch_extra_s"] = first_epoch_extra[b][0]
                print(f"  {label(b)}: first epoch {first_epoch_extra[b][0]:+.1f} s in round 1"
                      + (" (compiling)" if scope != "off" else ""))
    baseline = key("shipped", "off", worker_counts[0], "fp32")
    if ratios := round_ratios(rates, key("shipped", "off", worker_counts[0]), baseline):
        by_scope["off"]["precision_gain"] = {"median": statistics.median(ratios), "rounds": ratios}
        print(f"precision: (b) {precision} / (b) fp32 = {spread(ratios)}× (the same loop, the precision's own gain)")
    return by_scope


if __name__ == "__main__":
    main()
