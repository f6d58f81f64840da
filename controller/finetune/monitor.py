"""Judges each promoted version by the episode returns the robot reports (torch-free).

After a promotion from version P to N, the monitor waits for `window` episodes served wholly by
N and compares their mean return with P's last `window` episodes. Clearly worse (below P's mean
by more than the margin) means roll back to P; otherwise N is accepted. No new candidate is
promoted while a version is being judged, nor before the current version has `window` episodes
to serve as the baseline of the next comparison.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    version: int
    previous: int
    mean: float
    previous_mean: float
    rollback: bool


class RollbackMonitor:
    def __init__(self, window: int, margin: float, margin_abs: float) -> None:
        self.window, self.margin, self.margin_abs = window, margin, margin_abs
        self._returns: dict[int, deque[float]] = {}
        self.judging: tuple[int, int] | None = None  # (new version, previous version)

    def returns(self, version: int) -> list[float]:
        return list(self._returns.get(version, ()))

    def ready_to_promote(self, current: int) -> bool:
        return self.judging is None and len(self._returns.get(current, ())) >= self.window

    def promoted(self, version: int, previous: int) -> None:
        self.judging = (version, previous)

    def rolled_back(self) -> None:
        """Stop judging (an operator or the monitor itself rolled back)."""
        self.judging = None

    def episode(self, version: int, episode_return: float) -> Verdict | None:
        """Record one episode; returns the verdict once the version being judged has a window."""
        history = self._returns.setdefault(version, deque(maxlen=self.window))
        history.append(episode_return)
        if self.judging is None or self.judging[0] != version or len(history) < self.window:
            return None
        new, previous = self.judging
        self.judging = None
        baseline = self._returns.get(previous)
        mean = float(np.mean(history))
        if not baseline:
            log.warning("version %d accepted without a baseline: %d had no episodes", new, previous)
            return Verdict(new, previous, mean, float("nan"), rollback=False)
        prev_mean = float(np.mean(baseline))
        threshold = prev_mean - (self.margin * abs(prev_mean) + self.margin_abs)
        return Verdict(new, previous, mean, prev_mean, rollback=mean < threshold)
