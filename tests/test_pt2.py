"""AOTInductor packages are built in a child process: a crash or a hang is a reason, never a dead caller."""

import pytest
import torch

from fusionprof.config import model_config
from fusionprof.errors import UserError
from fusionprof.models import build_model
from fusionprof.pt2 import _why, build_pt2


def test_a_child_killed_by_a_signal_names_the_signal():
    assert _why(-11, {"step": "compile"}, 60) == "the build process died with SIGSEGV"
    assert _why(1, {"step": "export", "error": "RuntimeError: no"}, 60) == "RuntimeError: no"
    assert _why(1, {"step": "export"}, 60) == "the build process exited with code 1"


def test_a_build_past_its_time_limit_is_a_one_line_error(tmp_path):
    model = build_model(model_config("tiny", fusion="early", vocab_size=1000))
    with pytest.raises(UserError, match=r"AOTInductor build failed at its \w+ step: the build process died with "
                                        r"SIGKILL after 1 s"):
        build_pt2(model, tmp_path / "model.pt2", "fp32", torch.device("cpu"), timeout_s=1)
    assert not (tmp_path / "model.pt2").exists()

