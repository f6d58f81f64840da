"""History in the actor's input: the last H observations and the last K applied actions beside
the current observation, so that a memoryless actor can infer what it cannot see (a latency, a
calibration offset, a weaker motor) from how its recent actions played out. With an action
delay of k steps, the last k actions make the state Markov again.

The policy input is laid out as

    [obs_t, obs_{t-1}, ..., obs_{t-H}, a_{t-1}, ..., a_{t-K}]

with observations as the env gives them and actions as applied (after exploration, slew limit
and clamp), in the env's units. A new episode starts with every past observation equal to the
first one and every past action at the action bounds' midpoint.

Numpy only: the training env (`training.history.HistoryObs`), `mu eval` and both serving lanes
(controller/pipeline.py) build the input with this one class (`mu.history` in the policy file
says H, K and the sizes).
"""

from __future__ import annotations

from typing import Any

import numpy as np


class History:
    """The policy input of one episode under way (module doc)."""

    def __init__(self, obs_dim: int, act_low, act_high, obs: int, actions: int):
        if obs < 0 or actions < 0:
            raise ValueError(f"history lengths must be >= 0, got obs={obs}, actions={actions}")
        self.obs_dim, self.n_obs, self.n_actions = obs_dim, obs, actions
        low, high = np.asarray(act_low, np.float32), np.asarray(act_high, np.float32)
        self.act_dim, self.idle = low.size, (low + high) / 2
        self.dim = obs_dim * (1 + obs) + self.act_dim * actions
        self._obs = np.zeros((1 + obs, obs_dim), np.float32)  # newest first
        self._act = np.zeros((actions, self.act_dim), np.float32)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], act_low, act_high) -> History:
        """From the policy file's `mu.history` ({"obs", "actions", "obs_dim"})."""
        return cls(int(spec["obs_dim"]), act_low, act_high, int(spec["obs"]), int(spec["actions"]))

    def spec(self) -> dict[str, int]:
        return {"obs": self.n_obs, "actions": self.n_actions, "obs_dim": self.obs_dim}

    def reset(self, obs: np.ndarray) -> np.ndarray:
        """A new episode starting at `obs`; returns the policy input."""
        self._obs[:] = np.asarray(obs, np.float32).reshape(self.obs_dim)
        self._act[:] = self.idle
        return self.input()

    def step(self, applied: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """`applied` was sent to the robot and `obs` came back; returns the policy input."""
        x = self.peek(applied, obs)
        split = self._obs.size
        self._obs[:] = x[:split].reshape(self._obs.shape)
        self._act[:] = x[split:].reshape(self._act.shape)
        return x

    def peek(self, applied: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """The input `step(applied, obs)` would return, leaving the history as it is."""
        parts = [np.asarray(obs, np.float32).reshape(self.obs_dim), self._obs[:-1].reshape(-1)]
        if self.n_actions:
            applied = np.asarray(applied, np.float32).reshape(self.act_dim)
            parts += [applied, self._act[:-1].reshape(-1)]
        return np.concatenate(parts)

    def input(self) -> np.ndarray:
        return np.concatenate([self._obs.reshape(-1), self._act.reshape(-1)])
