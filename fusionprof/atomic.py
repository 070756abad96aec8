"""Atomic file writes: a killed run never leaves a half-written checkpoint or record behind, nor does an OS crash."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then move the result over ``path`` in one rename.

    The data reaches the disk before the rename and the rename after it: otherwise an OS crash can leave ``path``
    naming an empty file (the rename journaled, the data still in the page cache).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(tmp, os.O_RDWR)  # read-write: Windows flushes only a writable handle; mkstemp's 0600 allows it
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file 0600; give it the mode a plain open() would
        os.replace(tmp, path)
        if os.name == "posix":  # a directory cannot be opened for fsync on Windows
            _fsync(path.parent, os.O_RDONLY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def torch_save(path: str | Path, obj: Any) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
