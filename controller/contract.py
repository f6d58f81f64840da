"""The policy-file contract (docs/contract.md) and the transition-row layout, in one place.

Numpy only: training's export and evaluation, the serving process, the fine-tuning learner and
the robot's local lane all import it, so every spelling of the contract has one source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_errors

FORMAT_TAG = "mu.policy.v1"
#: The graph's one input, [batch, mu.obs_dim], and its output, [batch, mu.act_dim].
INPUT_NAME = "obs"
OUTPUT_NAME = "action"

FORMAT = "mu.format"
ENV_ID = "mu.env_id"
OBS_DIM = "mu.obs_dim"
ACT_DIM = "mu.act_dim"
ACTION_LOW = "mu.action_low"
ACTION_HIGH = "mu.action_high"
OBS_LAYOUT = "mu.obs_layout"
#: Only on a policy whose input holds its recent past: JSON {"obs": H, "actions": K, "obs_dim": D}.
HISTORY = "mu.history"
REQUIRED_KEYS = (FORMAT, ENV_ID, OBS_DIM, ACT_DIM, ACTION_LOW, ACTION_HIGH, OBS_LAYOUT)


# What onnxruntime raises for a bad model or a failed run: its own exception classes, none of
# them a RuntimeError or ValueError, so a bug of ours inside a tick is never taken for one (it
# keeps its traceback instead of becoming a fallback action).
ORT_ERRORS: tuple[type[Exception], ...] = tuple(
    c for c in vars(_ort_errors).values() if isinstance(c, type) and issubclass(c, Exception)
)


def history_spec(meta: dict[str, str]) -> dict[str, int] | None:
    """The file's `mu.history` as {"obs", "actions", "obs_dim"}, or None without one.
    Raises ValueError when it is not such a JSON object of non-negative integers."""
    text = meta.get(HISTORY)
    if text is None:
        return None
    spec = json.loads(text)
    if not isinstance(spec, dict) or set(spec) != {"obs", "actions", "obs_dim"}:
        raise ValueError(f'{HISTORY} must be {{"obs": H, "actions": K, "obs_dim": D}}')
    out = {k: int(v) for k, v in spec.items()}
    if min(out.values()) < 0 or out["obs_dim"] == 0:
        raise ValueError(f"{HISTORY} needs obs_dim > 0 and H, K >= 0, got {out}")
    return out


def interface_change(new: Any, old: Any) -> tuple[str, Any, Any] | None:
    """What a loop or stream relies on that `new` changes against `old` (policies with env_id,
    obs_dim, act_dim, history): (what, new value, old value), or None when nothing does."""
    for what, attr in (("env id", "env_id"), ("obs_dim", "obs_dim"), ("act_dim", "act_dim"),
                       ("history", "history")):  # fmt: skip
        a, b = getattr(new, attr), getattr(old, attr)
        if a != b:
            return what, a, b
    return None


def row_width(obs_dim: int, act_dim: int) -> int:
    """A transition row: obs, action in [-1, 1], reward, next_obs, terminated, truncated."""
    return 2 * obs_dim + act_dim + 3


def fill_row(
    row: np.ndarray, obs: Sequence[float], unit_action: Sequence[float], reward: float,
    next_obs: Sequence[float], terminated: bool, truncated: bool,
) -> np.ndarray:  # fmt: skip
    """Write one transition into `row` (row_width values); returns it."""
    o, a = len(obs), len(unit_action)
    row[:o] = obs
    row[o : o + a] = unit_action
    row[o + a] = reward
    row[o + a + 1 : 2 * o + a + 1] = next_obs
    row[2 * o + a + 1] = terminated
    row[2 * o + a + 2] = truncated
    return row


def split_rows(rows: np.ndarray, obs_dim: int, act_dim: int) -> dict[str, np.ndarray]:
    """The columns of a [n, row_width] chunk by name."""
    o, a = obs_dim, act_dim
    return {
        "obs": rows[:, :o],
        "action": rows[:, o : o + a],
        "reward": rows[:, o + a],
        "next_obs": rows[:, o + a + 1 : 2 * o + a + 1],
        "terminated": rows[:, 2 * o + a + 1] > 0,
        "truncated": rows[:, 2 * o + a + 2] > 0,
    }


def to_unit(action: Sequence[float], low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Environment units -> the [-1, 1] units the actor and critics work in (clipped)."""
    return np.clip(2.0 * (np.asarray(action, np.float32) - low) / (high - low) - 1.0, -1.0, 1.0)
