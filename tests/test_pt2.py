"""AOTInductor packages are built in a child process: a crash or a hang is a reason, never a dead caller."""

import signal
import time

import pytest
import torch

from fusionprof.config import model_config
from fusionprof.errors import UserError
from fusionprof.models import build_model
from fusionprof.pt2 import _why, build_pt2, reason, run_child


def test_a_child_killed_by_a_signal_names_the_signal():
    assert _why(-11, {"step": "compile"}) == "the build process died with SIGSEGV"
    assert _why(1, {"step": "export", "error": "RuntimeError: no"}) == "RuntimeError: no"
    assert _why(1, {"step": "export"}) == "the build process exited with code 1"


def test_an_export_error_keeps_its_first_listed_cause():
    """torch 2.11's export failure on an H200: its first line alone did not say which guard failed."""
    error = RuntimeError("Constraints violated (sequence)! For more information, run with TORCH_LOGS=\"+dynamic\".\n"
                         "  - Not all values of sequence = L['input_ids'].size()[1] in the specified range sequence <= "
                         "512 satisfy the generated guard min(L, 8*L) == L.\n\nThe error above occurred when calling "
                         "torch.export.export.")
    assert reason(error).startswith("Constraints violated (sequence)! For more information")
    assert reason(error).endswith("- Not all values of sequence = L['input_ids'].size()[1] in the specified range "
                                  "sequence <= 512 satisfy the generated guard min(L, 8*L) == L.")
    assert reason(RuntimeError("one line\nthen a page")) == "one line" and "\n" not in reason(error)


def test_a_sigkill_we_did_not_send_is_not_called_a_timeout():
    """The out-of-memory killer sends SIGKILL too: a child killed by it before our time limit was said to have run
    past that limit ("SIGKILL after 3600 s"). Real children: one that SIGKILLs itself at once, one that outlives it."""
    start = time.perf_counter()
    exitcode, timed_out = run_child(signal.raise_signal, (signal.SIGKILL,), timeout_s=120)
    assert (exitcode, timed_out) == (-signal.SIGKILL, False) and time.perf_counter() - start < 60
    killed = _why(exitcode, {"step": "compile"}, 120 if timed_out else None)
    assert killed == "the build process was killed by SIGKILL (likely out of memory)"
    exitcode, timed_out = run_child(time.sleep, (120,), timeout_s=1)
    assert (exitcode, timed_out) == (-signal.SIGKILL, True)  # the same exit code: only our own flag tells them apart
    assert _why(exitcode, {"step": "compile"}, 1 if timed_out else None) == \
        "the build process ran past its 1 s time limit and was killed (SIGKILL)"


def test_a_build_past_its_time_limit_is_a_one_line_error(tmp_path):
    model = build_model(model_config("tiny", fusion="early", vocab_size=1000))
    with pytest.raises(UserError, match=r"AOTInductor build failed at its \w+ step: the build process ran past its "
                                        r"1 s time limit and was killed \(SIGKILL\)"):
        build_pt2(model, tmp_path / "model.pt2", "fp32", torch.device("cpu"), timeout_s=1)
    assert not (tmp_path / "model.pt2").exists()
