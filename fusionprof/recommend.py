"""``fusionprof recommend``: which (fusion, backend, precision, batching) to ship for a p99 target, from records.

Reads what is on disk, measures nothing: latency records (batch-1 rows with status ok and a p99: one request at a
time, no load), load records (each Server run LoadGen called VALID: p99 under an offered Poisson rate) and training
records (test accuracy per preset and fusion). A choice qualifies when its p99 is within the target (under at
least ``--qps`` when given: only load records answer that) and its accuracy is at least ``--min-accuracy``.
Qualifying choices come cheapest first: with a rate, the most headroom (the largest VALID rate over the asked one);
without, the lowest p99. The Pareto front (accuracy up, p99 down) is the set they were chosen from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusionprof.env import machine_name
from fusionprof.loadgen import LoadRecord
from fusionprof.records import check_schema

SKIP_DIRS = {"traces", "tensorboard", "onnx", "report"}
SEQUENTIAL = "none (batch 1, one request at a time)"


@dataclass
class Choice:
    """One deployable configuration with the figures that judge it and the files they came from."""

    machine: str
    device: str
    preset: str
    fusion: str
    backend: str
    precision: str
    batching: str
    p99_ms: float
    max_qps: float | None  # the largest VALID Server rate with p99 within the target (None: no load record)
    source: str  # the record the latency figure came from
    accuracy: float | None = None
    accuracy_source: str | None = None

    def key(self) -> tuple:
        return self.machine, self.device, self.preset, self.fusion, self.backend, self.precision, self.batching


def _device(name: str) -> str:
    return name if name == "cpu" or ":" in name else f"{name}:0"


def read_records(profiles_dir: Path) -> dict[str, list[tuple[dict, Path]]]:
    """Every training, latency and load record under ``profiles_dir``, by kind."""
    out: dict[str, list[tuple[dict, Path]]] = {"train": [], "latency": [], "load": []}
    for path in sorted(profiles_dir.rglob("*.json")):
        if SKIP_DIRS & set(path.relative_to(profiles_dir).parts[:-1]):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not a record of ours
        if isinstance(record, dict) and record.get("kind") in out:
            check_schema(record, path)
            out[record["kind"]].append((record, path))
    return out


def latency_choices(records: list[tuple[dict, Path]], p99_ms: float) -> list[Choice]:
    """Batch-1 rows of latency sweeps whose p99 is within the target."""
    choices = []
    for record, path in records:
        cfg = record.get("config", {})
        for row in record.get("rows", []):
            if row.get("status") == "ok" and row.get("batch_size") == 1 and row.get("p99_ms") is not None \
                    and row["p99_ms"] <= p99_ms:
                choices.append(Choice(machine_name(record["environment"]), _device(cfg.get("device", "cpu")),
                                      cfg.get("preset", "?"), row["fusion"], row["backend"],
                                      cfg.get("precision", "fp32"), SEQUENTIAL, row["p99_ms"], None, str(path)))
    return choices


def load_choices(records: list[tuple[dict, Path]], p99_ms: float, qps: float | None) -> list[Choice]:
    """Per load record, its VALID Server run at the largest offered rate with p99 within the target (and at
    least ``qps``)."""
    choices = []
    for raw, path in records:
        record = LoadRecord.from_dict(raw, path)
        runs = [run for run in record.runs if record.scenario == "server" and not run.accuracy and run.valid
                and run.p99_ms <= p99_ms and (qps is None or run.settings["target_qps"] >= qps)]
        if runs:
            best = max(runs, key=lambda run: run.settings["target_qps"])
            choices.append(Choice(machine_name(record.environment), _device(record.device), record.preset,
                                  record.fusion, record.backend, record.precision, record.batching, best.p99_ms,
                                  best.settings["target_qps"], str(path)))
    return choices


def pareto_front(choices: list[Choice]) -> list[Choice]:
    """The choices no other beats on both accuracy (up) and p99 (down); unknown accuracy counts as lowest."""
    def acc(c: Choice) -> float:
        return c.accuracy if c.accuracy is not None else -1.0
    return [c for c in choices
            if not any(acc(o) >= acc(c) and o.p99_ms <= c.p99_ms and (acc(o) > acc(c) or o.p99_ms < c.p99_ms)
                       for o in choices)]


@dataclass
class Recommendation:
    chosen: list[Choice]  # qualifying, cheapest first
    front: list[Choice]  # the Pareto front of everything measured that met the latency targets
    considered: int  # records read
    message: str  # a plain sentence: what was chosen, or why nothing could be


def recommend(profiles_dir: str | Path, p99_ms: float, qps: float | None = None, min_accuracy: float | None = None,
              device: str | None = None) -> Recommendation:
    profiles_dir = Path(profiles_dir)
    records = read_records(profiles_dir) if profiles_dir.is_dir() else {"train": [], "latency": [], "load": []}
    candidates = load_choices(records["load"], p99_ms, qps)
    if qps is None:
        candidates += latency_choices(records["latency"], p99_ms)
    if device:
        candidates = [c for c in candidates if c.device == _device(device)]
    # one figure per choice: the newest record's (files are read in name order, and names end in their time stamp)
    candidates = list({c.key(): c for c in candidates}.values())
    accuracy = {(r["preset"], r["fusion"]): (r["test"]["accuracy"], str(p)) for r, p in records["train"]
                if r.get("test")}
    for c in candidates:
        c.accuracy, c.accuracy_source = accuracy.get((c.preset, c.fusion), (None, None))
    chosen = [c for c in candidates if min_accuracy is None or (c.accuracy is not None and c.accuracy >= min_accuracy)]
    chosen.sort(key=lambda c: (-(c.max_qps or 0.0), c.p99_ms) if qps else (c.p99_ms, -(c.accuracy or 0.0)))
    considered = sum(len(v) for v in records.values())
    return Recommendation(chosen, pareto_front(candidates), considered,
                          _message(chosen, candidates, records, p99_ms, qps, min_accuracy, device))


def _message(chosen, candidates, records, p99_ms, qps, min_accuracy, device) -> str:
    target = f"p99 ≤ {p99_ms:g} ms" + (f" at {qps:g} QPS" if qps else "") + (f" on {device}" if device else "")
    make = (f"fusionprof load --fusion mid --backend onnxruntime --scenario server --find-max-qps --p99-ms {p99_ms:g}"
            + (f" --device {device}" if device else ""))
    if chosen:
        best = chosen[0]
        return (f"{best.fusion} on {best.backend} ({best.precision}, batching: {best.batching}) on {best.machine} "
                f"meets {target}" + (f" with accuracy ≥ {min_accuracy:g}" if min_accuracy is not None else ""))
    if qps and not records["load"]:
        return f"no load record can answer {target}: latency records time one request at a time. Run `{make}`"
    if not records["load"] and not records["latency"]:
        return f"no latency or load record under the profiles folder can answer {target}. Run `{make}`"
    if candidates and min_accuracy is not None:
        return (f"{len(candidates)} measured choice(s) meet {target}, but none has a recorded test accuracy ≥ "
                f"{min_accuracy:g} (train with `fusionprof train --fusion F`)")
    return (f"no measured choice meets {target} ({sum(len(v) for v in records.values())} records read). Measure "
            f"more: `{make}`")
