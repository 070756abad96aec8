"""``fusionprof report``: training, export and latency records, from any number of machines, side by side.

Writes ``report.md`` and ``report.html`` (the same content, built once as a list of blocks) and PNG plots in
``report/``. Every table row and every plot names the machine (host and device) and backend it came from; a
section without data says which command produces it.
"""

from __future__ import annotations

import html
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from fusionprof.atomic import atomic_write
from fusionprof.env import machine_name
from fusionprof.errors import UserError
from fusionprof.records import LatencyRecord, LatencyRow, check_schema

KINDS = ("train", "export", "latency")
SKIP_DIRS = {"traces", "tensorboard", "onnx", "report"}


@dataclass
class Records:
    train: list[dict] = field(default_factory=list)  # metrics.json as train.py writes it
    export: list[dict] = field(default_factory=list)  # export.json as export.py writes it
    latency: list[LatencyRecord] = field(default_factory=list)
    files: int = 0

    def machines(self) -> list[str]:
        envs = [r["environment"] for r in self.train + self.export] + [r.environment for r in self.latency]
        return list(dict.fromkeys(machine_name(env) for env in envs))


@dataclass(frozen=True)
class SweepCell:
    """One latency row that is fit to be shown (timed, parity passed), with what its sweep ran."""

    preset: str
    precision: str
    device: str
    row: LatencyRow


def find_records(paths: list[Path]) -> Records:
    """Every fusionprof record (a JSON object with a known ``kind``) under the given files and folders."""
    out = Records()
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += sorted(p for p in path.rglob("*.json") if not SKIP_DIRS & set(p.relative_to(path).parts[:-1]))
        else:
            raise UserError(f"{path}: no such file or folder")
    for path in files:
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: not a readable JSON record ({str(e).splitlines()[0]})") from None
        if not isinstance(record, dict) or record.get("kind") not in KINDS:
            continue  # some other JSON (a tokenizer config, a manifest): not ours to report
        check_schema(record, path)
        if record["kind"] == LatencyRecord.kind:
            out.latency.append(LatencyRecord.from_dict(record, path))
        else:
            getattr(out, record["kind"]).append({**record, "_file": str(path)})
        out.files += 1
    return out


# --------------------------------------------------------------------------- blocks → markdown / html


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


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


def to_html(blocks: list[tuple], title: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
             "img{max-width:100%}</style></head><body>"]
    for kind, *body in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{html.escape(body[0])}</{kind}>")
        elif kind == "p":
            text = html.escape(body[0])
            parts.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", text) + "</p>")
        elif kind == "table":
            header, rows = body
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows]
            parts.append("</table>")
        elif kind == "img":
            parts.append(f"<figure><img src='{html.escape(body[0])}' alt='{html.escape(body[1])}'>"
                         f"<figcaption>{html.escape(body[1])}</figcaption></figure>")
    return "\n".join(parts) + "</body></html>\n"


# --------------------------------------------------------------------------- sections


def _fmt(x, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _train_rate(r: dict) -> str:
    """Achieved training GFLOP/s, with the MFU where the record has one (a known GPU in bf16 / fp16)."""
    tf = r.get("train_flops")
    if not tf:
        return "–"  # recorded before training FLOP/s were
    return f"{tf['achieved_tflops'] * 1e3:.0f}" + (f" (MFU {tf['mfu']:.1%})" if tf.get("mfu") is not None else "")


def training_section(rec: Records) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Training: the study's table, extended")]
    if not rec.train:
        return blocks + [("p", "No training records yet: run `fusionprof train --fusion mid` (or "
                               "`fusionprof compare`).")]
    header = ["machine", "preset", "fusion", "precision", "params (M)", "GFLOP/sample", "epochs", "train time (s)",
              "samples/s", "train GFLOP/s", "peak memory (MiB)", "test acc", "test AUC", "test pairs",
              "largest step shares"]
    rows = []
    for r in sorted(rec.train, key=lambda r: (machine_name(r["environment"]), r["preset"], r["fusion"])):
        mem = r["peak_memory"]
        memory = mem.get("cuda_max_allocated_mib") or mem.get("host_peak_rss_mib")
        memory_kind = "CUDA" if "cuda_max_allocated_mib" in mem else "host RSS"
        shares = ""
        if r.get("step_breakdown"):
            top = sorted(r["step_breakdown"].items(), key=lambda kv: -kv[1]["share"])[:3]
            shares = ", ".join(f"{k} {v['share']:.0%}" for k, v in top)
            if (r.get("step_profile") or {}).get("gpu_busy_share") is not None:
                shares += f"; GPU busy {r['step_profile']['gpu_busy_share']:.0%}"
        rows.append([machine_name(r["environment"]), r["preset"], r["fusion"], r["train_config"]["precision"],
                     _fmt(r["parameters"]["total"] / 1e6), _fmt(r["forward_flops_per_sample"]["total"] / 1e9, 3),
                     r["epochs"], _fmt(r["train_seconds"], 0), _fmt(r["train_samples_per_s"], 0), _train_rate(r),
                     f"{memory:.0f} ({memory_kind})", f"{r['test']['accuracy']:.1%}", _fmt(r["test"]["auc"], 3),
                     r["test"]["pairs"], shares or "run with --profile"])
    return blocks + [("table", header, rows),
                     ("p", "Accuracy is image–text matching on the test split (one positive and one fixed negative "
                           "per caption). Train GFLOP/s: forward FLOPs at the mean caption length, ×3 for what "
                           "trains (×1 for frozen encoders, 0 for cached features), times samples/s; MFU against "
                           "the datasheet's bf16/fp16 peak (–: a record from before these were kept). Peak memory "
                           "is CUDA max allocated on a GPU and the process's peak RSS on the host. Step shares are "
                           "the host time of the profiled step's parts (`--profile`); GPU busy is the GPU's kernel "
                           "time in that step: a small share means the step waits on the host (kernel launches, "
                           "Python), not on the GPU.")]


def export_section(rec: Records) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Exported models")]
    if not rec.export:
        return blocks + [("p", "No export records yet: run `fusionprof export --checkpoint models/<run>/"
                               "checkpoint.pt`.")]
    header = ["machine", "fusion", "format", "precision", "status", "max abs error", "checkpoint acc",
              "exported acc", "size (MiB)", "export (s)"]
    rows = [_export_row(r) for r in sorted(rec.export, key=lambda r: (r["fusion"], r["format"]))]
    return blocks + [("table", header, rows)]


def _export_row(r: dict) -> list:
    """One export record as a table row; a build that failed shows its reason in place of the gates' figures."""
    built = r.get("pt2") or r.get("onnx") or {}
    seconds = sum(built["seconds"].values()) if "seconds" in built else built.get("export_seconds")
    precision = r.get("precision") or built.get("precision")  # records before the field name it in their artifact
    if "failure" in r:
        return [machine_name(r["environment"]), r["fusion"], r["format"], precision, f"failed: {r['failure']}",
                "–", "–", "–", "–", "–"]
    return [machine_name(r["environment"]), r["fusion"], r["format"], precision, r["status"],
            f"{max(s['max_abs_error'] for s in r['parity']['shapes']):.1e}",
            f"{r['accuracy']['checkpoint_accuracy']:.2%}", f"{r['accuracy']['exported_accuracy']:.2%}",
            _fmt(built.get("size_mib"), 1), _fmt(seconds, 1)]


def _latency_rows(rec: Records) -> dict[str, list[SweepCell]]:
    """ok rows per machine (a row that failed parity is no candidate for any plot, best or front), each tagged
    with its sweep's preset, precision and device.

    A cell measured by several sweeps on one machine keeps its latest measurement.
    """
    cells: dict[tuple, SweepCell] = {}
    for sweep in sorted(rec.latency, key=lambda s: s.created):
        m = machine_name(sweep.environment)
        cfg = sweep.config
        for row in sweep.rows:
            if row.ok:
                key = (m, cfg["preset"], cfg["precision"], cfg["device"], row.fusion, row.backend, row.batch_size)
                cells[key] = SweepCell(cfg["preset"], cfg["precision"], cfg["device"], row)
    out: dict[str, list[SweepCell]] = defaultdict(list)
    for (m, *_), cell in cells.items():
        out[m].append(cell)
    return out


def latency_section(rec: Records, out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Inference latency and throughput")]
    rows = _latency_rows(rec)
    if not rows:
        return blocks + [("p", "No latency records yet: run `fusionprof latency` on each machine.")]
    not_shown = sorted({(machine_name(s.environment), r.backend, r.status) for s in rec.latency for r in s.rows
                        if not r.ok})
    for machine, machine_rows in rows.items():
        for metric, label in (("latency", "p50 latency (ms), whiskers p90–p99 (p99 from 100 samples up)"),
                              ("throughput", "samples/s (batch / p50)")):
            png = plot_vs_batch(machine, machine_rows, metric, out_dir)
            blocks.append(("img", f"report/{png.name}", f"{label} vs batch size per backend — {machine}"))
    if not_shown:
        blocks.append(("table", ["machine", "backend", "status"], [list(u) for u in not_shown]))
    return blocks


def pareto_section(rec: Records, out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Accuracy vs latency (Pareto front)")]
    rows = _latency_rows(rec)
    if not rec.train or not rows:
        return blocks + [("p", "Needs both training records (`fusionprof train`) and latency records "
                               "(`fusionprof latency`) of the same preset.")]
    for machine, machine_rows in rows.items():
        png = plot_pareto(machine, machine_rows, pareto_accuracy(rec.train, machine), out_dir)
        if png:
            blocks.append(("img", f"report/{png.name}", f"test accuracy vs p50 latency, batch 1 and the largest "
                                                        f"batch — {machine}"))
    return blocks


def pareto_accuracy(train: list[dict], machine: str) -> dict[tuple[str, str], float]:
    """Test accuracy per (preset, fusion) to plot against ``machine``'s latencies: that machine's own training run
    where it has one, else another machine's (latency does not depend on the weights, accuracy not on the machine)."""
    accuracy: dict[tuple[str, str], float] = {}
    for r in sorted(train, key=lambda r: machine_name(r["environment"]) != machine):  # this machine's first
        accuracy.setdefault((r["preset"], r["fusion"]), r["test"]["accuracy"])
    return accuracy


def memory_section(rec: Records, out_dir: Path) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Peak memory vs batch size")]
    rows = {m: [c for c in cells if "cuda_max_allocated_mib" in c.row.peak_memory]
            for m, cells in _latency_rows(rec).items()}
    rows = {m: rs for m, rs in rows.items() if rs}
    if not rows:
        return blocks + [("p", "Per-batch memory is measured on CUDA (max allocated); on the CPU the only figure is "
                               "the process's peak RSS, which does not fall back between cells. Run "
                               "`fusionprof latency --device cuda:0` on a GPU machine for this plot; the training "
                               "table above has each fusion's peak training memory.")]
    for machine, machine_rows in rows.items():
        png = plot_vs_batch(machine, machine_rows, "memory", out_dir)
        blocks.append(("img", f"report/{png.name}", f"CUDA max allocated (MiB) vs batch size — {machine}"))
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
            cells[(c.preset, c.precision, c.row.fusion, c.row.backend, c.row.batch_size)][m] = c.row.host.p50_ms
    header = ["preset", "precision", "fusion", "backend", "batch"] + [f"p50 ms: {m}" for m in machines] + \
             [f"ratio {m} / {machines[0]}" for m in machines[1:]]
    table_rows = []
    for key in sorted(cells):
        values = cells[key]
        if machines[0] not in values or len(values) < 2:
            continue
        table_rows.append([*key, *(_fmt(values.get(m)) for m in machines),
                           *(_fmt(values[m] / values[machines[0]]) if m in values else "–" for m in machines[1:])])
    if not table_rows:
        return blocks + [("p", "No (preset, precision, fusion, backend, batch) cell was measured on two machines.")]
    return blocks + [("table", header, table_rows)]


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_vs_batch(machine: str, rows: list[SweepCell], metric: str, out_dir: Path) -> Path:
    """One panel per (preset, fusion), one line per (backend, precision); latency with p90–p99 whiskers (to p90
    only where a cell has too few samples for a p99)."""
    plt = _plt()
    panels = sorted({(c.preset, c.row.fusion) for c in rows})
    cols = min(4, len(panels))
    fig, axes = plt.subplots((len(panels) + cols - 1) // cols, cols, figsize=(4 * cols, 3.3 * ((len(panels) + cols - 1)
                                                                                            // cols)), squeeze=False)
    for ax, (preset, fusion) in zip(axes.flat, panels, strict=False):
        lines = defaultdict(list)
        for c in rows:
            if (c.preset, c.row.fusion) == (preset, fusion):
                lines[(c.row.backend, c.precision)].append(c.row)
        for (backend, precision), rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r.batch_size)
            x = [r.batch_size for r in rs]
            if metric == "latency":
                y = [r.host.p50_ms for r in rs]
                ax.errorbar(x, y, yerr=[[max(0.0, r.host.p50_ms - r.host.p90_ms) for r in rs],
                                        [(r.host.p99_ms or r.host.p90_ms) - r.host.p50_ms for r in rs]], marker="o",
                            ms=3, capsize=2, label=f"{backend} {precision}")
            else:
                y = [r.throughput_samples_per_s if metric == "throughput" else r.peak_memory["cuda_max_allocated_mib"]
                     for r in rs]
                ax.plot(x, y, marker="o", ms=3, label=f"{backend} {precision}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{preset} / {fusion}", fontsize=10)
        ax.set_xlabel("batch size")
        ax.set_ylabel({"latency": "p50 ms", "throughput": "samples/s", "memory": "MiB"}[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return _save(plt, fig, f"{metric} — {machine}", out_dir / f"{metric}-{slug(machine)}.png")


def _save(plt, fig, title: str, path: Path) -> Path:
    """Title, lay out, write atomically, free the figure."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both lower latency and higher accuracy, by latency."""
    front, best = [], -1.0
    for latency, acc in sorted(points, key=lambda p: (p[0], -p[1])):
        if acc > best:
            front.append((latency, acc))
            best = acc
    return front


def plot_pareto(machine: str, cells: list[SweepCell], accuracy: dict, out_dir: Path) -> Path | None:
    plt = _plt()
    cells = [c for c in cells if (c.preset, c.row.fusion) in accuracy]
    if not cells:
        return None
    largest = max(c.row.batch_size for c in cells)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, batch in zip(axes.flat, (1, largest), strict=True):
        points = []
        for c in cells:
            r = c.row
            if r.batch_size == batch:
                acc = accuracy[(c.preset, r.fusion)]
                points.append((r.host.p50_ms, acc))
                ax.scatter(r.host.p50_ms, acc, s=25)
                ax.annotate(f"{r.fusion}/{r.backend}", (r.host.p50_ms, acc), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        front = pareto_front(points)
        if front:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="k", lw=1, alpha=0.6,
                    label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("p50 latency (ms)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"batch {batch}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, f"accuracy vs latency — {machine}", out_dir / f"pareto-{slug(machine)}.png")


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
    blocks += training_section(rec) + export_section(rec) + latency_section(rec, plots) + \
        pareto_section(rec, plots) + memory_section(rec, plots) + cross_machine_section(rec)
    md, page = to_markdown(blocks), to_html(blocks, "fusionprof report")
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(md))
    atomic_write(out / "report.html", lambda tmp: tmp.write_text(page))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "records": rec.files,
            "machines": machines, "plots": sorted(str(p) for p in plots.glob("*.png"))}
