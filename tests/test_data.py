"""The data path: the embedded dataset, COCO / Karpathy layouts, ITM pairs and the image cache."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import write_coco2017
from pycocotools.coco import COCO

from fusionprof.data import prepare_data
from fusionprof.data.coco import load_splits
from fusionprof.data.images import DecodedImages, ImageCache, load_rgb
from fusionprof.data.itm import draw_negatives, make_pairs
from fusionprof.data.synth import write_synth
from fusionprof.data.text import TINY_TOKENIZER, tiny_vocabulary
from fusionprof.errors import UserError
from fusionprof.metrics import roc_auc


def test_synth_is_seeded_and_deterministic(tmp_path):
    counts = {"train": 6, "val": 3, "test": 3}
    a = write_synth(tmp_path / "a", counts, size=48, seed=3, progress=False)
    b = write_synth(tmp_path / "b", counts, size=48, seed=3, progress=False)
    c = write_synth(tmp_path / "c", counts, size=48, seed=4, progress=False)
    read = lambda d: (d / "annotations" / "captions_train.json").read_text()  # noqa: E731
    assert read(a) == read(b) != read(c)
    assert (a / "train" / "000000000001.jpg").read_bytes() == (b / "train" / "000000000001.jpg").read_bytes()


def test_pycocotools_reads_the_embedded_dataset(small_data):
    coco = COCO(str(small_data / "annotations" / "captions_train.json"))
    image_ids = coco.getImgIds()
    assert len(image_ids) == 48
    for image_id in image_ids[:5]:
        captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
        assert len(captions) == 2 and all(c.startswith("a ") for c in captions)
        assert (small_data / "train" / coco.loadImgs(image_id)[0]["file_name"]).exists()


def test_shipped_vocabulary_matches_the_generator():
    assert (TINY_TOKENIZER / "vocab.txt").read_text().split("\n")[:-1] == tiny_vocabulary()


def test_negatives_never_share_the_positives_image():
    caption_image = np.repeat(np.arange(50), 5)  # five captions per image, like COCO
    for seed in range(20):
        negative = draw_negatives(caption_image, np.random.default_rng(seed))
        assert (caption_image[negative] != caption_image).all()
    pairs = make_pairs(caption_image, np.random.default_rng(0))
    assert pairs.label.mean() == 0.5 and len(pairs) == 2 * len(caption_image)


def test_a_split_with_one_image_cannot_make_negatives():
    with pytest.raises(UserError, match="at least two different images"):
        draw_negatives(np.zeros(5, dtype=np.int64), np.random.default_rng(0))


def test_eval_negatives_are_fixed_and_train_negatives_change(small_data, tokenizer):
    first, _ = prepare_data(small_data, tokenizer, 32, 16, seed=7, progress=False)
    second, _ = prepare_data(small_data, tokenizer, 32, 16, seed=7, progress=False)
    for split in ("val", "test"):
        a, b = first[split].pairs(7, epoch=0), second[split].pairs(7, epoch=5)
        assert np.array_equal(a.caption, b.caption) and np.array_equal(a.image, b.image)
    train = first["train"]
    assert np.array_equal(train.pairs(7, 1).caption, second["train"].pairs(7, 1).caption)
    assert not np.array_equal(train.pairs(7, 0).caption, train.pairs(7, 1).caption)


def test_batches_match_captions_to_images(small_data, tokenizer):
    splits, _ = prepare_data(small_data, tokenizer, 32, 16, progress=False)
    split = splits["train"]
    pairs = split.pairs(0)
    batch = split.batches(pairs, 10, np.arange(len(pairs))[::-1].copy())[0]
    order = np.arange(len(pairs))[::-1][:10]
    assert np.array_equal(batch.labels.numpy(), pairs.label[order])
    assert np.array_equal(batch.image.numpy(), split.image.get(pairs.image[order]))
    assert batch.attention_mask.sum(1).max() == batch.attention_mask.shape[1]  # trimmed to the longest
    for size in (10, 7):  # the mean length over samples, as the step's FLOPs see it (the last batch is smaller)
        batches = split.batches(pairs, size, np.random.default_rng(size).permutation(len(pairs)))
        lengths = [(b.text.shape[1], len(b.labels)) for b in batches]
        assert batches.mean_length() == pytest.approx(sum(n * k for n, k in lengths) / len(pairs))


def test_image_cache_equals_decoding_and_is_keyed(small_data, tmp_path):
    paths = sorted((small_data / "val").glob("*.jpg"))
    cache = ImageCache(paths, 32, progress=False)
    index = np.array([3, 0, 5, 3])
    assert np.array_equal(cache.get(index), DecodedImages(paths, 32).get(index))
    assert cache.array.shape == (len(paths), 32, 32, 3) and cache.valid.all()
    assert ImageCache(paths, 32, progress=False).path == cache.path  # reused
    assert ImageCache(paths, 40, progress=False).path != cache.path  # another size: another cache
    copied = [shutil.copy(p, tmp_path / p.name) for p in paths]
    before = ImageCache(copied, 32, progress=False).path
    assert before != cache.path  # another dataset
    os.utime(copied[0], ns=(1, 1))  # a changed file
    assert ImageCache(copied, 32, progress=False).path != before


def test_coco2017_layout_holds_out_val_from_train(small_data, tmp_path):
    root = write_coco2017(small_data, tmp_path / "coco")
    train_files = sorted(p.name for p in (root / "train2017").glob("*.jpg"))
    splits, layout = load_splits(root, seed=0)
    assert layout == "coco2017"
    train, val = set(splits["train"].image_paths), set(splits["val"].image_paths)
    assert len(val) == len(train_files) // 10 and not train & val
    assert len(splits["test"].image_paths) == len(train_files)
    assert all(p.parent.name == "val2017" for p in splits["test"].image_paths)


def test_a_layout_asked_for_is_read_even_where_another_would_be_found_first(small_data, tmp_path):
    """A COCO-2017 folder that gains Karpathy's file is found as Karpathy's (looked for first), but a run trained on
    its 2017 splits asks for those, and gets them; a layout whose files are gone is one line naming the file."""
    root = write_coco2017(small_data, tmp_path / "coco")
    files = sorted((root / "val2017").glob("*.jpg"))[:4]
    (root / "dataset_coco.json").write_text(json.dumps({"images": [
        {"filepath": "val2017", "filename": f.name, "split": s, "cocoid": i, "sentences": [{"raw": f"a caption {i}"}]}
        for i, (f, s) in enumerate(zip(files, ["train", "val", "test", "test"], strict=True))]}))
    assert load_splits(root)[1] == "karpathy"
    splits, layout = load_splits(root, layout="coco2017")
    assert layout == "coco2017" and len(splits["test"].image_paths) == 48  # val2017, not Karpathy's 2 test images
    (root / "annotations" / "captions_val2017.json").unlink()
    with pytest.raises(UserError, match=r"the run used its coco2017 layout, and .*captions_val2017.json is not there"):
        load_splits(root, layout="coco2017")


def test_karpathy_layout_merges_restval_into_train(small_data, tmp_path):
    files = sorted((small_data / "train").glob("*.jpg"))[:8]
    kinds = ["train", "restval", "train", "val", "val", "test", "test", "restval"]
    entries = [{"filepath": "train", "filename": f.name, "split": s, "cocoid": i,
                "sentences": [{"raw": f"a caption {i}"}, {"raw": f"another caption {i}"}]}
               for i, (f, s) in enumerate(zip(files, kinds, strict=True))]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": entries}))
    (tmp_path / "train").symlink_to(small_data / "train")
    splits, layout = load_splits(tmp_path)
    assert layout == "karpathy"
    assert [len(splits[s].image_paths) for s in ("train", "val", "test")] == [4, 2, 2]
    assert len(splits["train"].captions) == 8 and splits["train"].image_paths[0].exists()


def test_load_rgb_repairs_and_counts(tmp_path):
    from PIL import Image

    from fusionprof.data.report import DataReport

    Image.new("L", (20, 10), 128).save(tmp_path / "gray.jpg")
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGBA", (20, 10), (255, 0, 0, 10)).save(tmp_path / "alpha.png")
    Image.new("RGB", (20, 10), (0, 0, 255)).save(tmp_path / "png.jpg", format="PNG")
    report = DataReport()
    for name in ("gray.jpg", "cmyk.jpg", "alpha.png", "png.jpg"):
        assert load_rgb(tmp_path / name, 8, report).shape == (8, 8, 3)
    assert dict(report.converted) == {"grayscale": 1, "cmyk": 1, "alpha": 1, "format_mismatch": 1}
    assert load_rgb(tmp_path / "png.jpg", 8)[0, 0].tolist() == [0, 0, 255]


def test_wide_grayscale_is_rescaled_not_clipped(tmp_path):
    """16-bit PNGs span 0–65535 and float images [0, 1]: convert("RGB") alone clips both (near white, black)."""
    from PIL import Image

    from fusionprof.data.report import DataReport

    levels = np.array([[0, 15000], [30000, 60000]], dtype=np.uint16).repeat(4, 0).repeat(4, 1)
    Image.fromarray(levels).save(tmp_path / "deep.png")  # written as a 16-bit PNG, read back as I;16
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode == "I;16"
    report = DataReport()
    deep = load_rgb(tmp_path / "deep.png", 8, report)
    assert deep[::4, ::4, 0].tolist() == [[0, 58], [117, 233]] and (deep == deep[..., :1]).all()  # value / 257
    assert (load_rgb(tmp_path / "float.tiff", 8, report) == 128).all()
    assert dict(report.converted) == {"grayscale": 2}


def test_roc_auc_matches_pairwise_counting():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60).astype(float)
    pos, neg = scores[labels == 1], scores[labels == 0]
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(brute)
    assert roc_auc(np.array([0.1, 0.9]), np.array([0.0, 1.0])) == 1.0
