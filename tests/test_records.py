"""Training and export records say when they were written, and where several would do, the newest is read."""

from datetime import datetime

from fusionprof.env import STAMP_FORMAT
from fusionprof.records import model_accuracy

ENV = {"host": "vm", "cpu_model": "AMD EPYC"}
CKPT = "/m/tiny-mid/checkpoint.pt"


def _train(accuracy, created=None):
    return {"kind": "train", "checkpoint": CKPT, "train_config": {"precision": "fp32"}, "environment": ENV,
            "test": {"accuracy": accuracy}, **({"created": created} if created else {})}


def _export(accuracy, created=None, fmt="onnx"):
    return {"kind": "export", "checkpoint": CKPT, "format": fmt, "precision": "fp32", "status": "ok",
            "environment": ENV, "accuracy": {"exported_accuracy": accuracy},
            **({"created": created} if created else {})}


def test_the_newest_training_and_export_record_is_read_and_one_without_a_date_is_the_oldest():
    """Two copies of one model's records (a run trained again into the same folder, its records gathered from two
    places): the newest counts, whatever order they were found in; one written before records had `created` is older
    than any that has it."""
    train = [_train(0.5), _train(0.7, "20261203T090000Z"), _train(0.9, "20261204T090000Z"), _train(0.6)]
    assert model_accuracy(train, [], CKPT, "fp32", "torch")[0] == 0.9
    assert model_accuracy(list(reversed(train)), [], CKPT, "fp32", "torch")[0] == 0.9
    assert model_accuracy([_train(0.5), _train(0.6)], [], CKPT, "fp32", "torch")[0] == 0.5  # none dated: as found

    export = [_export(0.55), _export(0.75, "20261203T090000Z"), _export(0.95, "20261204T100000Z"),
              _export(0.35, "20261205T100000Z", fmt="pt2")]
    assert model_accuracy([], export, CKPT, "fp32", "onnxruntime")[:2] == (0.95, "onnx export")
    assert model_accuracy([], export[::-1], CKPT, "fp32", "onnxruntime")[:2] == (0.95, "onnx export")
    assert model_accuracy([], export, CKPT, "fp32", "aoti")[:2] == (0.35, "pt2 export")  # its own format first


def test_a_stamp_is_the_latency_records_format():
    from fusionprof.env import utc_stamp
    from fusionprof.report import _date

    stamp = utc_stamp()
    datetime.strptime(stamp, STAMP_FORMAT)
    assert _date(stamp).endswith(" UTC")


def test_time_to_best_is_the_first_epoch_at_the_best_validation_accuracy_and_the_report_shows_it():
    """A run's time to accuracy: the first epoch that reached its best validation accuracy, and the training seconds up
    to that epoch's end. The training table shows it; a record written before it had one shows –."""
    import json
    from pathlib import Path

    from fusionprof.metrics import time_to_best
    from fusionprof.report import Records, training_section

    history = [{"epoch": 1, "val_accuracy": 0.6, "epoch_seconds": 10.0},
               {"epoch": 2, "val_accuracy": 0.8, "epoch_seconds": 12.0},
               {"epoch": 3, "val_accuracy": 0.8, "epoch_seconds": 11.0},  # the best again, not first reached here
               {"epoch": 4, "val_accuracy": None, "epoch_seconds": 9.0}]  # non-finite logits: no accuracy
    assert time_to_best(history) == {"epoch": 2, "val_accuracy": 0.8, "train_seconds": 22.0}
    assert time_to_best([{**history[3], "epoch": 1}]) is None

    old = json.loads(Path("profiles/tiny-mid/metrics.json").read_text())  # committed, before time_to_best
    assert "time_to_best" not in old
    new = {**old, "fusion": "late", "time_to_best": {"epoch": 2, "val_accuracy": 0.9, "train_seconds": 40.0}}
    no_history = {**old, "fusion": "early", "history": []}
    table = next(b for b in training_section(Records(train=[old, new, no_history])) if b[0] == "table")
    column = table[1].index("to best val (s)")
    assert {row[2]: row[column] for row in table[2]} == {  # the old record's from its history, by the same rule
        "mid": f"{sum(h['epoch_seconds'] for h in old['history'][:3]):.0f} (epoch 3)", "late": "40 (epoch 2)",
        "early": "–"}


def test_a_training_run_records_its_time_to_best(trained_mid):
    """The real loop's record (one epoch of tiny mid): its only epoch is its best."""
    _, metrics = trained_mid
    assert metrics["time_to_best"] == {"epoch": 1, "val_accuracy": metrics["history"][0]["val_accuracy"],
                                       "train_seconds": metrics["history"][0]["epoch_seconds"]}
