"""The versions directory: every candidate the learner exported, and the pointer to the policy
being served (torch-free to read).

    versions/candidate-0007.onnx         the actor (written atomically by training.export)
    versions/candidate-0007.agent.pt     the learner's agent when it was exported
    versions/current.json                {"version", "policy", "sha256", "agent",
                                         "max_version"}: what to serve after a restart

One writer per file: the learner process writes the candidates, the server the pointer, durably
and before the version is served, so a restart serves the last version any client saw. The
pointer also records the highest version number given out: a restarted server numbers on from
there, so no version number ever names two files.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from training.atomic import atomic_write

log = logging.getLogger(__name__)

POINTER = "current.json"
#: Test-only: see _fault_point.
PAUSE_POINTER_ENV = "MU_TEST_PAUSE_POINTER_WRITE"
_CANDIDATE = re.compile(r"candidate-(\d+)\.onnx$")


@dataclass(frozen=True)
class Pointer:
    #: The serving version number the policy had.
    version: int
    #: The ONNX file (absolute path).
    policy: str
    #: SHA-256 of that file, checked when the server resumes from it.
    sha256: str
    #: The learner's agent snapshot for that policy; None for the policy the server started with
    #: (the learner then starts from the --finetune checkpoint).
    agent: str | None
    #: The highest version number given out (a rollback serves an older one); 0 = `version`.
    max_version: int = 0


def candidate_paths(versions_dir: Path, index: int) -> tuple[Path, Path]:
    """(ONNX file, agent snapshot) of candidate `index`."""
    stem = versions_dir / f"candidate-{index:04d}"
    return stem.with_suffix(".onnx"), stem.with_suffix(".agent.pt")


def next_candidate_index(versions_dir: Path) -> int:
    found = [
        int(m.group(1))
        for p in versions_dir.glob("candidate-*.onnx")
        if (m := _CANDIDATE.search(p.name))
    ]
    return max(found, default=0) + 1


def agent_for(policy_path: str | Path) -> Path | None:
    """The agent snapshot that belongs to a candidate's ONNX file, if it is one."""
    path = Path(policy_path)
    if not _CANDIDATE.search(path.name):
        return None
    snapshot = path.with_suffix(".agent.pt")
    return snapshot if snapshot.is_file() else None


def read_pointer(versions_dir: Path) -> Pointer | None:
    """The last committed pointer, or None when the server never promoted anything here."""
    path = versions_dir / POINTER
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    version = int(data["version"])
    return Pointer(
        version,
        data["policy"],
        data["sha256"],
        data.get("agent"),
        max(int(data.get("max_version", 0)), version),
    )


def write_pointer(versions_dir: Path, pointer: Pointer) -> None:
    """Replace the pointer atomically and return only once the new one is on disk. Raises
    OSError (a full disk, say), the old pointer intact."""
    data = json.dumps(asdict(pointer), indent=2).encode()
    atomic_write(versions_dir / POINTER, data, before_replace=_fault_point(pointer.version))


def _fault_point(version: int) -> Callable[[Path], None] | None:
    """Test-only fault injection: with PAUSE_POINTER_ENV=N in the environment, the write of
    version N's pointer stops between write and rename, logs a line and waits to be killed, so
    that a test's kill -9 lands there every time. Never set it on a real server."""
    if os.environ.get(PAUSE_POINTER_ENV) != str(version):
        return None

    def pause(tmp: Path) -> None:
        log.warning(
            "fault injection: pointer of version %d written to %s, not renamed; server pid %d "
            "waits to be killed",
            version,
            tmp,
            os.getpid(),
        )
        threading.Event().wait()

    return pause
