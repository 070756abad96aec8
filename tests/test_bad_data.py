"""Bad data never crashes a run: it is skipped or repaired, counted and reported, or a one-line error."""

import json
import shutil

import pytest
from click.testing import CliRunner
from PIL import Image

from fusionprof.cli import cli
from fusionprof.data.coco import load_splits


@pytest.fixture
def damaged(small_data, tmp_path):
    root = tmp_path / "damaged"
    shutil.copytree(small_data, root)
    train = root / "train"
    files = sorted(train.glob("*.jpg"))
    files[0].unlink()  # missing
    files[1].write_bytes(b"\xff\xd8\xff this is not really a JPEG")  # corrupt
    files[2].write_bytes(files[3].read_bytes()[:300])  # truncated
    Image.open(files[4]).convert("L").save(files[4])  # grayscale
    Image.open(files[5]).convert("CMYK").save(files[5], format="JPEG")  # CMYK
    Image.open(files[6]).save(files[6], format="PNG")  # a PNG named .jpg
    ann_path = root / "annotations" / "captions_train.json"
    ann = json.loads(ann_path.read_text())
    ann["annotations"][20]["caption"] = "   "  # empty caption
    ann["images"].append({"id": [1], "file_name": "listed.jpg"})  # an id no dict can key on
    ann["images"].append({"id": 10_000, "file_name": "nul\x00byte.jpg"})  # a name no file can have
    ann["annotations"].append({"id": 10_000, "image_id": 10_000, "caption": "a caption of a nameless file"})
    ann["annotations"].append({"id": 10_001, "image_id": {"id": 0}, "caption": "an image id that is an object"})
    ann_path.write_text(json.dumps(ann))
    return root


def train_on(data, tmp_path, *extra):
    return CliRunner().invoke(cli, ["train", "--fusion", "early", "--data", str(data), "--epochs", "1",
                                    "--batch-size", "16", "--out", str(tmp_path / "m"), "--profiles",
                                    str(tmp_path / "p"), "--quiet", *extra])


@pytest.mark.slow
def test_damaged_files_are_skipped_counted_and_reported(damaged, tmp_path):
    result = train_on(damaged, tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "[train] skipped: 1 × missing image" in out
    assert "[train] skipped: 3 × unreadable image" in out  # two damaged files and the name with a NUL byte
    assert "[train] skipped: 1 × empty caption" in out
    assert "[train] skipped: 2 × malformed entry" in out
    for kind in ("grayscale", "cmyk", "format mismatch"):
        assert f"[train] converted to RGB: 1 × {kind}" in out
    assert "7 data entries skipped" in out
    summary = json.loads((tmp_path / "p" / "tiny-early" / "metrics.json").read_text())["data_summary"]["train"]
    assert summary["skipped"] == {"empty_caption": 1, "missing_image": 1, "unreadable_image": 3,
                                  "malformed_entry": 2}
    assert summary["converted"] == {"grayscale": 1, "cmyk": 1, "format_mismatch": 1}
    assert summary["images"] == 48 - 3 and summary["captions"] == 2 * 45 - 1


def test_malformed_karpathy_entries_are_skipped_and_counted(small_data, tmp_path):
    files = sorted((small_data / "train").glob("*.jpg"))[:4]
    entries = [{"filepath": "train", "filename": f.name, "split": "train", "cocoid": i,
                "sentences": [{"raw": f"a caption {i}"}]} for i, f in enumerate(files)]
    entries[1].update(filename="gone.jpg", cocoid="not a number")  # looked up by id when the file is missing
    entries[2].update(split=["train"])  # a split name no dict can key on
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    (tmp_path / "train").symlink_to(small_data / "train")
    splits, _ = load_splits(tmp_path)
    assert [p.name for p in splits["train"].image_paths] == [files[0].name, files[3].name]
    assert splits["train"].report.skipped == {"malformed_entry": 2}


@pytest.mark.parametrize("damage,message", [
    (lambda root: (root / "annotations" / "captions_train.json").write_text('{"images": [1, 2'),
     "captions_train.json: not valid JSON (line 1"),
    (lambda root: (root / "annotations" / "captions_val.json").write_text("[]"),
     "captions_val.json: expected a JSON object at the top level, found list"),
    (lambda root: (root / "annotations" / "captions_test.json").write_text('{"images": {}}'),
     "not a COCO captions file"),
    (lambda root: [p.unlink() for p in (root / "train").glob("*.jpg")],
     "split 'train' has 0 usable image(s) with captions (skipped: {'missing_image': 48}"),
    (lambda root: shutil.rmtree(root / "annotations"), "no captions found; expected dataset_coco.json"),
    (lambda root: (root / "annotations" / "captions_train.json").write_text(
        json.dumps({"images": [{"id": [i], "file_name": f"{i}.jpg"} for i in range(3)], "annotations": []})),
     "split 'train' has 0 usable image(s) with captions (skipped: {'malformed_entry': 3}"),
])
def test_unusable_data_is_a_one_line_error(damage, message, small_data, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(small_data, root)
    damage(root)
    result = train_on(root, tmp_path)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_folder_the_os_refuses_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["data", "synth", "--out", str(blocker / "data"), "--train", "4"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output == f"Error: {blocker / 'data' / 'train'}: not a directory\n"  # the path the OS refused


def test_memory_running_out_is_a_one_line_error_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    from fusionprof import report

    def out_of_memory(paths, out):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 26214400000 bytes.\nError code 12")
    monkeypatch.setattr(report, "write_report", out_of_memory)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 1 and result.output == (
        "Error: out of memory ([enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
        "memory: you tried to allocate 26214400000 bytes.): a smaller batch needs less (--batch-size, --batch-sizes, "
        "--max-batch)\n")

    def bug(paths, out):
        raise RuntimeError("shape mismatch")
    monkeypatch.setattr(report, "write_report", bug)
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert isinstance(result.exception, RuntimeError) and str(result.exception) == "shape mismatch"
