"""Third-party libraries' chatter, kept out of fusionprof's output where the user can do nothing about it."""

from __future__ import annotations

import contextlib
import io
import logging


@contextlib.contextmanager
def quieted(*loggers: str, stdout: bool = True):
    """Within the block the named loggers pass errors only and, with ``stdout``, what is printed is dropped; both are
    as before afterwards."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()) if stdout else contextlib.nullcontext():
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
