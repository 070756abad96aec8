"""``fusionprof report``: training, export, latency and load records, from any number of machines, side by side.

Writes ``report.md`` and ``report.html`` (the same content, built once as a list of blocks) and PNG plots in
``report/``. Every table row and every plot names the machine (host and device) and backend it came from; a plot
shows one latency sweep (one record: machine, preset, precision, device, date), never cells of two; a section
without data says which command produces it.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from fusionprof import contention
from fusionprof.atomic import atomic_write
from fusionprof.env import STAMP_FORMAT, device_label, machine_name
from fusionprof.errors import UserError
from fusionprof.figures import batch_axis, plain_axis, pyplot, save_figure, slug
from fusionprof.latency_output import fusion_ranking
from fusionprof.load_report import load_section
from fusionprof.loadgen import LoadRecord
from fusionprof.measure import CV_WARNING, DRIFT_WARNING, P99_MIN_SAMPLES
from fusionprof.metrics import percent, time_to_best
from fusionprof.records import (
    PARTIAL_KIND,
    LatencyRecord,
    LatencyRow,
    backend_accuracy,
    busy_neighbour_cells,
    check_schema,
    drifted_cells,
    export_precision,
    int8_gate_of,
    model_accuracy,
    noisy_cells,
    told_apart,
    visit_spread,
)
from fusionprof.runtime import INFERENCE_PRECISIONS, SINCE_RESET

KINDS = ("train", "export", "latency", "load")
SKIP_DIRS = {"traces", "tensorboard", "onnx", "report"}
LOADGEN_LOG = "mlperf_log_"  # LoadGen's own logs beside a load record: no record of ours, and half-written mid-run


@dataclass
class Records:
    train: list[dict] = field(default_factory=list)  # metrics.json as train.py writes it
    export: list[dict] = field(default_factory=list)  # export.json as export.py writes it
    latency: list[LatencyRecord] = field(default_factory=list)
    load: list[LoadRecord] = field(default_factory=list)
    files: int = 0
    unfinished: list[str] = field(default_factory=list)  # latency sweeps cut short: their partial files

    def machines(self) -> list[str]:
        envs = [r["environment"] for r in self.train + self.export] + [r.environment for r in self.latency + self.load]
        return list(dict.fromkeys(machine_name(env) for env in envs))


@dataclass(frozen=True)
class SweepCell:
    """One latency row that is fit to be shown (timed, parity passed), with what its sweep ran."""

    preset: str
    precision: str
    device: str
    row: LatencyRow


@dataclass(frozen=True)
class Sweep:
    """One latency record, as a plot shows it: a panel holds one sweep's cells, never cells of two sweeps."""

    machine: str
    record: LatencyRecord

    @property
    def preset(self) -> str:
        return self.record.config["preset"]

    @property
    def precision(self) -> str:
        return self.record.config["precision"]

    @property
    def rows(self) -> list[LatencyRow]:
        """The rows fit for a plot: timed, parity passed."""
        return [r for r in self.record.rows if r.ok]

    @property
    def title(self) -> str:
        """What the sweep is: machine, preset, precision, device, when."""
        cfg = self.record.config
        return f"{self.machine} · {cfg['preset']} · {cfg['precision']} · {cfg['device']} · {_date(self.record.created)}"

    @property
    def slug(self) -> str:
        cfg = self.record.config
        return slug(f"{self.machine} {cfg['preset']} {cfg['device']} {cfg['precision']} {self.record.created}")


def _date(created: str) -> str:
    """``20261126T231708Z`` → ``2026-11-26 23:17 UTC`` (a stamp in another form is shown as it is)."""
    try:
        return datetime.strptime(created, STAMP_FORMAT).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return created


def sweeps(rec: Records) -> list[Sweep]:
    """Every latency record, by machine then date."""
    return sorted((Sweep(machine_name(r.environment, r.config.get("device")), r) for r in rec.latency),
                  key=lambda s: (s.machine, s.record.created))


def find_records(paths: list[Path]) -> Records:
    """Every fusionprof record (a JSON object with a known ``kind``) under the given files and folders."""
    out = Records()
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if not SKIP_DIRS & set(p.relative_to(path).parts[:-1])
                            and not p.name.startswith(LOADGEN_LOG))
        else:
            raise UserError(f"{path}: no such file or folder")
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable JSON record ({str(e).splitlines()[0]})") from None
        if isinstance(record, dict) and record.get("kind") == PARTIAL_KIND:
            out.unfinished.append(str(path))  # named in the report, never plotted: its sweep did not finish
            continue
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            if path in paths:  # named on the command line: merging nothing from it would read as merged
                raise UserError(f"{path}: not a fusionprof record (no 'kind' of {', '.join(sorted(KINDS))})")
            continue  # some other JSON in a folder (a tokenizer config, a manifest, LoadGen's log): not ours to report
        check_schema(record, path)
        if record["kind"] == LatencyRecord.kind:
            out.latency.append(LatencyRecord.from_dict(record, path))
        elif record["kind"] == LoadRecord.kind:
            out.load.append(LoadRecord.from_dict(record, path))
        else:
            getattr(out, record["kind"]).append({**record, "_file": str(path)})
        out.files += 1
    return out


# --------------------------------------------------------------------------- blocks → markdown / html


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + body[0])
        elif kind == "p":
            out.append(body[0])
        elif kind == "table":
            header, rows = body
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "|".join(" --- " for _ in header) + "|")
            out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
        elif kind == "img":
            out.append(f"![{body[1]}]({body[0]})")
        out.append("")
    return "\n".join(out)


STYLE = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4}"
         ".scroll{overflow-x:auto;max-width:100%;margin:1em 0}"
         "table{border-collapse:collapse;font-size:14px;font-variant-numeric:tabular-nums}"
         "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;white-space:nowrap}"
         "th{background:#f3f3f3;white-space:normal;vertical-align:bottom}.num{text-align:right}"
         "td.text{white-space:normal;min-width:12em}"
         "img{max-width:100%}figure{margin:1em 0 2em}figcaption{color:#555;font-size:14px}"
         "h3{margin-top:2em;border-bottom:1px solid #ddd}")


def to_html(blocks: list[tuple], title: str) -> str:
    """The blocks as one page: a table scrolls inside its own box (never the page), a cell of prose wraps, a
    figure's caption sits under it."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>"]
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(body[0])}</{kind}>")
        elif kind == "p":
            text = html.escape(body[0])
            parts.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", text) + "</p>")
        elif kind == "table":
            parts.append(_html_table(*body))
        elif kind == "img":
            parts.append(f"<figure><img src='{html.escape(body[0])}' alt='{html.escape(body[1])}'>"
                         f"<figcaption>{html.escape(body[1])}</figcaption></figure>")
    return "\n".join(parts) + "</body></html>\n"


NUMBER_CELL = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?\s*%?( \(.*\))?|–")  # 1549 (RSS), 97.8%, 2.1e-06, –


def _html_table(header: list[str], rows: list[list]) -> str:
    """A table in a box of its own that scrolls sideways, never the page. Numbers right-aligned, words left, a
    column of numbers' header too; a long cell (a reason, a status) wraps."""
    cells = [[str(c) for c in row] for row in rows]
    numeric = [bool(cells) and all(NUMBER_CELL.fullmatch(row[i]) for row in cells) for i in range(len(header))]

    def td(text: str) -> str:
        cls = "num" if NUMBER_CELL.fullmatch(text) else "text" if len(text) > 40 else ""
        return f"<td class='{cls}'>{html.escape(text)}</td>" if cls else f"<td>{html.escape(text)}</td>"

    head = "".join(f"<th class='num'>{html.escape(h)}</th>" if num else f"<th>{html.escape(h)}</th>"
                   for h, num in zip(header, numeric, strict=True))
    body = "".join("<tr>" + "".join(td(c) for c in row) + "</tr>" for row in cells)
    return f"<div class='scroll'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


# --------------------------------------------------------------------------- sections


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _train_rate(r: dict) -> str | None:
    """Achieved training GFLOP/s, with the MFU where the record has one (a known GPU in bf16 / fp16)."""
    tf = r.get("train_flops")
    if not tf:
        return None
    return f"{tf['achieved_tflops'] * 1e3:.0f}" + (f" (MFU {tf['mfu']:.1%})" if tf.get("mfu") is not None else "")


def _memory(r: dict) -> str:
    mem = r["peak_memory"]
    if "cuda_max_allocated_mib" in mem:
        return f"{mem['cuda_max_allocated_mib']:.0f} (CUDA)"
    if mem.get("host_peak_rss_scope") == SINCE_RESET:
        return f"{mem['host_peak_rss_mib']:.0f} (RSS)"
    return f"{mem['host_peak_rss_mib']:.0f} (RSS since process start)"  # every earlier run's in that process too


# Columns of the training table that records written before their field existed do not have: shown where one
# record has them ("–" in the others), left out with one note where none has.
def _time_to_best(r: dict) -> dict | None:
    """A training record's ``time_to_best``; for one written before it had it, worked out from its epoch history by
    the same rule (the history holds every figure it uses)."""
    return r.get("time_to_best") or (time_to_best(r["history"]) if r.get("history") else None)


OPTIONAL_TRAIN_COLUMNS: list[tuple[str, str, Callable[[dict], str | None]]] = [
    ("steady samples/s", "steady_samples_per_s",
     lambda r: None if r.get("steady_samples_per_s") is None else f"{r['steady_samples_per_s']:.0f}"),
    ("train GFLOP/s", "train_flops", _train_rate),
    ("to best val (s)", "time_to_best", lambda r: (best := _time_to_best(r)) and
     f"{best['train_seconds']:.0f} (epoch {best['epoch']})"),
]


def trained_on(r: dict) -> str:
    """A training record's machine, named by the device it trained on (its CPU where it trained on one)."""
    return machine_name(r["environment"], r["train_config"].get("device"))


def training_section(rec: Records) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Training: the study's table, extended")]
    if not rec.train:
        return blocks + [("p", "No training records yet: run `fusionprof train --fusion mid` (or "
                               "`fusionprof compare`).")]
    train = sorted(rec.train, key=lambda r: (trained_on(r), r["preset"], r["fusion"]))
    optional = [(h, key, get) for h, key, get in OPTIONAL_TRAIN_COLUMNS if any(get(r) is not None for r in train)]
    header = ["machine", "preset", "fusion", "precision", "params (M)", "GFLOP/sample", "epochs", "train (s)",
              "samples/s", *(h for h, _, _ in optional), "peak memory (MiB)", "test acc", "test AUC", "test pairs"]
    rows = [[trained_on(r), r["preset"], r["fusion"], r["train_config"]["precision"],
             _fmt(r["parameters"]["total"] / 1e6), _fmt(r["forward_flops_per_sample"]["total"] / 1e9, 3),
             r["epochs"], _fmt(r["train_seconds"], 0), _fmt(r["train_samples_per_s"], 0),
             *(get(r) or "–" for _, _, get in optional), _memory(r), percent(r["test"]["accuracy"], 1),
             _fmt(r["test"]["auc"], 3), r["test"]["pairs"]] for r in train]
    blocks += [("table", header, rows), ("p", _training_note(train, optional))]
    if undefined := [r for r in train if r["test"]["accuracy"] is None]:
        blocks.append(("p", "No test accuracy or AUC (–) where the model's logits were not finite (a diverged run, or "
                            "an overflowing precision): " + "; ".join(
                                f"{trained_on(r)} {r['preset']}/{r['fusion']} ({r['test']['invalid']})"
                                for r in undefined) + "."))
    if busy := [r for r in train if contention.busy(r.get("contention"))]:
        blocks.append(("p", "Trained beside a busy neighbour (other processes took the CPUs during its epochs; its "
                            "samples/s are lower than a quiet machine's): " + "; ".join(
                                f"{trained_on(r)} {r['preset']}/{r['fusion']} "
                                f"({contention.describe(r['contention'])})" for r in busy) + "."))
    return blocks + step_share_blocks(train)


def _training_note(train: list[dict], optional: list) -> str:
    note = ("Accuracy is image–text matching on the test split (one positive and one fixed negative per caption). "
            "Samples/s is over the whole run, first epoch (compile, cache warm-up) included. Peak memory is CUDA max "
            "allocated on a GPU and the process's peak RSS during the run on the host; “RSS since process start” "
            "marks a record (older, or without /proc) whose peak counts every run before it in that process too.")
    shown = {key for _, key, _ in optional}
    if "steady_samples_per_s" in shown:
        note += " Steady samples/s leaves out the first epoch of each process (of a resumed run's too)."
    if "train_flops" in shown:
        note += (" Train GFLOP/s: forward FLOPs at the mean caption length, ×3 for what trains (×1 for frozen "
                 "encoders, 0 for cached features), times the steady samples/s; MFU against the datasheet's "
                 "bf16/fp16 peak.")
    missing = [h for h, key, _ in OPTIONAL_TRAIN_COLUMNS if key not in shown]
    if missing:
        note += (f" Not shown: {' and '.join(missing)} — none of these training records has them (they were "
                 "written before the fields existed); a `fusionprof train` run today records them.")
    if "time_to_best" in shown:
        note += (" To best val: the training seconds (validation not included) until the epoch that first reached "
                 "the run's best validation accuracy, and that epoch (for a record written before it had this field, "
                 "worked out from its epoch history).")
    if any(get(r) is None for _, _, get in optional for r in train):
        note += " –: that record was written before the field existed."
    return note


def step_share_blocks(train: list[dict]) -> list[tuple]:
    """Where a profiled training step's host time goes, one column per part, and the GPU's busy share."""
    profiled = [r for r in train if r.get("step_breakdown")]
    if not profiled:
        return [("p", "No step breakdown: train with `--profile` for one.")]
    parts = list(dict.fromkeys(part for r in profiled for part in r["step_breakdown"]))
    busy = any((r.get("step_profile") or {}).get("gpu_busy_share") is not None for r in profiled)
    header = ["machine", "preset", "fusion", *parts, *(["GPU busy"] if busy else [])]
    rows = []
    for r in profiled:
        shares = [f"{r['step_breakdown'][p]['share']:.0%}" if p in r["step_breakdown"] else "–" for p in parts]
        gpu = (r.get("step_profile") or {}).get("gpu_busy_share")
        rows.append([trained_on(r), r["preset"], r["fusion"], *shares,
                     *([_fmt(gpu and 100 * gpu, 0) + ("%" if gpu is not None else "")] if busy else [])])
    unprofiled = len(train) - len(profiled)
    return [("h3", "Where a training step's time goes"), ("table", header, rows),
            ("p", "Shares of the profiled step's host time (`--profile`)" +
             ("; GPU busy is the GPU's kernel time in that step: a small share means the step waits on the host "
              "(kernel launches, Python), not on the GPU" if busy else "") +
             (f". {unprofiled} run(s) without `--profile` are not listed." if unprofiled else "."))]


def export_section(rec: Records) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Exported models")]
    if not rec.export:
        return blocks + [("p", "No export records yet: run `fusionprof export --checkpoint models/<run>/"
                               "checkpoint.pt`.")]
    header = ["machine", "fusion", "format", "precision", "status", "max abs error", "checkpoint acc",
              "exported acc", "size (MiB)", "build (s)"]
    rows = [_export_row(r) for r in sorted(rec.export, key=lambda r: (machine_name(r["environment"]), r["fusion"],
                                                                      r["format"]))]
    return blocks + [("table", header, rows),
                     ("p", "Build is the time to make the artifact, before its gates: the ONNX export; the .pt2's "
                           "export and ahead-of-time compile; a TensorRT engine's build, plus the ONNX export made "
                           "for it (not one reused); for int8, the quantization (onnxruntime's QDQ graph, and NNCF's "
                           "IR where openvino is installed), plus the fp32 export it quantized when that was made for "
                           "it rather than reused.")]


def build_seconds(built: dict, engine: dict | None = None) -> float | None:
    """Seconds an export record's artifact took to make (``export_section``'s "build" column); ``engine``: a
    TensorRT export's ``tensorrt``, whose build counts with the ONNX export made for it (never one reused, which has
    a row of its own)."""
    if engine is not None:
        onnx = 0.0 if "reused" in built else built.get("export_seconds", 0.0)
        return None if engine.get("build_seconds") is None else engine["build_seconds"] + onnx
    if "seconds" in built:  # .pt2: torch.export, compile
        return sum(built["seconds"].values())
    if "quantize_seconds" not in built:
        return built.get("export_seconds")
    nncf = (built.get("openvino") or {}).get("nncf") or {}
    source = built.get("quantized_from") or {}
    fp32 = 0.0 if "reused" in source else source.get("export_seconds", 0.0)
    return built["quantize_seconds"] + nncf.get("quantize_seconds", 0.0) + fp32


def _export_row(r: dict) -> list:
    """One export record as a table row; a build that failed shows its reason in place of the gates' figures."""
    built = r.get("pt2") or r.get("onnx") or {}
    precision = export_precision(r)
    if "failure" in r:
        return [machine_name(r["environment"]), r["fusion"], r["format"], precision, f"failed: {r['failure']}",
                "–", "–", "–", "–", "–"]
    return [machine_name(r["environment"]), r["fusion"], r["format"], precision, r["status"],
            f"{max(s['max_abs_error'] for s in r['parity']['shapes']):.1e}",
            percent(r["accuracy"]["checkpoint_accuracy"]), percent(r["accuracy"]["exported_accuracy"]),
            _fmt(built.get("size_mib"), 1), _fmt(build_seconds(built, r.get("tensorrt")), 1)]


def _latency_rows(rec: Records) -> dict[str, list[SweepCell]]:
    """ok rows per machine (a row that failed parity is no candidate for any plot, best or front), each tagged
    with its sweep's preset, precision and device: for the table across machines, not for plots (one sweep each).

    A cell measured by several sweeps on one machine keeps its latest measurement.
    """
    cells: dict[tuple, SweepCell] = {}
    for sweep in sorted(rec.latency, key=lambda s: s.created):
        cfg = sweep.config
        m = machine_name(sweep.environment, cfg.get("device"))
        for row in sweep.rows:
            if row.ok:
                key = (m, cfg["preset"], cfg["precision"], cfg["device"], row.fusion, row.backend, row.batch_size)
                cells[key] = SweepCell(cfg["preset"], cfg["precision"], cfg["device"], row)
    out: dict[str, list[SweepCell]] = defaultdict(list)
    for (m, *_), cell in cells.items():
        out[m].append(cell)
    return out


def latency_section(rec: Records, out_dir: Path) -> list[tuple]:
    """Per sweep: p50 latency and samples/s against batch size, and the backends it could not plot, with why."""
    blocks: list[tuple] = [("h2", "Inference latency and throughput")]
    if not rec.latency:
        return blocks + [("p", "No latency records yet: run `fusionprof latency` on each machine.")]
    blocks.append(("p", "One sweep (one `fusionprof latency` record) per heading: its plots never mix in the cells "
                        "of another sweep. A point is the p50; its whisker runs up to the p99 (to the p90 below 100 "
                        "samples, where there is no p99); samples/s is batch / mean latency (sequential calls)."))
    colors = _backend_colors(rec)
    for sweep in sweeps(rec):
        blocks += [("h3", sweep.title), ("p", f"Record: `{sweep.record.path}`")]
        timed = sum(r.host is not None for r in sweep.record.rows)
        busy, worst = busy_neighbour_cells(sweep.record.rows)
        if worst:
            blocks.append(("p", f"Timed beside a busy neighbour: {len(busy)} of {timed} cells (other processes "
                                f"took the CPUs while they were timed; worst {worst.fusion}/{worst.backend} batch "
                                f"{worst.batch_size}: {contention.describe(worst.contention)}). Their figures are "
                                "slower than a quiet machine's."))
        if spread := visit_spread(sweep.record.rows):
            visits, median, widest = spread
            lo, hi = min(widest.host.rounds_p50_ms), max(widest.host.rounds_p50_ms)
            blocks.append(("p", f"Interleaved: each cell timed in {visits} visits, one a round through the whole "
                                "sweep (`--rounds`), its figures over all of them. The p50s of a cell's visits lay "
                                f"{median:.0%} apart (largest over smallest) at the median cell and most at "
                                f"{widest.fusion}/{widest.backend} batch {widest.batch_size} ({lo:.2f} to {hi:.2f} "
                                "ms): the machine's pace moving between rounds, and each visit's own noise."))
            if ranking := fusion_ranking(sweep.record.rows):
                blocks.append(("p", ranking))
        noisy, worst = noisy_cells(sweep.record.rows)
        if worst:
            blocks.append(("p", f"Noisy: {len(noisy)} of {timed} cells had a coefficient of variation above "
                                f"{CV_WARNING:.0%} (largest: {worst.fusion}/{worst.backend} batch {worst.batch_size}, "
                                f"CV {worst.worst_cv:.0%}): a few slow calls, or a machine whose pace moved while they "
                                "were timed; their p50s are less sure than the others'."))
        moved, worst = drifted_cells(sweep.record.rows)
        if worst:
            first, second = worst.host.halves_p50_ms
            blocks.append(("p", f"Its pace changed while it was timed in {len(moved)} of {timed} cells: their p50 "
                                f"moved by more than {DRIFT_WARNING:.0%} between the first and the second half of "
                                f"their calls (largest: {worst.fusion}/{worst.backend} batch {worst.batch_size}, "
                                f"{first:.2f} → {second:.2f} ms). Such a p50 lies between two levels. On a shared "
                                "machine the other cells move too, from one sweep to the next "
                                "(`benchmarks/repeatability.py`); `fusionprof latency --rounds 3` spreads such "
                                "changes over every cell."))
        if sweep.rows:
            for metric, label in (("latency", "p50 latency (ms) vs batch size"),
                                  ("throughput", "samples/s (batch / mean latency) vs batch size")):
                png = plot_vs_batch(sweep, metric, colors, out_dir)
                blocks.append(("img", f"report/{png.name}", f"{label}, one line per backend — {sweep.title}"))
        blocks += copies_table(sweep.rows)
        not_shown: dict[tuple[str, str], int] = defaultdict(int)
        for r in sweep.record.rows:
            if not r.ok:
                not_shown[(r.backend, r.status)] += 1
        if not_shown:
            blocks += [("p", "Not plotted (not timed, or timed and failed parity):"),
                       ("table", ["backend", "status", "cells"], [[*k, n] for k, n in sorted(not_shown.items())])]
    return blocks


def copies_table(rows: list[LatencyRow]) -> list[tuple]:
    """A CUDA sweep's cells with the host↔device copies and without (device-resident: CUDA events, inputs and logits
    on the GPU), side by side as the spec has them; nothing for a sweep without device-resident timing (the CPU's).
    A p99 only from ``P99_MIN_SAMPLES`` samples, as everywhere ("–" below)."""
    resident = [r for r in rows if r.device_resident is not None]
    if not resident:
        return []
    table = [[r.fusion, r.backend, r.batch_size, _fmt(r.host.p50_ms), _fmt(r.device_resident.p50_ms),
              _fmt(r.host.p99_ms), _fmt(r.device_resident.p99_ms)] for r in resident]
    return [("p", "With the copies (host inputs → host logits, what the plots show) and device-resident (CUDA events, "
                  f"no copies), per cell; a p99 from {P99_MIN_SAMPLES} samples up:"),
            ("table", ["fusion", "backend", "batch", "p50 ms", "device-resident p50 ms", "p99 ms",
                       "device-resident p99 ms"], table)]


def _backend_colors(rec: Records) -> dict[str, str]:
    """One colour per backend across every plot of the report."""
    names = sorted({r.backend for s in rec.latency for r in s.rows})
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def shortlist(rec: Records) -> list[dict]:
    """The report's answer: per machine, preset, device and precision, the choices no other beats on both p50 latency
    and test accuracy (the Pareto front of the plots below) at the smallest and the largest batch, from the sweep that
    scored the most fusions there (of those, the newest); ``front`` is that front as text, fastest first."""
    chosen: dict[tuple, tuple[Sweep, list[tuple[float, float, LatencyRow, int | None]]]] = {}
    for sweep in sweeps(rec):  # by machine, then date
        measured = row_measured_accuracy(rec, sweep)
        scored = [(r.host.p50_ms, found[0], r, pairs_measured(found[2])) for r in sweep.rows
                  if (found := measured(r)) is not None]
        key = (sweep.machine, sweep.preset, device_label(sweep.record.config.get("device", "cpu")), sweep.precision)
        fusions = len({p[2].fusion for p in scored})
        if scored and (key not in chosen or fusions >= len({p[2].fusion for p in chosen[key][1]})):
            chosen[key] = (sweep, scored)
    entries = []
    for (machine, preset, device, precision), (sweep, scored) in sorted(chosen.items()):
        sizes = sorted({p[2].batch_size for p in scored})
        for batch in sorted({sizes[0], sizes[-1]}):
            at = [p for p in scored if p[2].batch_size == batch]
            alone = len({p[2].fusion for p in at}) == 1  # nothing to choose between: say so, never read as a win
            text = _front_text(pareto_front(at)) + \
                (" (no other fusion of this sweep has a test accuracy on record)" if alone else "")
            entries.append({"machine": machine, "preset": preset, "device": device, "precision": precision,
                            "batch": batch, "front": text, "record": Path(sweep.record.path or "").name})
    return entries


def shortlist_lines(entries: list[dict]) -> list[str]:
    """``shortlist``'s answer for a terminal: per machine, preset and device (named where there are several), each
    precision (fp32 first) and batch end on one line."""
    groups: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for e in entries:
        groups[(e["machine"], e["preset"], e["device"])].append(e)
    lines = ["which fusion to ship (the report's first table): the choices no other beats on both p50 and test "
             "accuracy, fastest first; ≈ not told apart in latency from the one before, ? not judged (one visit per "
             "cell)"] if groups else []
    for (machine, preset, device), group in groups.items():
        indent = "    " if len(groups) > 1 else "  "
        lines += [f"  {machine} · {preset} · {device}"] if len(groups) > 1 else []
        lines += [f"{indent}{e['precision']} batch {e['batch']}: {e['front']}"
                  for e in sorted(group, key=lambda e: (INFERENCE_PRECISIONS.index(e["precision"]), e["batch"]))]
    return lines


def shortlist_section(entries: list[dict]) -> list[tuple]:
    """``shortlist``'s answer as the report's first section."""
    blocks: list[tuple] = [("h2", "Which fusion to ship")]
    if not entries:
        return blocks + [("p", "Needs a latency sweep of trained models whose accuracy is on record: run `fusionprof "
                               "compare` (the whole study), or `fusionprof train` then `fusionprof latency`.")]
    rows = [[e["machine"], f"{e['preset']} · {e['precision']} · {e['device']}", e["batch"], e["front"], e["record"]]
            for e in entries]
    return blocks + [
        ("p", "The choices no other measured choice beats on both p50 latency and test accuracy, fastest first: the "
              "first is the fastest, the last the most accurate, and each one after the first buys accuracy with "
              "latency. Accuracy is measured as in the Pareto plots (below); a front that trades latency for "
              "accuracy says how many test pairs its accuracies were measured on and the 95 % interval of an "
              "accuracy on that many: a difference within it may be sampling noise. ≈: the sweep's visits did "
              "not tell that choice's latency apart from the one before it (their p50s "
              "overlap), so its extra accuracy costs no latency this sweep could measure. ?: its sweep timed "
              "each cell in one visit, which cannot tell whether the two latencies differ (on a shared VM one "
              "sweep's differences under about 20 % often do not repeat; `--rounds 3` judges them). Under a latency "
              "target at a request rate: `fusionprof recommend --p99-ms T --qps Q`."),
        ("table", ["machine", "sweep", "batch", "Pareto front: fusion (backend) p50, test accuracy", "record"], rows)]


def _front_text(front: list[tuple[float, float, LatencyRow, int | None]]) -> str:
    """The front, fastest first; after the first, ≈ where the sweep's visits did not tell a choice's latency apart from
    the one before it, and ? where they could not (a cell timed in one visit), never unmarked as if told apart. A
    front that trades latency for accuracy ends with the test pairs its accuracies rest on (the fewest) and the
    95 % interval of an accuracy on that many, at the front's least certain one."""
    parts = []
    for i, (p50, acc, r, _) in enumerate(front):
        apart = told_apart(front[i - 1][2].host.rounds_p50_ms, r.host.rounds_p50_ms) if i else True
        mark = {False: " ≈", None: " ?"}.get(apart, "")
        parts.append(f"{r.fusion} ({r.backend}) {p50:.2f} ms{mark}, {acc:.2%}")
    pairs = [p[3] for p in front]
    if len(front) < 2 or None in pairs:
        return "; ".join(parts)
    half = max(1.96 * math.sqrt(acc * (1 - acc) / min(pairs)) for _, acc, _, _ in front)
    return "; ".join(parts) + f" ({min(pairs)} test pairs: 95 % interval ±{100 * half:.1f} points)"


def pareto_section(rec: Records, out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Accuracy vs latency (Pareto front)")]
    if not rec.latency:
        return blocks + [("p", "Needs latency records (`fusionprof latency`) of trained models, and their export "
                               "(`fusionprof export`) or training (`fusionprof train`) records.")]
    colors = _backend_colors(rec)
    plotted = []
    for sweep in sweeps(rec):
        png = plot_pareto(sweep, row_accuracy(rec, sweep), colors, out_dir)
        if png:
            plotted.append(("img", f"report/{png.name}", f"test accuracy vs p50 latency, batch 1 and the largest "
                                                         f"batch — {sweep.title}"))
    if not plotted:
        return blocks + [("p", "No latency sweep timed a model whose accuracy in the sweep's precision is on record "
                               "(its export's gate, or its training run in that precision): a random-init sweep "
                               "has none.")]
    return blocks + [("p", "Test accuracy of the model each point timed, in the sweep's precision, measured as close "
                           "to what the point's backend runs as the records allow: its own answers where a LoadGen "
                           "accuracy run (`fusionprof load --accuracy`) has them; for a PyTorch backend its training "
                           "run's; the accuracy gate of the export it loads (at int8 that of the model it loads); else "
                           "ONNX's gate, another export's, the training run's; points of random-init models, "
                           "or of models with no such record, are left out. Colour is the backend, the marker the "
                           "fusion; the line joins the points no other point beats on both.")] + plotted


def row_measured_accuracy(rec: Records, sweep: Sweep) -> Callable[[LatencyRow], tuple[float, str, dict] | None]:
    """``model_accuracy`` of the model a sweep's row timed, in the sweep's precision, as the backend runs it: the
    accuracy, what measured it and its record; None for a random-init model or one without such a record."""
    def found(row: LatencyRow) -> tuple[float, str, dict] | None:
        model = row.model or {}
        return model_accuracy(rec.train, rec.export, model.get("checkpoint"), sweep.precision, row.backend,
                              model.get("checkpoint_hash"), machine_name(sweep.record.environment), rec.load,
                              sweep.record.config.get("device"))
    return found


def row_accuracy(rec: Records, sweep: Sweep) -> Callable[[LatencyRow], float | None]:
    """The test accuracy a sweep's row is plotted at (``row_measured_accuracy``'s figure)."""
    measured = row_measured_accuracy(rec, sweep)
    return lambda row: None if (found := measured(row)) is None else found[0]


def pairs_measured(record: dict) -> int | None:
    """How many test pairs the accuracy of a training, export or load record was measured on (None: not said)."""
    return (record.get("test") or record.get("accuracy") or {}).get("pairs")


def precision_section(rec: Records) -> list[tuple]:
    """Per machine, device and set of models, one sweep per precision side by side (``_study_sweeps``): per fusion
    the best p50 at batch 1 and 8 (each with its backend) and the test accuracy in that precision of the models that
    sweep ran (their export gate's, else their training run's). Never a best over sweeps of different days or
    models."""
    blocks: list[tuple] = [("h2", "Precisions side by side")]
    tables = []
    studies = sorted(_study_sweeps(rec).items(), key=lambda kv: (kv[0][:4], kv[0][4] or 0))
    for (machine, preset, device, models, threads), by_precision in studies:
        if len(by_precision) < 2:
            continue
        precisions = sorted(by_precision, key=lambda p: (p != "fp32", p))
        rows = []
        for fusion in sorted({r.fusion for s in by_precision.values() for r in s.rows}):
            for precision in precisions:
                sweep = by_precision[precision]
                best = [_best(sweep, fusion, b) for b in (1, 8)]
                if best != ["–", "–"]:
                    rows.append([fusion, precision, *best, _accuracy_in(rec, sweep, fusion)])
        cited = ", ".join(f"`{by_precision[p].path}`" for p in precisions)
        tables += [("h3", f"{machine} · {preset} · {device} · {models}"
                          + (f" · {threads} threads" if threads is not None else "")),
                   ("table", ["fusion", "precision", "best p50 bs 1", "best p50 bs 8", "test accuracy"], rows),
                   ("p", f"Records: {cited}")]
        backends = {p: sorted({r.backend for r in by_precision[p].rows if r.ok}) for p in precisions}
        if len({tuple(b) for b in backends.values()}) > 1:
            tables.append(("p", "These sweeps ran different backends (" + "; ".join(
                f"{p}: {', '.join(b) or 'none'}" for p, b in backends.items()) + "): each precision's best is over "
                "its own sweep's backends, not over the same ones."))
    if not tables:
        return blocks + [("p", "One precision per machine so far. On a CPU with native bf16 or int8 (AVX512-BF16, "
                               "VNNI, AMX), `fusionprof compare` sweeps them beside fp32.")]
    return blocks + [("p", "Per machine and set of models (the folder of their checkpoints, or random init), each "
                           "precision's sweep that timed the most fusions, then the most cells, the newest of "
                           "those; accuracy is that of the models the sweep ran, in that precision (– for random-init "
                           "models), with the answers of the best cells' backends where a LoadGen accuracy run "
                           "(`fusionprof load --accuracy`) has them.")] + tables


def _study_sweeps(rec: Records) -> dict[tuple[str, str, str, str, int | None], dict[str, LatencyRecord]]:
    """(machine, preset, device, models, threads) → precision → one latency record: of the sweeps of those models in
    that precision on that many threads, the one that timed the most fusions, then the most cells, the newest of those
    (a later sweep of one fusion, or of every fusion at one batch size on two backends, does not stand in for the
    study's; a sweep on another thread count is another comparison)."""
    out: dict[tuple[str, str, str, str, int | None], dict[str, LatencyRecord]] = defaultdict(dict)
    for sweep in sorted(rec.latency, key=lambda s: (len({r.fusion for r in s.rows if r.ok}), sum(r.ok for r in s.rows),
                                                    s.created)):
        cfg = sweep.config
        study = (machine_name(sweep.environment, cfg["device"]), cfg["preset"], cfg["device"], _models_of(sweep),
                 sweep.environment.get("torch_threads"))
        out[study][cfg["precision"]] = sweep
    return out


def _models_of(sweep: LatencyRecord) -> str:
    """Which models a sweep timed: the folder that holds their runs' checkpoints, else random init."""
    runs = {checkpoint.parent.parent for checkpoint in _checkpoints(sweep).values()}
    return f"models in {min(runs)}" if runs else "random init"


def _checkpoints(sweep: LatencyRecord) -> dict[str, Path]:
    """fusion → the checkpoint a sweep timed, as its rows name it (under any run name); random-init fusions have
    none."""
    return {r.fusion: Path(r.model["checkpoint"]) for r in sweep.rows if (r.model or {}).get("checkpoint")}


def _best_row(sweep: LatencyRecord, fusion: str, batch: int) -> LatencyRow | None:
    at = [r for r in sweep.rows if r.ok and (r.fusion, r.batch_size) == (fusion, batch)]
    return min(at, key=lambda r: r.host.p50_ms, default=None)


def _best(sweep: LatencyRecord, fusion: str, batch: int) -> str:
    best = _best_row(sweep, fusion, batch)
    return f"{best.host.p50_ms:.2f} ms ({best.backend})" if best else "–"


def _best_backends(sweep: LatencyRecord, fusion: str) -> list[str]:
    """The backends of the precision table's cells (the best p50 at batch 1 and 8), in that order."""
    return [best.backend for b in (1, 8) if (best := _best_row(sweep, fusion, b))]


def _accuracy_in(rec: Records, sweep: LatencyRecord, fusion: str) -> str:
    """``model_accuracy`` of the model ``sweep`` timed for ``fusion``, as a table cell, whatever the backend: – where it
    is unknown; at int8, NNCF's IR's beside the QDQ graph's where openvino runs the IR; and the answers of each
    backend with a best cell where a LoadGen accuracy run has them (``backend_accuracy``)."""
    model = next((r.model for r in sweep.rows if r.fusion == fusion and (r.model or {}).get("checkpoint")), {})
    precision, machine = sweep.config["precision"], machine_name(sweep.environment)
    found = model_accuracy(rec.train, rec.export, model.get("checkpoint"), precision, None,
                           model.get("checkpoint_hash"), machine)
    if found is None:
        return "–"
    accuracy, how, record = found
    ir, model_name = int8_gate_of(record, "openvino") if record.get("kind") == "export" and precision == "int8" \
        else (None, "")
    also = [f"openvino runs NNCF's IR: {ir['exported_accuracy']:.2%}"] if model_name == "NNCF IR" else []
    for backend in dict.fromkeys(_best_backends(sweep, fusion)):
        own = backend_accuracy(rec.load, model["checkpoint"], precision, backend, model.get("checkpoint_hash"),
                               machine, sweep.config["device"])
        if own:
            also.append(f"{backend}'s own answers: {own[0]:.2%}, LoadGen accuracy run")
    return f"{accuracy:.2%} ({'; '.join([how, *also])})"


def cuda_memory_unseen(backend: str) -> str | None:
    """Why torch's allocator does not see what ``backend`` uses on CUDA (its class says), or None where it does. A
    sweep leaves such cells' figure out; one written before that rule still has it, and the report leaves it out."""
    from fusionprof.backends import BACKENDS

    return BACKENDS.get(backend).cuda_memory_unseen if backend in BACKENDS.names() else None


def cuda_max_allocated(row: LatencyRow) -> float | None:
    """A cell's CUDA max allocated (MiB), None where it was not measured or measures nothing of the backend's."""
    return None if cuda_memory_unseen(row.backend) else row.peak_memory.get("cuda_max_allocated_mib")


def memory_section(rec: Records, out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Peak memory vs batch size")]
    on_cuda = [s for s in sweeps(rec) if any(cuda_max_allocated(r) is not None for r in s.rows)]
    if not on_cuda:
        return blocks + [("p", "Per-batch memory is plotted from CUDA (max allocated); on the CPU each row of a "
                               "latency record has the process's peak RSS while that cell ran, which counts "
                               "everything the process holds (the other backends' models too). Run "
                               "`fusionprof latency --device cuda:0` on a GPU machine for this plot; the training "
                               "table above has each fusion's peak training memory.")]
    colors = _backend_colors(rec)
    for sweep in on_cuda:
        png = plot_vs_batch(sweep, "memory", colors, out_dir)
        blocks.append(("img", f"report/{png.name}", f"CUDA max allocated (MiB) vs batch size — {sweep.title}"))
    unseen = sorted({r.backend for s in on_cuda for r in s.rows if r.ok and cuda_memory_unseen(r.backend)})
    if unseen:
        blocks.append(("p", "Not plotted, because torch's allocator does not see their memory: "
                            + "; ".join(f"{b} — {cuda_memory_unseen(b)}" for b in unseen) + "."))
    return blocks


def cross_machine_section(rec: Records) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Across machines")]
    rows = _latency_rows(rec)
    machines = list(rows)
    if len(machines) < 2:
        return blocks + [("p", f"One machine so far ({machines[0] if machines else 'none'}): run `fusionprof "
                               "latency` on another machine and pass both result folders to `fusionprof report`.")]
    cells: dict[tuple, dict[str, float]] = defaultdict(dict)
    for m, machine_cells in rows.items():
        for c in machine_cells:
            key = (c.preset, c.precision, device_label(c.device), c.row.fusion, c.row.backend, c.row.batch_size)
            cells[key][m] = c.row.host.p50_ms
    header = ["preset", "precision", "device", "fusion", "backend", "batch"] + \
             [f"p50 ms (× fastest): {m}" for m in machines]
    table_rows = []
    for key in sorted(cells):
        values = cells[key]
        if len(values) < 2:
            continue
        fastest = min(values.values())
        table_rows.append([*key, *(f"{values[m]:.2f} ({values[m] / fastest:.2f}×)" if m in values else "–"
                                   for m in machines)])
    if not table_rows:
        return blocks + [("p", "No (preset, precision, device, fusion, backend, batch) cell was measured on two "
                               f"machines: {', '.join(machines)} ran different presets, precisions or devices.")]
    return blocks + [("table", header, table_rows),
                     ("p", "Every cell that two or more machines measured (on the same kind of device), each "
                           "machine's latest sweep of it; beside each p50, how many times the fastest machine's p50 "
                           "for that cell it is.")]


# --------------------------------------------------------------------------- plots


def plot_vs_batch(sweep: Sweep, metric: str, colors: dict[str, str], out_dir: Path) -> Path:
    """One sweep: a panel per (preset, fusion), a line per backend; latency as the p50 with a whisker up to the p99
    (to the p90 where a cell has too few samples for a p99). One legend for the figure, plain tick numbers."""
    plt = pyplot()
    rows = [r for r in sweep.rows if metric != "memory" or cuda_max_allocated(r) is not None]
    fusions = sorted({r.fusion for r in rows})
    fig, axes = plt.subplots(1, len(fusions), figsize=(2.8 * len(fusions), 2.8), squeeze=False, sharey=True)
    values = {"latency": lambda r: r.host.p50_ms, "throughput": lambda r: r.throughput_samples_per_s,
              "memory": cuda_max_allocated}[metric]
    for ax, fusion in zip(axes.flat, fusions, strict=True):
        for backend in sorted({r.backend for r in rows if r.fusion == fusion}):
            rs = sorted((r for r in rows if (r.fusion, r.backend) == (fusion, backend)), key=lambda r: r.batch_size)
            x, y = [r.batch_size for r in rs], [values(r) for r in rs]
            if metric == "latency":
                upper = [(r.host.p99_ms or r.host.p90_ms) - r.host.p50_ms for r in rs]  # p50 up to p99 (or p90)
                ax.errorbar(x, y, yerr=[[0.0] * len(rs), upper], marker="o", ms=3, capsize=2, color=colors[backend],
                            label=backend)
            else:
                ax.plot(x, y, marker="o", ms=3, color=colors[backend], label=backend)
        batch_axis(ax, [r.batch_size for r in rows])
        ax.set_title(f"{sweep.preset} / {fusion}", fontsize=10)
        ax.grid(alpha=0.3)
    top = [(r.host.p99_ms or r.host.p90_ms) for r in rows] if metric == "latency" else []
    plain_axis(axes[0, 0], "y", [values(r) for r in rows] + top)
    axes[0, 0].set_ylabel({"latency": "p50 ms", "throughput": "samples/s", "memory": "MiB"}[metric])
    _figure_legend(fig, f"backend ({sweep.precision})")
    title = {"latency": "p50 latency", "throughput": "throughput", "memory": "CUDA max allocated"}[metric]
    return save_figure(plt, fig, f"{title} — {sweep.title}", out_dir / f"{metric}-{sweep.slug}.png")


def _figure_legend(fig, title: str) -> None:
    """The figure's one legend, right of the panels, from every panel's lines (each backend once)."""
    handles = {}
    for a in fig.axes:
        for handle, label in zip(*a.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), title=title, loc="center left", bbox_to_anchor=(1.0, 0.5),
               fontsize=8, title_fontsize=8, frameon=False)


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The points ``(latency, accuracy, ...)`` no other point beats on both lower latency and higher accuracy, by
    latency; what a point carries after its two figures comes with it."""
    front, best = [], -1.0
    for point in sorted(points, key=lambda p: (p[0], -p[1])):
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front


MARKERS = "osD^vP*X"


def plot_pareto(sweep: Sweep, accuracy: Callable[[LatencyRow], float | None], colors: dict[str, str],
                out_dir: Path) -> Path | None:
    """One sweep: accuracy (``accuracy(row)``; rows without one are left out) against p50 at batch 1 and the sweep's
    largest batch. Colour is the backend and the marker the fusion, named in legends beside the panels: no label is
    written on a point, so none overlaps."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    scored = [(r, acc) for r in sweep.rows if (acc := accuracy(r)) is not None]
    rows = [r for r, _ in scored]
    if not rows:
        return None
    plt = pyplot()
    fusions = sorted({r.fusion for r in rows})
    marker = dict(zip(fusions, MARKERS, strict=False))
    largest = max(r.batch_size for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4), squeeze=False)
    latencies = [r.host.p50_ms for r in rows if r.batch_size in (1, largest)]
    log = max(latencies) / min(latencies) >= 5  # one scale for both panels
    for ax, batch in zip(axes.flat, sorted({1, largest}), strict=False):
        points = [(r.host.p50_ms, acc, r) for r, acc in scored if r.batch_size == batch]
        for latency, acc, r in points:
            ax.scatter(latency, acc, s=40, color=colors[r.backend], marker=marker[r.fusion], zorder=3)
        front = pareto_front([(p[0], p[1]) for p in points])
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.5, zorder=2)
        ax.scatter([p[0] for p in front], [p[1] for p in front], s=120, facecolors="none", edgecolors="k", lw=0.8,
                   zorder=4)  # ringed: a front of one point (one choice beats every other) shows too
        plain_axis(ax, "x", [p[0] for p in points], log=log)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.margins(0.08)  # no marker cut by the frame
        ax.grid(alpha=0.3)
    backends = sorted({r.backend for r in rows})
    legend = [Line2D([], [], ls="", marker="o", color=colors[b], label=b) for b in backends]
    legend += [Line2D([], [], ls="", marker=marker[f], color="grey", label=f) for f in fusions]
    legend += [Line2D([], [], color="k", alpha=0.5, marker="o", ms=9, mfc="none", label="Pareto front")]
    fig.legend(handles=legend, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    return save_figure(plt, fig, f"accuracy vs latency — {sweep.title}", out_dir / f"pareto-{sweep.slug}.png")


# --------------------------------------------------------------------------- entry point


def write_report(paths: list[Path], out: Path) -> dict:
    """Merge the records under ``paths`` into ``out/report.md``, ``out/report.html`` and ``out/report/*.png``."""
    rec = find_records(paths)
    plots = out / "report"
    plots.mkdir(parents=True, exist_ok=True)
    machines = rec.machines()
    blocks: list[tuple] = [("h1", "fusionprof report"),
                           ("p", f"{rec.files} records from {len(machines)} machine(s): " + "; ".join(machines)
                            if rec.files else "No records found: run `fusionprof compare` (the whole study), or "
                                              "`fusionprof train`, `fusionprof export` and `fusionprof latency`.")]
    if rec.unfinished:
        blocks.append(("p", f"Not reported: {len(rec.unfinished)} latency sweep(s) cut short, their rows so far in "
                            + ", ".join(f"`{p}`" for p in rec.unfinished)
                            + " (`fusionprof latency ... --resume` with the same settings finishes one)."))
    answer = shortlist(rec)
    blocks += shortlist_section(answer) + training_section(rec) + export_section(rec) + latency_section(rec, plots)
    blocks += precision_section(rec)
    blocks += pareto_section(rec, plots) + memory_section(rec, plots) + load_section(rec.load, out, rec.latency)
    blocks += cross_machine_section(rec)
    md, page = to_markdown(blocks), to_html(blocks, "fusionprof report")
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(md))
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(page))
    written = sorted(str(out / b[1]) for b in blocks if b[0] == "img")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "records": rec.files,
            "machines": machines, "plots": written, "shortlist": answer}
