"""Where a latency sweep's record goes: the JSON record, a CSV of its rows, and the end-of-run table."""

from __future__ import annotations

import csv
from pathlib import Path

from fusionprof.atomic import atomic_write, write_json
from fusionprof.contention import describe
from fusionprof.measure import CV_WARNING, DRIFT_WARNING, P99_MIN_SAMPLES
from fusionprof.records import (
    LatencyRecord,
    LatencyRow,
    busy_neighbour_cells,
    drifted_cells,
    fastest_fusions,
    visit_spread,
)

CSV_COLUMNS = ["fusion", "backend", "batch_size", "status", "parity_passed", "p50_ms", "p90_ms", "p99_ms",
               "device_resident_p50_ms", "device_resident_p99_ms", "mean_ms", "std_ms", "cv", "n",
               "throughput_samples_per_s", "achieved_gflops", "share_of_matmul_yardstick",
               "above_yardstick", "mfu",
               "first_call_of_fresh_backend_ms", "first_call_batch_size", "load_seconds", "cv_warning",
               "drift", "drift_warning", "warmup_calls", "warmup_seconds", "warmup_capped",
               "other_processes_cores", "steal_share"]


def write_record(record: LatencyRecord, path: Path) -> None:
    """``path`` (the JSON record) and the CSV beside it, both atomically; the record remembers its path."""
    write_json(path, record.to_dict())
    write_csv(path.with_suffix(".csv"), record.rows)
    record.path = str(path)


def write_csv(path: Path, rows: list[LatencyRow]) -> None:
    """One line per row; an empty cell where a row has no such figure (p99 below enough samples, a skip, the
    device-resident figures of a CPU row)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows({**r.contention, **r.to_dict(), **device_resident_figures(r)} for r in rows)
    atomic_write(path, write)


def device_resident_figures(row: LatencyRow) -> dict[str, float | None]:
    """A CUDA row's device-resident p50 and p99 (CUDA events, no copies), to stand beside its copy-inclusive ones;
    its p99 None below ``P99_MIN_SAMPLES`` samples, as every p99 is. Nothing for a row without such timing."""
    resident = row.device_resident
    return {"device_resident_p50_ms": resident.p50_ms, "device_resident_p99_ms": resident.p99_ms} if resident else {}


def _resident_cells(row: LatencyRow) -> str:
    """The table's device-resident p50 and p99 of ``row`` ("–" where it has none)."""
    t = row.device_resident
    figures = (t.p50_ms, t.p99_ms) if t else (None, None)
    return "".join(f"{'–' if ms is None else format(ms, '.2f'):>9}" for ms in figures)


def table(rows: list[LatencyRow]) -> list[str]:
    """The end-of-run table, one line per cell; unavailable backends get one line with their reason. On CUDA the
    device-resident p50 and p99 stand beside the copy-inclusive ones (no such columns where no row has them)."""
    resident = any(r.device_resident is not None for r in rows)
    lines = [f"{'fusion':<11}{'backend':<15}{'bs':>4}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}"
             + (f"{'dev p50':>9}{'dev p99':>9}" if resident else "") + f"{'CV':>7}{'samples/s':>11}{'GFLOP/s':>9}"]
    for r in rows:
        if r.host is None:
            lines.append(f"{r.fusion:<11}{r.backend:<15}{r.batch_size or '':>4}  {r.status}")
            continue
        t = r.host
        p99 = "–" if t.p99_ms is None else f"{t.p99_ms:.2f}"
        cv = "–" if t.cv is None else f"{t.cv:.1%}"
        warn = (" !" if r.noisy else "") + (" ~" if t.drift_warning else "") + (
            " ^" if r.above_yardstick else "") + (
            " +" if r.beside_busy_neighbour else "") + (" w" if t.warmup_capped else "") + (
            "" if r.ok else f" WRONG: {r.status}")
        lines.append(f"{r.fusion:<11}{r.backend:<15}{r.batch_size:>4}{t.p50_ms:>10.2f}{t.p90_ms:>10.2f}{p99:>10}"
                     + (_resident_cells(r) if resident else "")
                     + f"{cv:>7}{r.throughput_samples_per_s:>11.1f}{r.achieved_gflops:>9.1f}{warn}")
    timed = [r for r in rows if r.host is not None]
    if resident:
        lines.append("dev p50, dev p99: device-resident (CUDA events, inputs and logits on the GPU, no copies); the "
                     "other figures include the host→device and device→host copies")
    if any(t.p99_ms is None for r in timed for t in (r.host, r.device_resident) if t is not None):
        one = "; CV needs at least 2 (a cell of one call: --min-calls 1, or a call past the time cap)"
        lines.append(f"– p99 needs at least {P99_MIN_SAMPLES} samples (--min-calls {P99_MIN_SAMPLES})"
                     + (one if any(r.host.cv is None for r in timed) else ""))
    if timed:
        lines.append("samples/s and GFLOP/s: batch / mean latency, calls one after another")
    if spread := visit_spread(timed):
        visits, median, widest = spread
        lines.append(f"each cell timed in {visits} visits, one a round through the whole sweep (--rounds); its "
                     f"figures are over all of them, each visit's p50 is in the record (rounds_p50_ms): {median:.0%} "
                     f"apart at the median cell, most at {widest.fusion}/{widest.backend} batch {widest.batch_size} "
                     f"({min(widest.host.rounds_p50_ms):.2f} to {max(widest.host.rounds_p50_ms):.2f} ms)")
        if ranking := fusion_ranking(timed):
            lines.append(ranking)
    if any(r.noisy for r in timed):
        lines.append(f"! CV above {CV_WARNING:.0%}" + (" (with the copies, or device-resident)" if resident else "")
                     + ": noisy measurement (another process, frequency scaling, thermal)")
    _, worst = drifted_cells(timed)
    if worst:
        first, second = worst.host.halves_p50_ms
        lines.append(f"~ the p50 moved by more than {DRIFT_WARNING:.0%} between the first and the second half of "
                     f"the cell's calls (largest: {worst.fusion}/{worst.backend} batch {worst.batch_size}, "
                     f"{first:.2f} → {second:.2f} ms): the machine's pace changed while it was timed, so that p50 "
                     "lies between two levels (an unflagged cell is no promise of a steadier one: --rounds 3 "
                     "spreads such changes over every cell)")
    _, worst = busy_neighbour_cells(timed)
    if worst:
        lines.append(f"+ other processes were busy while that cell was timed (worst: {describe(worst.contention)}, "
                     f"{worst.fusion}/{worst.backend} batch {worst.batch_size}): slower than on a quiet machine; "
                     "where other work shares the cores, fewer --threads may be faster")
    if capped := [r for r in timed if r.host.warmup_capped]:
        worst = max(capped, key=lambda r: r.host.warmup_seconds)
        lines.append(f"w the warm-up cap ended that cell's warm-up before its minimum calls (longest: {worst.fusion}/"
                     f"{worst.backend} batch {worst.batch_size}, {worst.host.warmup_calls} calls in "
                     f"{worst.host.warmup_seconds:.1f} s): its first samples may still include compiling or tuning "
                     "(--max-warmup-seconds)")
    if any(r.above_yardstick for r in timed):
        lines.append("^ faster than the sweep's matmul yardstick (measured at its start and end): for that cell the "
                     "yardstick is no peak")
    if any(not r.ok for r in timed):
        lines.append("WRONG: that backend's logits differ from the eager model's beyond tolerance; it was timed "
                     "and kept in the record, and is left out of every best, plot and Pareto front")
    return lines


def fusion_ranking(rows: list[LatencyRow]) -> str | None:
    """An interleaved sweep's answer at its smallest and largest batch: the fusions by their fastest backend's p50,
    each marked where its visits did not tell it apart from the fastest's (None: fewer than two fusions timed, or a
    cell of one visit, which has nothing to tell it apart by)."""
    sizes = sorted({r.batch_size for r in rows if r.ok})
    parts, ties = [], False
    for batch in sorted({sizes[0], sizes[-1]}) if sizes else []:
        ranked = fastest_fusions(rows, batch)
        if len(ranked) < 2 or any(apart is None for _, apart in ranked[1:]):
            return None
        first, rest = ranked[0][0], ranked[1:]
        ties |= any(apart is False for _, apart in rest)
        parts.append(f"at batch {batch} {first.fusion} {first.host.p50_ms:.2f} ms ({first.backend}), then "
                     + ", ".join(f"{r.fusion} {r.host.p50_ms:.2f}" + (" ≈" if apart is False else "")
                                 for r, apart in rest) + " ms")
    if not parts:
        return None
    return ("Fusions by the p50 of their fastest backend: " + "; ".join(parts) + ". "
            + ("≈: not told apart from the fastest, their visits' p50s overlapping; the others were slower than it in "
               "every visit." if ties else "Each was slower than the fastest in every visit."))
