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
