"""The embedded task needs both modalities: one alone stays at chance, both together learn it."""

import numpy as np
import pytest
from conftest import LEARNS

import fusionprof.train
from fusionprof.config import model_config, train_config
from fusionprof.data import prepare_data


class GreyImages:
    def __init__(self, size):
        self.size = size

    def get(self, index):
        return np.full((len(index), self.size, self.size, 3), 128, dtype=np.uint8)


def blank(modality):
    """prepare_data, with every image (or every caption) made identical in every split."""
    def prepare(*args, **kwargs):
        splits, source = prepare_data(*args, **kwargs)
        for split in splits.values():
            if modality == "image":
                split.image.source = GreyImages(split.image.source.size)
            elif modality == "text":
                split.text[:] = split.text[0]
                split.attention_mask[:] = split.attention_mask[0]
        return splits, source
    return prepare


@pytest.mark.slow
@pytest.mark.parametrize("blanked", [None, "image", "text"])
def test_one_modality_alone_stays_at_chance(blanked, learnable_data, tmp_path, monkeypatch, request):
    # One budget for all three (conftest's LEARNS): with both modalities it learns the task, so one alone at chance
    # is the data, not too short a run. Both modalities: the session's run of it (test_distributed's one process).
    if blanked is None:
        metrics = request.getfixturevalue("learned_early")
    else:
        monkeypatch.setattr(fusionprof.train, "prepare_data", blank(blanked))
        cfg = train_config("tiny", data=str(learnable_data), models_dir=str(tmp_path / "m"),
                           profiles_dir=str(tmp_path / "p"), **LEARNS)
        metrics = fusionprof.train.train(cfg, model_config("tiny", fusion="early"), progress=False,
                                         log=lambda s: None)
    accuracy = metrics["test"]["accuracy"]  # 600 test pairs: chance ± 3 σ is 50 ± 6 %
    assert metrics["test"]["pairs"] == 600
    if blanked is None:
        assert accuracy > 0.75, metrics["history"]
    else:
        assert abs(accuracy - 0.5) < 0.06, (blanked, accuracy)
