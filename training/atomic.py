"""Atomic file replacement (write, fsync, rename, fsync the directory), torch-free: checkpoints,
policy files and the fine-tuning versions pointer all go through it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: str | Path, data: bytes, *, before_replace: Callable[[Path], None] | None = None
) -> None:
    """Replace `path` with `data` so that a crash at any moment leaves the old or the new file.

    `before_replace(tmp)` runs after the data is on disk and before the rename: a fault-injection
    point, so tests can crash exactly there.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:  # a full disk, say: the old file stays, and no partial temporary
        tmp.unlink(missing_ok=True)
        raise
    if before_replace is not None:
        before_replace(tmp)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
