"""``fusionprof recommend``: which (fusion, backend, precision, batching) to ship for a p99 target, from records.

Reads what is on disk, measures nothing: latency records (batch-1 rows with status ok and a p99: one request at a
time, no load), load records (each Server run LoadGen called VALID against a p99 target no looser than the asked one:
p99 under an offered Poisson rate), and accuracy records (the test accuracy of the model a record timed, in its
precision, as ``records.model_accuracy`` finds it: the backend's own answers in a LoadGen accuracy run, else the
export's gate, else the training run's; unknown for a random-init model). A choice qualifies when its
p99 is within the target (under at least ``--qps`` when given: only load records answer that) and its accuracy is
known and at least ``--min-accuracy``. A choice is a machine, device, model, backend, precision, batching and how the
backend's threads ran (spin-wait or sleep, how many); of several records of one choice the best counts (the largest
VALID rate, else the lowest p99). Qualifying choices come cheapest first: with a rate, the most headroom (the largest
VALID rate over the asked one); without, the lowest p99. The Pareto front (accuracy up, and the quantity they are
ranked by: rate up with ``--qps``, else p99 down) is the set they were chosen from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fusionprof import contention
from fusionprof.env import device_label, machine_name
from fusionprof.errors import UserError
from fusionprof.loadgen import LoadRecord, threads_label
from fusionprof.records import LatencyRecord, check_schema, model_accuracy

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
    batching: str  # how requests reach the backend, and how its threads run (spin-wait or sleep, how many)
    p99_ms: float
    max_qps: float | None  # the largest VALID Server rate with p99 within the target (None: no load record)
    source: str  # the record the latency figure came from
    checkpoint: str | None = None  # the model it timed (None: random init)
    accuracy: float | None = None  # that model's test accuracy in ``precision`` (None: unknown)
    accuracy_source: str | None = None  # what measured it, and the record
    busy_neighbour: bool = False  # other processes kept the CPUs busy while it was measured: a quiet machine does more
    invalid_qps: float | None = None  # the smallest rate above ``max_qps`` its search found INVALID (None: none)
    checkpoint_hash: str | None = None  # which model the checkpoint held when it was timed (None: not recorded)
    host: str | None = None  # the machine, whatever the device (``machine_name`` without one): as records name it

    def key(self) -> tuple:
        return (self.machine, self.device, self.preset, self.fusion, self.backend, self.precision, self.batching,
                self.checkpoint, self.checkpoint_hash)

    def rank(self) -> tuple:
        """Best first: the largest VALID rate (load records), then the lowest p99."""
        return -(self.max_qps or 0.0), self.p99_ms


def read_records(profiles_dir: Path) -> dict[str, list[tuple[dict, Path]]]:
    """Every training, export, latency and load record under ``profiles_dir``, by kind."""
    out: dict[str, list[tuple[dict, Path]]] = {"train": [], "export": [], "latency": [], "load": []}
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
    """Batch-1 rows of latency sweeps whose p99 is within the target. Rows are read as ``LatencyRow`` so that the
    record's rules hold here too: a p99 from fewer than ``P99_MIN_SAMPLES`` calls is no p99 (a record written before
    that rule still carries one in its JSON), and such a row cannot qualify."""
    choices = []
    for record, path in records:
        cfg = record.get("config", {})
        for row in LatencyRecord.from_dict(record, path).rows:
            p99 = row.host.p99_ms if row.host is not None else None
            if row.ok and row.batch_size == 1 and p99 is not None and p99 <= p99_ms:
                threads, model = threads_label(row.backend_info or {}), row.model or {}
                serving = f"{SEQUENTIAL}, {threads}" if threads else SEQUENTIAL
                device = device_label(cfg.get("device", "cpu"))
                choices.append(Choice(machine_name(record["environment"], device), device,
                                      cfg.get("preset", "?"), row.fusion, row.backend, cfg.get("precision", "fp32"),
                                      serving, p99, None, str(path), model.get("checkpoint"),
                                      busy_neighbour=row.beside_busy_neighbour,
                                      checkpoint_hash=model.get("checkpoint_hash"),
                                      host=machine_name(record["environment"])))
    return choices


def load_choices(records: list[LoadRecord], p99_ms: float, qps: float | None,
                 device: str | None = None) -> tuple[list[Choice], int]:
    """Per load record (of ``device``, if given), its VALID Server run at the largest offered rate (at least ``qps``)
    that LoadGen judged against a p99 target within the asked one (VALID at a looser target says nothing of this
    one); and how many VALID runs measured a p99 within the target but were judged against a looser one."""
    choices, loose = [], 0
    for record in records:
        if device and device_label(record.device) != device_label(device):
            continue
        runs = [run for run in record.runs if record.scenario == "server" and not run.accuracy and run.valid
                and run.p99_ms <= p99_ms and (qps is None or run.settings["target_qps"] >= qps)]
        judged = [run for run in runs if (run.p99_target_ms or record.p99_target_ms or float("inf")) <= p99_ms]
        loose += len(runs) - len(judged)
        if judged:
            best = max(judged, key=lambda run: run.settings["target_qps"])
            choices.append(Choice(machine_name(record.environment, record.device), device_label(record.device),
                                  record.preset, record.fusion, record.backend, record.precision, record.serving,
                                  best.p99_ms, best.settings["target_qps"], record.path,
                                  (record.model or {}).get("checkpoint"),
                                  busy_neighbour=contention.busy(best.contention),
                                  invalid_qps=record.missed_above(best.settings["target_qps"], p99_ms),
                                  checkpoint_hash=(record.model or {}).get("checkpoint_hash"),
                                  host=machine_name(record.environment)))
    return choices, loose


def pareto_front(choices: list[Choice], by_rate: bool) -> list[Choice]:
    """The choices no other beats on both accuracy (up) and what they are ranked by: the VALID rate (up) with
    ``by_rate``, else p99 (down). Unknown accuracy counts as lowest."""
    def score(c: Choice) -> tuple[float, float]:
        return (c.accuracy if c.accuracy is not None else -1.0,
                (c.max_qps or 0.0) if by_rate else -c.p99_ms)

    def beats(o: Choice, c: Choice) -> bool:
        return all(a >= b for a, b in zip(score(o), score(c), strict=True)) and score(o) != score(c)
    return [c for c in choices if not any(beats(o, c) for o in choices)]


@dataclass
class Recommendation:
    chosen: list[Choice]  # qualifying, cheapest first
    front: list[Choice]  # the Pareto front of everything measured that met the latency targets
    considered: int  # records read
    message: str  # a plain sentence: what was chosen, or why nothing could be


def recommend(profiles_dir: str | Path, p99_ms: float, qps: float | None = None, min_accuracy: float | None = None,
              device: str | None = None, preset: str | None = None) -> Recommendation:
    profiles_dir = Path(profiles_dir)
    if not profiles_dir.is_dir():  # a mistyped folder must not read as "nothing measured yet"
        raise UserError(f"--profiles {profiles_dir}: no such folder; give the folder that holds the records")
    records = read_records(profiles_dir)
    load = [LoadRecord.from_dict(r, p) for r, p in records["load"]]  # read once: choices and accuracy runs
    candidates, loose = load_choices(load, p99_ms, qps, device)
    if qps is None:
        candidates += latency_choices(records["latency"], p99_ms)
    if device:
        candidates = [c for c in candidates if c.device == device_label(device)]
    if preset:
        candidates = [c for c in candidates if c.preset == preset]
    # one figure per choice: its best record's (the largest VALID rate, else the lowest p99), not the newest file's
    best: dict[tuple, Choice] = {}
    for c in sorted(candidates, key=Choice.rank):
        best.setdefault(c.key(), c)
    candidates = list(best.values())
    train, export = ([{**r, "_file": str(p)} for r, p in records[kind]] for kind in ("train", "export"))
    for c in candidates:
        found = model_accuracy(train, export, c.checkpoint, c.precision, c.backend, c.checkpoint_hash,
                               c.host, load, c.device)
        if found:
            c.accuracy, c.accuracy_source = found[0], f"{found[1]}: {found[2]['_file']}"
    chosen = [c for c in candidates if min_accuracy is None or (c.accuracy is not None and c.accuracy >= min_accuracy)]
    chosen.sort(key=Choice.rank if qps else lambda c: (c.p99_ms, -(c.accuracy or 0.0)))
    considered = sum(len(v) for v in records.values())
    return Recommendation(chosen, pareto_front(candidates, by_rate=bool(qps)), considered,
                          _message(chosen, candidates, records, p99_ms, qps, min_accuracy, device, loose))


def _spans(chosen: list[Choice]) -> str:
    """What a list across presets or machines must say: its entries are other models, or other computers."""
    presets = sorted({c.preset for c in chosen})
    machines = sorted({c.machine for c in chosen})
    parts = [f"{len(presets)} presets ({', '.join(presets)}: other models)"] if len(presets) > 1 else []
    parts += [f"{len(machines)} machines (compare figures within one)"] if len(machines) > 1 else []
    if not parts:
        return ""
    narrow = " and ".join(flag for flag, n in (("--preset", len(presets)), ("--device", len(machines))) if n > 1)
    return f". The list spans {' and '.join(parts)}: narrow it with {narrow}"


def _message(chosen, candidates, records, p99_ms, qps, min_accuracy, device, loose) -> str:
    target = f"p99 ≤ {p99_ms:g} ms" + (f" at {qps:g} QPS" if qps else "") + (f" on {device}" if device else "")
    make = (f"fusionprof load --fusion mid --backend onnxruntime --scenario server --find-max-qps --p99-ms {p99_ms:g}"
            + (f" --device {device}" if device else ""))
    if chosen:
        best = chosen[0]
        return (f"{best.preset}/{best.fusion} on {best.backend} ({best.precision}, batching: {best.batching}) on "
                f"{best.machine} meets {target}"
                + (f" with accuracy ≥ {min_accuracy:g}" if min_accuracy is not None else "")
                + (" (measured beside a busy neighbour)" if best.busy_neighbour else "") + _spans(chosen))
    if qps and not records["load"]:
        return f"no load record can answer {target}: latency records time one request at a time. Run `{make}`"
    if not records["load"] and not records["latency"]:
        return f"no latency or load record under the profiles folder can answer {target}. Run `{make}`"
    if candidates and min_accuracy is not None:
        return (f"{len(candidates)} measured choice(s) meet {target}, but none timed a model with a recorded test "
                f"accuracy ≥ {min_accuracy:g} in its precision (train with `fusionprof train --fusion F`, export with "
                "`fusionprof export`, and time the trained model)")
    if loose:
        return (f"no measured choice meets {target}: {loose} VALID run(s) measured a p99 within it, but LoadGen judged "
                f"them against a looser p99 target. Run `{make}`")
    return (f"no measured choice meets {target} ({sum(len(v) for v in records.values())} records read). Measure "
            f"more: `{make}`")
