"""The command line: the only module that knows every part of fusionprof.

Library code raises ``UserError`` for anything the user can fix; here it becomes one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from fusionprof import __version__, contention
from fusionprof.backends import backend_names, export_formats
from fusionprof.config import PRESETS, model_config, train_config
from fusionprof.distributed import launched_by_torchrun, process_rank
from fusionprof.errors import UserError, first_line
from fusionprof.measure import Protocol, replace_protocol
from fusionprof.models import fusion_names
from fusionprof.runtime import INFERENCE_PRECISIONS, PRECISIONS, out_of_memory

PROTOCOL = Protocol()  # the timing protocol's defaults, shown in --help


class Group(click.Group):
    """A click group that turns UserError, the OS refusing a file (no such folder, no permission, a full disk) and
    memory running out into click's one-line 'Error: ...' exit."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Exception as e:
            message = one_line(e)
            if message is None:
                raise  # a bug: its traceback is what to report
            rank = process_rank()  # under torchrun every process reports; say which one beyond rank 0
            raise click.ClickException(message if rank == 0 else f"[rank {rank}] {message}") from None


def one_line(e: Exception) -> str | None:
    """What to tell of an error that is the user's or the machine's, not ours: None for any other."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:  # `[Errno 13] Permission denied: 'x'`
        target = f" → {e.filename2}" if e.filename2 is not None else ""
        return f"{e.filename}{target}: {e.strerror[0].lower()}{e.strerror[1:]}"  # the file first, as ours say
    if isinstance(e, OSError):
        return str(e)
    if out_of_memory(e):
        return f"out of memory ({first_line(e)}): a smaller batch needs less (--batch-size, --batch-sizes, --max-batch)"
    return None


class RegistryChoice(click.Choice):
    """``click.Choice`` over a registry's names, read each time they are used: a fusion or backend registered after
    this module was imported (a plugin, a test) is offered and accepted like the shipped ones."""

    def __init__(self, names):
        self._names = names
        super().__init__([])

    @property
    def choices(self):
        return tuple(self._names())

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns the static list; the registry is the source here
        pass


def positive(ctx, param, value):
    if value is not None and value < 1:
        raise click.BadParameter(f"must be at least 1, got {value}")
    return value


def folder_name(ctx, param, value):
    """A name that becomes one folder under --out and --profiles: no path separator, no "..", which would write
    elsewhere or nest one run in another."""
    if value is not None and (not value.strip() or value in (".", "..") or "/" in value or "\\" in value
                              or "\0" in value):
        raise click.BadParameter(f"{value!r}: a run name is one folder name (no '/', not '.' or '..')")
    return value


def device_name(ctx, param, value):
    """A device named as records name theirs (cpu, cuda, cuda:N), for a filter over records: the device need not be
    here, but ``gpu`` or ``cuda:x`` matches nothing and would read as "nothing measured there"."""
    if value is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise click.BadParameter(f"{value!r} is not a device name: use cpu or cuda:N")
    return value


def number_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """A callback that holds a float option to [low, high] (or (low, high] with ``low_open``), finite: a negative
    time, a learning rate of 0 or a NaN is refused in one line, not run."""
    def check(ctx, param, value):
        if value is None:
            return value
        if not math.isfinite(value):
            raise click.BadParameter(f"must be a finite number, got {value}")
        if not (low < value if low_open else low <= value) or not value <= high:
            bounds = (f"above {low:g}" if low_open else f"at least {low:g}") if high == math.inf else \
                f"between {low:g} and {high:g}"
            raise click.BadParameter(f"must be {bounds}, got {value}")
        return value
    return check


seconds = number_in(0)  # a time or duration: 0 or more
above_zero = number_in(0, low_open=True)
SEED = click.IntRange(0, 2**32 - 1)  # what np.random.seed takes: any other seed is numpy's traceback, not ours
IMAGES = click.IntRange(min=2)  # a split of one image has no ITM negative (a caption of another image)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fusionprof")
@click.pass_context
def cli(ctx: click.Context):
    """Train, export and profile image+text fusion models, and tell which one to ship."""
    if launched_by_torchrun() and ctx.invoked_subcommand != "train":
        raise UserError(f"'{ctx.invoked_subcommand}' runs in one process; only 'train' runs under torchrun "
                        "(latency records from many machines merge in 'fusionprof report')")


@cli.group(cls=Group)
def data():
    """Datasets: write the embedded synthetic one."""


@data.command("synth")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: the cache folder the other commands read].")
@click.option("--train", "n_train", type=IMAGES, default=None, help="Train images.")
@click.option("--val", "n_val", type=IMAGES, default=None, help="Validation images.")
@click.option("--test", "n_test", type=IMAGES, default=None, help="Test images.")
@click.option("--size", type=click.IntRange(16, 1024), default=None,
              help="Image side in pixels (a smaller image cannot hold two shapes apart; each is resized to the "
                   "model's side anyway).")
@click.option("--seed", type=SEED, default=None)
def data_synth(out, n_train, n_val, n_test, size, seed):
    """Write the embedded dataset (seeded shapes + captions) in the COCO captions layout."""
    from fusionprof.data import DEFAULT_SYNTH, default_data_dir
    from fusionprof.data.synth import write_synth

    d = DEFAULT_SYNTH
    counts = {"train": n_train or d["counts"]["train"], "val": n_val or d["counts"]["val"],
              "test": n_test or d["counts"]["test"]}
    size, seed = size or d["size"], d["seed"] if seed is None else seed
    if out is None and (counts, size, seed) == (d["counts"], d["size"], d["seed"]):
        path = default_data_dir()
    elif out is None:
        raise UserError("give --out DIR for a dataset other than the default one")
    else:
        path = write_synth(out, counts, size, seed)
    click.echo(f"{path}: {counts['train']}/{counts['val']}/{counts['test']} images (train/val/test) at {size}px")


@cli.command()
@click.option("--fusion", type=RegistryChoice(fusion_names), required=True, help="Fusion method.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--data", type=click.Path(path_type=str), default=None,
              help="COCO folder or Karpathy dataset_coco.json [default: the embedded dataset].")
@click.option("--epochs", type=int, default=None, callback=positive)
@click.option("--batch-size", type=int, default=None, callback=positive)
@click.option("--lr", type=float, default=None, callback=above_zero, help="Learning rate of the fusion head.")
@click.option("--encoder-lr", type=float, default=None, callback=above_zero, help="Learning rate of the encoders.")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=None,
              help="Optimizer steps of linear warm-up before the cosine decay [default: the preset's].")
@click.option("--grad-accum", type=int, default=None, callback=positive, help="Micro-batches per optimizer step.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", *PRECISIONS]), default="auto", show_default=True,
              help="auto: bf16 autocast where the hardware has native bf16 (CUDA 8.0+, AVX512-BF16/AMX CPUs), "
                   "else fp32.")
@click.option("--compile", "compile_", type=click.Choice(["model", "regions", "cudagraphs"]), is_flag=False,
              flag_value="model", default=None,
              help="torch.compile the training step: the whole model (bare --compile), 'regions': each repeated "
                   "block, compiled once per shape (a shorter compile), or 'cudagraphs' (CUDA only): the whole model "
                   "with its kernels replayed as CUDA graphs, for steps that wait on kernel launches.")
@click.option("--freeze-encoders", is_flag=True, help="Train the fusion head only.")
@click.option("--cache-features", is_flag=True,
              help="With --freeze-encoders: encode each split once (memory-mapped cache), then train the head only.")
@click.option("--text-pool", type=click.Choice(["mean", "cls", "attn"]), default=None)
@click.option("--pretrained", type=click.Choice(["default", "none"]), default="default", show_default=True,
              help="'none': random-init encoders instead of the preset's pretrained weights.")
@click.option("--image-weights", type=click.Path(dir_okay=False), default=None,
              help="A local torchvision state_dict for the image encoder.")
@click.option("--text-model", default=None, help="Hugging Face name or local directory of the BERT.")
@click.option("--image-cache/--no-image-cache", default=True, show_default=True,
              help="Decode images once into a memory-mapped cache, or decode JPEGs every step.")
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="DataLoader worker processes (0: batches are loaded in the training process).")
@click.option("--seed", type=SEED, default=None)
@click.option("--run-name", "--run", "run", default=None, callback=folder_name,
              help="Run name [default: <preset>-<fusion>]. Under torchrun spell it --run-name (torchrun takes --run).")
@click.option("--resume", is_flag=True, help="Continue the run's checkpoint.")
@click.option("--fresh", is_flag=True, help="Start over even if the run has a checkpoint.")
@click.option("--limit-train", type=IMAGES, default=None, help="Use only N train images.")
@click.option("--limit-eval", type=IMAGES, default=None, help="Use only N val/test images.")
@click.option("--out", "models_dir", type=click.Path(file_okay=False), default="models", show_default=True,
              help="Where checkpoints go (models/<run>/).")
@click.option("--profiles", "profiles_dir", type=click.Path(file_okay=False), default="profiles",
              show_default=True, help="Where metrics and TensorBoard logs go (profiles/<run>/).")
@click.option("--profile", is_flag=True, help="Trace a few training steps in a separate run (TensorBoard).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def train(fusion, preset, text_pool, pretrained, image_weights, text_model, freeze_encoders, resume, fresh, quiet,
          compile_, **options):
    """Train one fusion method; writes models/<run>/checkpoint.pt and profiles/<run>/metrics.json."""
    from fusionprof.train import train as run_training

    if resume and fresh:
        raise click.UsageError("--resume and --fresh contradict each other: give one")
    mcfg = model_config(preset, fusion=fusion, text_pool=text_pool, image_weights=image_weights,
                        text_model=text_model, freeze_encoders=freeze_encoders or None,
                        pretrained=False if pretrained == "none" else None)
    if text_model is not None and not mcfg.pretrained:  # else it would only pick the tokenizer, silently
        why = "--pretrained none" if pretrained == "none" else f"the {preset} preset"
        raise click.UsageError(f"--text-model {text_model}: the encoders are random-init here ({why}), so no BERT "
                               "weights would be loaded from it; drop --text-model, or load one with --preset seed")
    tcfg = train_config(preset, compile=compile_, **options)
    ctx = click.get_current_context()
    asked = {"compile" if name == "compile_" else name for name in ctx.params
             if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    metrics = run_training(tcfg, mcfg, resume=resume, fresh=fresh, progress=not quiet, log=click.echo, asked=asked)
    skipped = metrics["skipped_total"]
    if process_rank() != 0:  # under torchrun, rank 0 speaks for all
        return
    steady = metrics["steady_samples_per_s"]
    click.echo(f"wrote {metrics['checkpoint']} and {Path(tcfg.profiles_dir) / metrics['run'] / 'metrics.json'}"
               f"  ({metrics['train_seconds']:.0f} s training, {metrics['train_samples_per_s']:.0f} samples/s"
               f"{f', {steady:.0f} without warm-up epochs' if steady else ''}"
               f"{f', {skipped} data entries skipped' if skipped else ''})")
    if metrics["test"]["accuracy"] is None:  # a model that answers NaN scores like chance: it must not pass as one
        raise UserError(f"{metrics['run']}: {metrics['test']['invalid']} on the test split, so it has no accuracy or "
                        f"AUC (metrics.json says null): the run diverged, or {metrics['test']['precision']} "
                        "overflows")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--data", default=None, help="Dataset [default: the one the checkpoint was trained on].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", type=int, default=None, callback=positive)
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="[default: the precision the checkpoint was trained and tested in]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(checkpoint, split, data, device, batch_size, precision, as_json):
    """ITM accuracy and ROC-AUC of a checkpoint on one split."""
    from fusionprof.evaluate import evaluate as run_evaluation
    from fusionprof.metrics import describe_scores

    result = run_evaluation(checkpoint, split, data, device, batch_size, precision)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    elif result["accuracy"] is not None:
        click.echo(f"{result['fusion']} on {result['split']} ({result['pairs']} pairs, {result['precision']}): "
                   f"{describe_scores(result, digits=2)}")
    if result["accuracy"] is None:  # all-NaN logits would score 0.5: a failure must not read as a chance-level model
        raise UserError(f"{checkpoint}: {result['invalid']} on the {split} split in {result['precision']}, so it has "
                        "no accuracy or AUC: the weights diverged, or the precision overflows")


@cli.command()
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True)
@click.option("--fmt", type=RegistryChoice(export_formats), default="onnx", show_default=True,
              help="What to export: the artifact a registered backend loads.")
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), default="fp32", show_default=True,
              help="fp16 writes an fp16 graph (what a strongly typed TensorRT needs); int8 a statically quantized "
                   "ONNX (calibrated on the validation split); pt2 packages hold their weights in fp32, bf16 or (on a "
                   "GPU) fp16.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder [default: beside the checkpoint].")
@click.option("--device", default="cpu", show_default=True, help="Where the exported model is verified.")
@click.option("--max-batch", type=int, default=32, show_default=True, callback=positive,
              help="Largest batch of the TensorRT optimization profile.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export(checkpoint, fmt, precision, out, device, max_batch, quiet):
    """Export a checkpoint (ONNX, a TensorRT engine, an AOTInductor .pt2) and verify parity and accuracy."""
    from fusionprof.export import export as run_export
    from fusionprof.metrics import percent

    record = run_export(checkpoint, fmt, precision, out, device, max_batch, progress=not quiet, log=click.echo)
    for row in record["parity"]["shapes"]:
        click.echo(f"parity batch {row['batch']:>2} seq {row['seq_len']:>2}: max abs {row['max_abs_error']:.2e}  "
                   f"max rel {row['max_rel_error']:.2e}  {'ok' if row['within'] else 'OUT OF TOLERANCE'}")
    acc = record["accuracy"]
    verdict = (f"{acc['invalid']}: FAILED" if "invalid" in acc else  # non-finite logits: no accuracy to compare
               f"|Δ| {acc['abs_difference']:.2%} ≤ {acc['tolerance']:.1%}: {'ok' if acc['passed'] else 'FAILED'}")
    click.echo(f"test accuracy ({acc['pairs']} pairs): checkpoint {percent(acc['checkpoint_accuracy'])}, "
               f"exported {percent(acc['exported_accuracy'])}  ({verdict})")
    openvino = record.get("onnx", {}).get("openvino")
    if openvino and "accuracy" in openvino.get("nncf", {}):
        click.echo(f"NNCF's IR on openvino: test accuracy {percent(openvino['nncf']['accuracy']['exported_accuracy'])}")
    if openvino:
        click.echo(f"openvino runs int8 from {openvino['loads']}: {openvino['why']}")
    if not record["passed"]:
        raise UserError(f"the exported model failed verification; marked failed in {record['record_path']}")
    click.echo(f"wrote {record['record_path']} (status ok)")


def csv_list(kind=str):
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            items = [kind(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {kind.__name__}", ctx, param) \
                from None
        if not items:
            raise click.BadParameter("empty list", ctx, param)
        return items
    return parse


@cli.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--fusion", "fusions", default="all", show_default=True, help="all, or a comma-separated list.")
@click.option("--backends", default=None, callback=csv_list(),
              help=f"Comma-separated, from {', '.join(backend_names())} [default: all of them]; one that cannot run "
                   "here is a row saying why, and none that can is an error.")
@click.option("--batch-sizes", default="1,2,4,8,16,32", show_default=True, callback=csv_list(int))
@click.option("--device", default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), default="fp32", show_default=True,
              help="int8: the quantized ONNX, for the backends that run it.")
@click.option("--seq-len", type=int, default=None, callback=positive, help="Caption length [default: the preset's].")
@click.option("--threads", type=int, default=None, callback=positive,
              help="Intra-op threads of every backend (torch, onnxruntime, openvino) [default: torch's].")
@click.option("--min-seconds", type=float, default=None, callback=seconds,
              help=f"Minimum sampling time per cell [default: {PROTOCOL.min_seconds:g} s].")
@click.option("--min-calls", type=int, default=None, callback=positive,
              help=f"Minimum samples per cell [default: {PROTOCOL.min_calls}].")
@click.option("--warmup-seconds", type=float, default=None, callback=seconds,
              help=f"Warm-up time per cell, before sampling [default: {PROTOCOL.warmup_seconds:g} s].")
@click.option("--warmup-calls", type=int, default=None, callback=positive,
              help=f"Warm-up calls per cell, at least [default: {PROTOCOL.warmup_calls}].")
@click.option("--max-warmup-seconds", type=float, default=None, callback=seconds,
              help="The warm-up's cap: after its first call, a cell's warm-up ends here even short of --warmup-calls "
              "(a backend that recompiles every call), and the row says so "
              f"[default: {PROTOCOL.max_warmup_seconds:g} s].")
@click.option("--rounds", type=int, default=None, callback=positive,
              help="Visits per cell: above 1, every backend is loaded first, then every cell is timed once a round "
              "(the order reversed each round), the sampling minimums split over the rounds, each visit warmed "
              "up anew; a change in the machine's pace then falls on every cell alike. Keeps every backend in "
              "memory at once [default: 3 for the tiny preset, 1 for bigger ones].")
@click.option("--build-jobs", type=int, default=None, callback=positive,
              help="AOTInductor packages (backend aoti) built at once, each in its own process, before anything is "
              "timed [default: one per CPU core].")
@click.option("--trace", is_flag=True, help="Also record torch profiler traces, in a separate short run.")
@click.option("--models", "models_dir", default="models", show_default=True, help="Where checkpoints are looked for.")
@click.option("--out", "profiles_dir", default="profiles", show_default=True, help="Results go to OUT/<host>/.")
@click.option("--resume", is_flag=True, help="Continue the newest unfinished sweep with these settings on this "
              "machine (OUT/<host>/latency-*.partial.json): its rows are kept, the rest measured (an interleaved sweep "
              "goes on from its last finished round).")
@click.option("--quiet", is_flag=True)
def latency(preset, fusions, backends, batch_sizes, device, precision, seq_len, threads, min_seconds, min_calls,
            warmup_seconds, warmup_calls, max_warmup_seconds, rounds, build_jobs, trace, models_dir, profiles_dir,
            resume, quiet):
    """Inference latency of fusions × backends × batch sizes, with one timing protocol."""
    from fusionprof.latency import SweepConfig, default_rounds, sweep, trace_problem
    from fusionprof.latency_output import table

    ctx = click.get_current_context()  # so that a bad list names its option, as a callback's error does
    option = next(p for p in ctx.command.params if p.name == "fusions")
    names = fusion_names() if fusions == "all" else csv_list()(ctx, option, fusions)
    unknown = sorted(set(names) - set(fusion_names()))
    if unknown:
        raise UserError(f"unknown fusion {unknown[0]!r}; choose from all, {', '.join(fusion_names())}")
    protocol = replace_protocol(Protocol(), min_seconds=min_seconds, min_calls=min_calls,
                                warmup_seconds=warmup_seconds, warmup_calls=warmup_calls,
                                max_warmup_seconds=max_warmup_seconds)
    cfg = SweepConfig(preset=preset, fusions=names, backends=backends or backend_names(), batch_sizes=batch_sizes,
                      device=device, precision=precision, seq_len=seq_len, threads=threads, models_dir=models_dir,
                      profiles_dir=profiles_dir, protocol=protocol, rounds=rounds or default_rounds(preset))
    if trace and (problem := trace_problem(cfg)):  # before the sweep, not after its minutes
        raise UserError(f"--trace traces the eager torch backend, which cannot run this sweep: {problem}")
    record = sweep(cfg, progress=not quiet, log=click.echo, resume=resume, jobs=build_jobs)
    for line in table(record.rows):
        click.echo(line)
    click.echo(f"wrote {record.path} and {Path(record.path).with_suffix('.csv')}")
    if trace:
        from fusionprof.latency import trace_inference

        traces = trace_inference(cfg, Path(record.path).parent)
        click.echo(f"traces in {traces} (tensorboard --logdir {profiles_dir}/traces)")


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("profiles"), show_default=True,
              help="Where report.md, report.html and report/*.png go.")
def report(paths, out):
    """Merge training, export and latency records (any machines) into a report with plots."""
    from fusionprof.report import shortlist_lines, write_report

    if not paths:  # the default folders that exist here: a study that exported nothing has no models/
        paths = [p for p in (Path("profiles"), Path("models")) if p.exists()]
        if not paths:
            raise UserError("nothing to report here: no profiles/ or models/ folder; name the folders or files that "
                            "hold the records (fusionprof report DIR ...)")
    result = write_report(list(paths), out)
    click.echo(f"{result['records']} records from {len(result['machines'])} machine(s) → {result['markdown']}, "
               f"{result['html']} ({len(result['plots'])} plots)")
    for line in shortlist_lines(result["shortlist"]):
        click.echo(line)


@cli.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--data", default=None, help="COCO folder [default: the embedded dataset].")
@click.option("--device", default="cpu", show_default=True)
@click.option("--epochs", type=int, default=None, callback=positive)
@click.option("--limit-train", type=IMAGES, default=None, help="Use only N train images.")
@click.option("--limit-eval", type=IMAGES, default=None, help="Use only N val/test images.")
@click.option("--batch-sizes", default=None, callback=csv_list(int), help="Latency batch sizes [default: 1…32].")
@click.option("--backends", default=None, callback=csv_list(),
              help=f"Latency backends, from {', '.join(backend_names())} [default: all, less those that compile "
                   "code when loaded on the CPU].")
@click.option("--min-seconds", type=float, default=None, callback=seconds,
              help=f"Minimum sampling time per latency cell [default: {PROTOCOL.min_seconds:g} s].")
@click.option("--min-calls", type=int, default=None, callback=positive,
              help=f"Minimum samples per latency cell [default: {PROTOCOL.min_calls}].")
@click.option("--rounds", type=int, default=None, callback=positive,
              help="Visits per latency cell, interleaved (see `fusionprof latency --help`) [default: 3 for the tiny "
                   "preset, 1 for bigger ones].")
@click.option("--precisions", default=None, callback=csv_list(),
              help="fp32 and the low precisions to sweep on the CPU, e.g. fp32,int8 [default: fp32 and those this "
                   "CPU computes natively (bf16: AVX512-BF16 / AMX-BF16; int8: VNNI / AMX-INT8)]. A low precision's "
                   "winning backends are scored in a LoadGen accuracy run where no gate measured them.")
@click.option("--load/--no-load", "under_load", default=True, show_default=True,
              help="Per fusion, a LoadGen Server search (p99 under --load-p99-ms, batching) and an Offline run.")
@click.option("--load-p99-ms", type=float, default=None, callback=above_zero,
              help="The Server scenario's p99 target [default: 50].")
@click.option("--load-seconds", type=float, default=None, callback=above_zero,
              help="Seconds each LoadGen run lasts at least [default: 5].")
@click.option("--load-queries", type=int, default=None, callback=positive,
              help="Queries each LoadGen run issues at least [default: LoadGen's rules, 1024 in Server].")
@click.option("--load-trials", type=int, default=None, callback=positive,
              help="Server runs of the search at most [default: 4].")
@click.option("--out", "models_dir", default="models", show_default=True)
@click.option("--profiles", "profiles_dir", default="profiles", show_default=True)
@click.option("--quiet", is_flag=True)
def compare(preset, data, device, epochs, limit_train, limit_eval, batch_sizes, backends, min_seconds, min_calls,
            rounds, precisions, under_load, load_p99_ms, load_seconds, load_queries, load_trials, models_dir,
            profiles_dir, quiet):
    """The whole study: train every fusion, export, time, trace, run under load, report. Re-runs skip finished
    stages."""
    from fusionprof.compare import UNDER_LOAD
    from fusionprof.compare import compare as run_compare

    given = {"p99_ms": load_p99_ms, "min_duration_s": load_seconds, "min_queries": load_queries,
             "max_trials": load_trials}
    plan = dataclasses.replace(UNDER_LOAD, **{k: v for k, v in given.items() if v is not None}) if under_load else None
    run_compare(preset=preset, data=data, device=device, models_dir=models_dir, profiles_dir=profiles_dir,
                epochs=epochs, limit_train=limit_train, limit_eval=limit_eval, batch_sizes=batch_sizes,
                backends=backends, protocol=replace_protocol(Protocol(), min_seconds=min_seconds, min_calls=min_calls),
                rounds=rounds, load_plan=plan, precisions=precisions, progress=not quiet, log=click.echo)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def env(as_json):
    """The hardware / software fingerprint stored with every result."""
    from fusionprof.env import fingerprint

    fp = fingerprint()
    if as_json:
        click.echo(json.dumps(fp, indent=2))
        return
    for key, value in fp.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, list):
            value = "; ".join(", ".join(f"{k}={v}" for k, v in item.items()) for item in value) or "none"
        click.echo(f"{key:>22}  {value}")


@cli.command()
@click.option("--fusion", required=True, help=f"Fusion method: {', '.join(fusion_names())}.")
@click.option("--backend", required=True, help=f"One of {', '.join(backend_names())}.")
@click.option("--scenario", required=True, help="server, offline or single-stream.")
@click.option("--qps", default=None, callback=csv_list(float), help="Server: offered rate(s), comma-separated.")
@click.option("--find-max-qps", is_flag=True, help="Server: bisect for the largest VALID rate with p99 ≤ --p99-ms.")
@click.option("--p99-ms", type=float, default=50.0, show_default=True, help="Server: LoadGen's p99 latency target.")
@click.option("--max-batch", type=int, default=1, show_default=True, help="Dynamic batching: largest batch (1: none).")
@click.option("--batch-timeout-ms", type=float, default=0.0, show_default=True,
              help="How long the oldest queued request waits for its batch to fill.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="tiny", show_default=True)
@click.option("--precision", type=click.Choice(INFERENCE_PRECISIONS), default="fp32", show_default=True,
              help="int8: the statically quantized export (on a CPU, onnxruntime or openvino), as the sweep runs it.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--min-duration", "min_duration_s", type=float, default=10.0, show_default=True,
              help="Seconds each LoadGen run lasts at least.")
@click.option("--min-queries", type=int, default=None, callback=positive,
              help="Queries each run issues at least [default: 1024 in server (what early stopping needs), else 100].")
@click.option("--max-trials", type=int, default=8, show_default=True, callback=positive,
              help="--find-max-qps: LoadGen runs at most.")
@click.option("--threads", type=int, default=None, callback=positive,
              help="Intra-op threads of every backend (torch, onnxruntime, openvino) [default: torch's].")
@click.option("--spin-wait/--no-spin-wait", default=True, show_default=True,
              help="onnxruntime's pool threads busy-wait between calls (its default, and the latency sweep's); "
                   "--no-spin-wait: they sleep, for a machine whose cores other work needs.")
@click.option("--accuracy", is_flag=True, help="LoadGen's accuracy mode, checked against the backend's accuracy.")
@click.option("--models", "models_dir", default="models", show_default=True, help="Where checkpoints are looked for.")
@click.option("--out", "profiles_dir", default="profiles", show_default=True, help="Results go to OUT/<host>/.")
@click.option("--quiet", is_flag=True)
def load(fusion, backend, scenario, qps, find_max_qps, quiet, **options):
    """MLPerf LoadGen against one fusion on one backend, behind a dynamic batcher."""
    from fusionprof.load import LoadConfig
    from fusionprof.load import load as run_load

    if fusion not in fusion_names():
        raise UserError(f"unknown fusion {fusion!r}; choose from {', '.join(fusion_names())}")
    cfg = LoadConfig(fusion=fusion, backend=backend, scenario=scenario, qps=qps or [], find_max_qps=find_max_qps,
                     **options)
    record = run_load(cfg, progress=not quiet, log=click.echo)
    if record.accuracy:
        acc = record.accuracy
        shown = "—" if acc["loadgen_accuracy"] is None else f"{acc['loadgen_accuracy']:.4%}"
        click.echo(f"accuracy from LoadGen's log {shown} vs the backend on the evaluation batches "
                   f"{acc['backend_accuracy']:.4%} ({acc['answered']}/{acc['pairs']} pairs answered): "
                   f"{'equal' if acc['matches'] else 'DIFFERENT'}")
    elif cfg.find_max_qps:
        above = f"; {record.invalid_qps:.1f} QPS was INVALID: the limit lies between" if record.invalid_qps else ""
        click.echo(f"max VALID server rate with p99 ≤ {cfg.p99_ms:g} ms: "
                   + (f"{record.max_qps:.1f} QPS{above}" if record.max_qps else "none (every trial was INVALID)"))
    if contention.busy(record.contention):
        click.echo(f"measured beside a busy neighbour ({contention.describe(record.contention)} on average): a "
                   "quiet machine serves more")
    click.echo(f"wrote {record.path}")
    if record.accuracy and not record.accuracy["matches"]:
        raise UserError("LoadGen's answers do not reproduce the backend's accuracy: the SUT answered wrong queries")


@cli.command()
@click.option("--p99-ms", type=float, required=True, callback=above_zero, help="The p99 latency target.")
@click.option("--qps", type=float, default=None, callback=above_zero, help="The request rate it must serve.")
@click.option("--min-accuracy", type=float, default=None, callback=number_in(0, 1),
              help="Least test accuracy, a fraction (0.95 for 95 %).")
@click.option("--device", default=None, callback=device_name,
              help="Only choices measured on this device (cpu, cuda:N).")
@click.option("--preset", type=click.Choice(list(PRESETS)), default=None,
              help="Only choices of this model size [default: every preset on record].")
@click.option("--profiles", "profiles_dir", default="profiles", show_default=True, help="Where records are read.")
def recommend(p99_ms, qps, min_accuracy, device, preset, profiles_dir):
    """Which fusion, backend, precision and batching meet a latency target, from the records on disk."""
    from fusionprof.recommend import recommend as choose

    result = choose(profiles_dir, p99_ms, qps, min_accuracy, device, preset)
    click.echo(result.message)
    for title, choices in (("meets the targets, cheapest first", result.chosen), ("Pareto front", result.front)):
        if choices:
            click.echo(f"\n{title}:")
        for c in choices:
            acc = "acc —" if c.accuracy is None else f"acc {c.accuracy:.2%} ({c.accuracy_source})"
            rate = (f"  max {c.max_qps:g} QPS" + (f" ({c.invalid_qps:g} missed the target)" if c.invalid_qps else "")
                    if c.max_qps else "")
            busy = "  (measured beside a busy neighbour)" if c.busy_neighbour else ""
            click.echo(f"  {c.preset}/{c.fusion} {c.backend} {c.precision} [{c.batching}] {c.device} on {c.machine}: "
                       f"p99 {c.p99_ms:.2f} ms{rate}  {acc}{busy}  ← {c.source}")


def main() -> None:
    cli(prog_name="fusionprof")


if __name__ == "__main__":
    sys.exit(main())
