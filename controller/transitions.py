"""Transitions and episode returns from a control loop, assembled the same way on both lanes.

A step is served (s_t, a_t), then closed by what followed it: r_t, s_{t+1}, terminated,
truncated, and the action the robot applied when it changed a_t. Each closed step goes to a
`Sink` (the server's learner for ActStream, the report queue on the local lane), and every
episode that ended wholly under one policy version gives that version's episode return (the
rollback monitor judges versions by these).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

#: The episode's version before its first action is served (that action sets it).
UNSET = -1


@dataclass(slots=True)
class Transition:
    obs: np.ndarray
    #: As applied, in the env's units (the learner's row takes it to [-1, 1] with the bounds).
    action: np.ndarray
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    #: The policy version that served the action, and the bounds it served it within.
    version: int
    low: np.ndarray
    high: np.ndarray
    #: On an episode's last transition, when one version served the whole episode: its return.
    episode_return: float | None = None


class Outcome(NamedTuple):
    """What followed a served action."""

    reward: float
    #: s_{t+1}; None: unknown (a truncation without it cannot bootstrap: rejected).
    next_obs: Sequence[float] | None
    terminated: bool
    truncated: bool
    #: What the robot applied, when it changed the served action.
    applied: Sequence[float] | None = None


class Sink(Protocol):
    def put(self, t: Transition) -> bool:
        """Take a transition; False when it was not kept (a full queue, an untrusted caller)."""

    def reject(self) -> None:
        """A report that could not form a transition (bad length, non-finite, nothing served)."""

    def episode(self, version: int, episode_return: float) -> None:
        """An episode ended wholly under `version`."""


def finite_vector(values: Sequence[float], n: int) -> np.ndarray | None:
    if len(values) != n:
        return None
    out = np.asarray(values, np.float32)
    return out if np.isfinite(out).all() else None


class Transitions:
    """One stream's (one loop's) steps and episode bookkeeping."""

    def __init__(self, sink: Sink, obs_dim: int, act_dim: int) -> None:
        self.sink = sink
        self._obs_dim, self._act_dim = obs_dim, act_dim
        self._obs: np.ndarray | None = None  # s_t
        self._action: np.ndarray | None = None  # a_t, env units
        self._served: tuple[int, np.ndarray, np.ndarray] | None = None  # version, low, high
        self._episode_return = 0.0
        # The version that served the episode; UNSET: set by the next served action (a stream
        # or loop starts at an episode start); None: versions changed mid-episode.
        self._episode_version: int | None = UNSET

    def served(
        self, obs: Sequence[float], action: Sequence[float], version: int,
        low: np.ndarray, high: np.ndarray,
    ) -> None:  # fmt: skip
        """`action` (after exploration and limits) was sent for `obs`."""
        self._obs = np.asarray(obs, np.float32)
        self._action = np.asarray(action, np.float32)
        self._served = version, low, high
        if self._episode_version == UNSET:
            self._episode_version = version
        elif self._episode_version is not None and self._episode_version != version:
            self._episode_version = None  # a swap mid-episode: this episode judges no version

    def close(self, outcome: Outcome) -> bool:
        """What followed the last served action; True when the transition was kept."""
        reward, next_obs, terminated, truncated, applied = outcome
        done = terminated or truncated
        kept = False
        if self._obs is None or self._action is None or self._served is None:
            self.sink.reject()  # a reward with no served action before it
        else:
            action = self._action if applied is None else finite_vector(applied, self._act_dim)
            s2 = None if next_obs is None else finite_vector(next_obs, self._obs_dim)
            if action is None or s2 is None or not math.isfinite(reward):
                self.sink.reject()
            else:
                version, low, high = self._served
                ended = (
                    self._episode_return + reward
                    if done and self._episode_version not in (None, UNSET)
                    else None
                )
                t = Transition(self._obs, action, float(reward), s2, bool(terminated),
                               bool(truncated), version, low, high, ended)  # fmt: skip
                kept = self.sink.put(t)
        self._obs = self._action = None
        if math.isfinite(reward):
            self._episode_return += reward
        if done:
            if self._episode_version not in (None, UNSET):
                self.sink.episode(self._episode_version, self._episode_return)
            self.new_episode()
        return kept

    def new_episode(self) -> None:
        """The next observation starts an episode: the chain of steps starts over."""
        self._obs = self._action = None
        self._episode_return = 0.0
        self._episode_version = UNSET

    def interrupted(self) -> None:
        """A tick gave no action (refused, or a fallback): the chain of steps and the episode's
        return are broken."""
        self._obs = self._action = None
        self._episode_version = None
