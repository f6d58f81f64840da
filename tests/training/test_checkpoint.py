"""atomic_write: a crash at any moment leaves the old file or the new one, never a mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training.atomic import atomic_write

REPO = Path(__file__).resolve().parents[2]

# Writes argv[2] over argv[1], and kills itself -9 between the write and the rename.
CRASH = """
import os, signal, sys
from training.atomic import atomic_write
atomic_write(sys.argv[1], sys.argv[2].encode(),
             before_replace=lambda tmp: os.kill(os.getpid(), signal.SIGKILL))
"""


def test_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "current.json"
    atomic_write(path, b"old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


def test_a_failure_before_the_rename_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "current.json"
    atomic_write(path, b"old")
    seen: list[bytes] = []

    def fail(tmp: Path) -> None:
        seen.append(tmp.read_bytes())  # the new data is complete on disk before the rename
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        atomic_write(path, b"new", before_replace=fail)
    assert seen == [b"new"] and path.read_bytes() == b"old"
    atomic_write(path, b"newer")  # a leftover temporary does not block the next write
    assert path.read_bytes() == b"newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current.json"]


@pytest.mark.parametrize("existing", [True, False])
def test_kill_9_between_write_and_rename(tmp_path: Path, existing: bool) -> None:
    path = tmp_path / "current.json"
    if existing:
        atomic_write(path, b"old")
    done = subprocess.run(
        [sys.executable, "-c", CRASH, str(path), "new"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert (tmp_path / ".current.json.tmp").read_bytes() == b"new"
    if existing:
        assert path.read_bytes() == b"old"
    else:
        assert not path.exists()
