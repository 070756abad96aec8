"""The report's figures: matplotlib without a display, plain tick numbers, written atomically.

Below ``report.py`` and ``load_report.py``, which both draw: one copy of each helper for both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from fusionprof.atomic import atomic_write


def slug(text: str) -> str:
    """A file-name-safe form of a label: ``vm (AMD EPYC)`` → ``vm-amd-epyc``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed), imported on first use: it is slow to import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, title: str, path: Path) -> Path:
    """Title, lay out, write atomically, free the figure."""
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path


def plain_number(value: float, _position: object = None) -> str:
    """A tick label as a reader writes it: 600, 2.5, 0.02, 12,000 — never 6×10²."""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def plain_axis(ax, axis: str, values: Sequence[float], log: bool | None = None) -> None:
    """Plain tick numbers on a log scale where the values span a factor of 5 or more (or where ``log`` says so),
    ticks at the densest of 1-1.5-2-3-4-5-7, 1-2-5 or 1 that gives at most 6; a linear scale from zero otherwise,
    where a log scale would show one tick or none."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    values = [v for v in values if v is not None and v > 0]
    target = ax.yaxis if axis == "y" else ax.xaxis
    if log is None:
        log = bool(values) and max(values) / min(values) >= 5
    if not log:
        ax.set_ylim(bottom=0) if axis == "y" else ax.set_xlim(left=0)
        target.set_major_formatter(FuncFormatter(plain_number))
        return
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")  # first: a scale brings its own ticks and labels
    target.set_major_formatter(FuncFormatter(plain_number))
    lo, hi = min(values), max(values)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 1.5, 2, 3, 4, 5, 7), (1, 2, 5), (1,)):
        ticks = [m * 10.0**e for e in decades for m in mantissas if lo / 1.1 <= m * 10.0**e <= hi * 1.1]
        if len(ticks) <= 6:
            break
    if len(ticks) >= 2:
        target.set_major_locator(FixedLocator(ticks))
        target.set_minor_formatter(NullFormatter())
    else:  # a narrow span: matplotlib's own ticks, printed plainly too
        target.set_minor_formatter(FuncFormatter(plain_number))


def batch_axis(ax, batch_sizes: Sequence[int]) -> None:
    """Batch sizes on a log₂ axis, a tick at each size measured, printed as 1, 2, 4 … (not 2⁰, 2¹)."""
    from matplotlib.ticker import NullLocator

    sizes = sorted(set(batch_sizes))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size")
