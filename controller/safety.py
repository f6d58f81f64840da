"""The action safety rules shared by both lanes: the server's ActStream and the robot's local lane
run these same functions, so the two cannot drift.

- clamp to the policy's bounds and the NaN guard: `Policy.act_values` (controller/policy.py);
- slew limit (`SlewLimiter`): each action differs from the previous one by at most max_delta per
  dimension, then the bounds again (they always win: a swap may have narrowed them);
- fallback (`fallback_action`): what a loop applies when it has no fresh action: the last one
  (hold), or zeros clamped into the bounds.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Fallback = Literal["hold", "zeros"]


class SlewLimiter:
    """Per-stream (or per-loop) slew limit; None = off. Not thread-safe: one per stream."""

    __slots__ = ("max_delta", "previous")

    def __init__(self, max_delta: float | None) -> None:
        self.max_delta = max_delta
        #: The last action that left through this limiter.
        self.previous: np.ndarray | None = None

    def limit(self, action: list[float], low: np.ndarray, high: np.ndarray) -> list[float]:
        """`action` (already clamped) limited against the previous one; returns the values sent."""
        delta = self.max_delta
        if delta is None:
            return action
        limited = np.asarray(action, np.float32)
        previous = self.previous
        if previous is not None:
            limited = np.minimum(np.maximum(limited, previous - delta), previous + delta)
            limited = np.minimum(np.maximum(limited, low), high)
        self.previous = limited
        return limited.tolist()


def fallback_action(
    kind: Fallback, last: np.ndarray | None, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """The action to apply without a fresh one: `last` for hold (when there is one), else zeros
    clamped into [low, high]. Always a new array."""
    if kind == "hold" and last is not None:
        return np.array(last, np.float32)
    return np.clip(np.zeros(len(low), np.float32), low, high)
