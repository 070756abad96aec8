"""The report's load section: LoadGen records as tables and PNG plots, in ``report.py``'s block format.

Blocks are ("h2", text), ("p", text), ("table", header, rows), ("img", path relative to the report, caption).
An INVALID LoadGen run is shown as INVALID with LoadGen's reasons, never as a figure: its latency is not plotted
(only its offered rate, marked ×), and a find-max with no VALID trial reads "none VALID".
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from fusionprof import contention
from fusionprof.env import device_label, machine_name
from fusionprof.figures import pyplot, save_figure, slug
from fusionprof.loadgen import LoadRecord, LoadRun, gate_text, ms_or_dash, thread_count
from fusionprof.metrics import percent
from fusionprof.records import LatencyRecord

PLOT_DIR = "report"  # the plots' folder under the report's folder, as report.py writes its own


def find_load_records(paths: list[Path]) -> list[LoadRecord]:
    """Every load record (``kind: "load"``) in the given files and folders."""
    files = [p for path in paths for p in ([path] if path.is_file() else sorted(path.rglob("load-*.json")))]
    out = []
    for path in files:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and record.get("kind") == LoadRecord.kind:
            out.append(LoadRecord.from_dict(record, path))
    return out


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


OTHERS = "other processes (cores)"


def _others(load: dict) -> str:
    """Other processes' CPU use in cores, (busy) when it is a busy neighbour's; – where it was not watched."""
    if not load or load.get("other_processes_cores") is None:
        return "–"
    return f"{load['other_processes_cores']:.2f}" + (" (busy)" if contention.busy(load) else "")


INSIDE = "p99 in the SUT: queued / served ms"


def _inside(run: LoadRun) -> str:
    """A run's p99 time in the batcher's queue and being served, INVALID runs' too: the SUT's own times, which say
    why (a queue that grew is overload); – for a run recorded before the batcher timed them."""
    b = run.breakdown
    return f"{ms_or_dash(b['queued_ms']['p99'])} / {ms_or_dash(b['served_ms']['p99'])}" if b else "–"


def _verdict(run: LoadRun) -> str:
    return "VALID" if run.valid else "INVALID: " + "; ".join(run.invalid_reasons or ["no reason given"])


LABEL = "backend (batching, threads)"  # the header over ``_label``
GATE = "parity gate"  # the header over ``_gate``


def _gate(r: LoadRecord) -> str:
    """The record's parity gate in short: passed with its largest |Δ logit|, or "not checked" (an older record)."""
    return gate_text(r.gate, tolerance=False)


def _label(r: LoadRecord) -> str:
    """What tells two runs of one model apart: backend, precision, the device where it is not the CPU (one machine
    serves from both), batching, and how the backend's threads ran."""
    device = device_label(r.device)
    return f"{r.backend} {r.precision}{'' if device == 'cpu' else ' on ' + device} ({r.serving})"


def load_section(records: list[LoadRecord], out_dir: Path, latency: list[LatencyRecord] = ()) -> list[tuple]:
    """Server runs (p99 vs offered rate), the largest VALID rate per fusion, Offline samples/s beside the latency
    sweep's best throughput, SingleStream's percentiles. Plots go to ``out_dir / "report"``."""
    blocks: list[tuple] = [("h2", "Load scenarios (MLPerf LoadGen)")]
    if not records:
        return blocks + [("p", "No load records: run `fusionprof load --fusion F --backend B --scenario server "
                               "--find-max-qps --p99-ms 50` (and `--scenario offline`).")]
    blocks.append(("p", "Each row is one LoadGen run against one backend behind the dynamic batcher; Server "
                        "offers Poisson arrivals at the given rate. VALID/INVALID is LoadGen's verdict: an INVALID "
                        "run has no figure."))
    machines = defaultdict(list)
    for r in records:
        machines[machine_name(r.environment, r.device)].append(r)
    for machine, recs in machines.items():
        server = [r for r in recs if r.scenario == "server" and not r.accuracy]
        if server:
            blocks += _server_blocks(machine, server, out_dir)
        offline = [r for r in recs if r.scenario == "offline" and not r.accuracy]
        if offline:
            blocks += _offline_blocks(machine, offline, [x for x in latency
                                                         if machine_name(x.environment, x.config.get("device"))
                                                         == machine], out_dir)
        single = [r for r in recs if r.scenario == "single-stream" and not r.accuracy]
        if single:
            blocks += _single_stream_blocks(machine, single)
        checked = [r for r in recs if r.accuracy]
        if checked:
            blocks.append(("table", ["machine", "preset/fusion", "backend", "LoadGen accuracy", "backend accuracy",
                                     "equal", GATE, "record"],
                           [[machine, f"{r.preset}/{r.fusion}", _label(r), percent(r.accuracy["loadgen_accuracy"]),
                             percent(r.accuracy["backend_accuracy"]), "yes" if r.accuracy["matches"] else "NO",
                             _gate(r), Path(r.path or "").name] for r in checked]))
    blocks.append(("p", f"{GATE}: before any timed run, the backend's logits against the PyTorch fp32 model's on "
                        "fresh inputs, held to the tolerances the export and the latency sweep state per precision "
                        "(a backend that fails it, or whose checkpoint's export failed its gates, is not served); "
                        "the largest |Δ logit| seen. \"not checked\": a record written before load checked it."))
    return blocks


def _server_blocks(machine: str, records: list[LoadRecord], out_dir: Path) -> list[tuple]:
    rows = [[machine, f"{r.preset}/{r.fusion}", _label(r), f"{run.settings.get('target_qps', 0):.1f}",
             _ms(r.p99_target_ms), _verdict(run), _ms(run.p50_ms), _ms(run.p99_ms), _inside(run),
             _others(run.contention), _gate(r), Path(r.path or "").name]
            for r in records for run in sorted(r.runs, key=lambda run: run.settings.get("target_qps", 0))]
    best = [[machine, f"{r.preset}/{r.fusion}", _label(r), _ms(r.p99_target_ms),
             "none VALID" if r.max_qps is None else f"{r.max_qps:.1f}",
             "–" if r.invalid_qps is None else f"{r.invalid_qps:.1f}", str(len(r.runs)), _others(r.contention),
             Path(r.path or "").name]
            for r in records if r.config.get("find_max_qps")]
    blocks = [("table", ["machine", "preset/fusion", LABEL, "offered QPS", "p99 target ms",
                         "LoadGen", "p50 ms", "p99 ms", INSIDE, OTHERS, GATE, "record"], rows)]
    if best:
        blocks += [("p", f"The largest offered rate LoadGen called VALID (p99 within the target), by bisection, "
                         "and the smallest rate above it that was INVALID: the rate a setting sustains lies between, "
                         f"one LoadGen run deciding each rate — {machine}"),
                   ("table", ["machine", "preset/fusion", LABEL, "p99 target ms", "max VALID QPS",
                              "INVALID above", "trials", OTHERS, "record"], best)]
    if any(run.breakdown for r in records for run in r.runs):
        blocks.append(("p", f"{INSIDE}: each sample's time from LoadGen handing it over until its batch was taken "
                            "(waiting for the batch to fill, or behind the batch being served), and its batch's "
                            "inputs gathered and run, timed by the batcher; their p99s, which do not add up to "
                            "LoadGen's p99, but say whether a slow tail is queueing (more rate than the backend "
                            "serves: batch more, or add a replica) or serving (a slow backend call), for an INVALID "
                            "run too. The rest of LoadGen's figure is its own issue and completion, and threads "
                            "waking."))
    if any(r.contention for r in records):
        blocks.append(("p", f"{OTHERS}: the cores that processes other than fusionprof kept busy during the run, on "
                            "average (over all its trials for a search), from the kernel's counters; (busy) marks "
                            f"{contention.BUSY_CORES:g} cores or more, or {contention.STOLEN_SHARE:.0%} of the CPUs' "
                            "time stolen by the hypervisor: measured beside a busy neighbour, that rate is lower than "
                            "a quiet machine's. – : a record written before this was watched."))
    if best:
        png = plot_max_qps(machine, [r for r in records if r.config.get("find_max_qps")], out_dir)
        blocks.append(("img", f"{PLOT_DIR}/{png.name}", f"max VALID Server QPS under the p99 target — {machine}"))
    png = plot_p99_vs_qps(machine, records, out_dir)
    blocks.append(("img", f"{PLOT_DIR}/{png.name}", f"Server p99 vs offered QPS (× INVALID) — {machine}"))
    return blocks


def _offline_blocks(machine: str, records: list[LoadRecord], latency: list[LatencyRecord],
                    out_dir: Path) -> list[tuple]:
    rows = []
    for r in records:
        run = r.runs[0]
        rate = run.samples_per_s
        rows.append([machine, f"{r.preset}/{r.fusion}", _label(r), "INVALID" if rate is None else f"{rate:.1f}",
                     _verdict(run), sweep_best(r, latency), _gate(r), Path(r.path or "").name])
    png = plot_offline(machine, records, out_dir)
    return [("table", ["machine", "preset/fusion", LABEL, "Offline samples/s", "LoadGen",
                       "latency sweep best samples/s (batch ≤ max batch)", GATE, "record"], rows),
            ("p", "The latency sweep's column: the best sequential samples/s (batch / mean latency) of the same "
                  "preset, fusion, backend, precision and thread count on the same machine and device, over batch "
                  "sizes up to the load run's max batch (a batch the batcher never forms is no comparison), with the "
                  "batch size and its sweep's record (of any day: the machine's pace moves between days)."),
            ("img", f"{PLOT_DIR}/{png.name}", f"Offline samples/s — {machine}")]


def sweep_best(r: LoadRecord, latency: list[LatencyRecord]) -> str:
    """The best sequential samples/s that latency sweeps of ``r``'s machine, device, preset, precision, fusion and
    backend timed at a batch the batcher could form (≤ ``r.max_batch``) with as many threads as ``r``'s backend ran
    (where both say: a 2-thread cell is no measure of a 1-thread run), with its batch size and the record it came from
    (the machine's sweeps of every day are looked through); – where none did."""
    threads = thread_count(r.backend_info)
    cells = [(row, rec) for rec in latency
             if machine_name(rec.environment) == machine_name(r.environment)
             and device_label(rec.config.get("device", "cpu")) == device_label(r.device)
             and (rec.config.get("preset"), rec.config.get("precision")) == (r.preset, r.precision)
             for row in rec.rows
             if row.status == "ok" and (row.fusion, row.backend) == (r.fusion, r.backend)
             and row.batch_size is not None and row.batch_size <= r.max_batch and row.throughput_samples_per_s
             and (threads is None or thread_count(row.backend_info) in (None, threads))]
    best, rec = max(cells, key=lambda cell: cell[0].throughput_samples_per_s, default=(None, None))
    if best is None:
        return "–"
    return f"{best.throughput_samples_per_s:.1f} (batch {best.batch_size}" + \
        (f", {Path(rec.path).name})" if rec.path else ")")


def _single_stream_blocks(machine: str, records: list[LoadRecord]) -> list[tuple]:
    """One query in flight at a time: LoadGen's percentiles and queries/s per run."""
    rows = [[machine, f"{r.preset}/{r.fusion}", _label(r), _ms(run.p50_ms), _ms(run.p90_ms), _ms(run.p99_ms),
             "–" if run.samples_per_s is None else f"{run.samples_per_s:.1f}", _verdict(run), _gate(r),
             Path(r.path or "").name]
            for r in records for run in r.runs]
    return [("p", f"SingleStream: one query at a time, the next sent when the last is answered — {machine}"),
            ("table", ["machine", "preset/fusion", LABEL, "p50 ms", "p90 ms", "p99 ms", "QPS",
                       "LoadGen", GATE, "record"], rows)]


# --------------------------------------------------------------------------- plots


BESIDE_BUSY = " beside a busy neighbour"


def _setting(r: LoadRecord) -> str:
    """What a plot draws as one series: the label, and whether a busy neighbour ran beside it. Repeated searches of
    one setting (a benchmark's interleaved reps) share a colour and a legend entry instead of one each."""
    return _label(r) + (BESIDE_BUSY if contention.busy(r.contention) else "")


def plot_p99_vs_qps(machine: str, records: list[LoadRecord], out_dir: Path) -> Path:
    """One panel per (preset, fusion), one colour per setting (every record of it drawn as its own line): VALID
    runs' p99 against the offered rate, INVALID rates as × on the axis, the p99 target as a dashed line. The legend
    goes under its panel, so no number of settings hides the data."""
    plt = pyplot()
    panels = sorted({(r.preset, r.fusion) for r in records})
    settings = {key: sorted({_setting(r) for r in records if (r.preset, r.fusion) == key}) for key in panels}
    rows = max(len(v) for v in settings.values())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5 + 0.16 * rows), squeeze=False)
    for ax, (preset, fusion) in zip(axes.flat, panels, strict=True):
        mine = [r for r in records if (r.preset, r.fusion) == (preset, fusion)]
        names = settings[preset, fusion]  # over 10: tab20, so no two settings share a colour
        colour = {name: f"C{i}" if len(names) <= 10 else plt.get_cmap("tab20")(i % 20) for i, name in enumerate(names)}
        labelled = set()
        for r in mine:
            name = _setting(r)
            runs = sorted(r.runs, key=lambda run: run.settings.get("target_qps", 0))
            valid = [(run.settings["target_qps"], run.p99_ms) for run in runs if run.valid]
            invalid = [run.settings.get("target_qps", 0) for run in runs if not run.valid]
            label = None if name in labelled else name  # on the first thing drawn for the setting
            labelled.add(name)
            if valid:
                ax.plot(*zip(*valid, strict=True), marker="o", ms=3, color=colour[name], label=label,
                        ls=":" if BESIDE_BUSY in name else "-")
            ax.plot(invalid, [0] * len(invalid), "x", color=colour[name], clip_on=False,
                    transform=ax.get_xaxis_transform(), label=None if valid else label)
        for target in {r.p99_target_ms for r in mine if r.p99_target_ms}:
            ax.axhline(target, ls="--", color="grey", lw=1)
        ax.set_title(f"{preset} / {fusion}", fontsize=10)
        ax.set_xlabel("offered QPS (Poisson)")
        ax.set_ylabel("p99 ms (VALID runs)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    path = out_dir / PLOT_DIR / f"load-p99-{slug(machine)}.png"
    return save_figure(plt, fig, f"Server p99 vs offered QPS — {machine}", path)


def _bar_note(figures: list[float | None]) -> str:
    """A bar's label: the median of the VALID figures, how many those are, and how many records had none."""
    values = [v for v in figures if v is not None]
    counts = ([f"median of {len(values)}"] if len(values) > 1 else []) + \
        ([f"{len(figures) - len(values)} none VALID"] if len(values) < len(figures) else [])
    return f"{np.median(values):.0f}" + (f" ({'; '.join(counts)})" if counts else "")


def _setting_bars(plt, groups: dict[str, list[float | None]], xlabel: str, title: str, path: Path) -> Path:
    """One horizontal bar per setting: the median of its records' VALID figures, the line through it their range,
    how many those are and how many records had none; a setting with no VALID figure at all reads "none VALID"."""
    names = list(groups)
    fig, ax = plt.subplots(figsize=(8.0, 1.2 + 0.32 * len(names)))
    for i, name in enumerate(names):
        values = sorted(v for v in groups[name] if v is not None)
        if not values:
            ax.text(0, i, " none VALID", va="center", fontsize=7)
            continue
        median = float(np.median(values))
        ax.barh(i, median, color="C3" if BESIDE_BUSY in name else "C0", height=0.6)
        if len(values) > 1:
            ax.plot([values[0], values[-1]], [i, i], color="black", lw=1)
        ax.text(values[-1], i, f"  {_bar_note(groups[name])}", va="center", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.margins(x=0.25)
    ax.grid(alpha=0.3, axis="x")
    return save_figure(plt, fig, title, path)


def _bar(r: LoadRecord) -> str:
    """A bar of the load plots: one model (preset and fusion: a tiny and a seed search are never one median) in one
    setting."""
    return f"{r.preset}/{r.fusion} {_setting(r)}"


def _grouped(records: list[LoadRecord], name, value) -> dict[str, list[float | None]]:
    groups: dict[str, list[float | None]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.preset, r.fusion, r.backend, r.max_batch, _setting(r))):
        groups[name(r)].append(value(r))
    return groups


def plot_max_qps(machine: str, records: list[LoadRecord], out_dir: Path) -> Path:
    groups = _grouped(records, lambda r: f"{_bar(r)} p99≤{r.p99_target_ms:g}ms", lambda r: r.max_qps)
    return _setting_bars(pyplot(), groups, "max VALID QPS (bar: median of the searches, line: their range)",
                         f"max VALID Server QPS — {machine}", out_dir / PLOT_DIR / f"load-max-qps-{slug(machine)}.png")


def plot_offline(machine: str, records: list[LoadRecord], out_dir: Path) -> Path:
    groups = _grouped(records, _bar, lambda r: r.runs[0].samples_per_s)
    return _setting_bars(pyplot(), groups, "Offline samples/s (bar: median of the runs, line: their range)",
                         f"Offline samples/s — {machine}", out_dir / PLOT_DIR / f"load-offline-{slug(machine)}.png")
