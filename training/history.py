"""The training side of history in the actor's input (controller/history.py: the layout and
the one `History` class that builds it): the env whose observation is that input.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from controller.history import History


class HistoryObs(gym.Wrapper):
    """An env whose observation is the history input (`History`): what the policy sees in
    training and in `mu eval`. The action passed to `step` is the applied one."""

    def __init__(self, env: gym.Env, obs: int, actions: int):
        super().__init__(env)
        space = env.action_space
        self.history = History(env.observation_space.shape[0], space.low, space.high, obs, actions)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.history.dim,), np.float32)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict]:
        obs, info = self.env.reset(**kwargs)
        return self.history.reset(obs), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, r, terminated, truncated, info = self.env.step(action)
        return self.history.step(action, obs), r, terminated, truncated, info


def with_history(env: gym.Env, obs: int, actions: int) -> gym.Env:
    """`env` with the history input, or `env` itself when both lengths are 0."""
    return HistoryObs(env, obs, actions) if obs or actions else env
