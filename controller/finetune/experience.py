"""Transitions from the control loop, assembled per ActStream (torch-free, on the event loop).

The convention (also in the proto): request t+1 on a stream reports what followed the action the
stream received for request t. Its `reward` is r_t, `terminated` / `truncated` say whether that
step ended the episode, `applied_action` replaces the served action when the robot changed it,
and `obs` is s_{t+1}, or, when the episode ended, the first observation of the next episode with
s_{t+1} in `final_obs`. So the server stores (s_t, a_t, r_t, s_{t+1}, terminated, truncated)
with s_t and a_t it already knows. A request without `reward` reports nothing.

A transition travels as one float32 row: obs, action in [-1, 1], reward, next_obs, terminated,
truncated. Rows are sent in chunks; a full queue drops the chunk and counts it, never waits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from controller.proto import controller_pb2 as pb

log = logging.getLogger(__name__)


def row_width(obs_dim: int, act_dim: int) -> int:
    return 2 * obs_dim + act_dim + 3


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


@dataclass
class Counters:
    """What happened to reported experience (shared by all streams of one server)."""

    received: int = 0  # transitions assembled
    rejected: int = 0  # reports that could not form a transition (bad length, non-finite, ...)
    dropped: int = 0  # transitions lost because the learner's queue was full
    sent: int = 0  # transitions handed to the queue


class TransitionSink:
    """Collects rows into chunks of `chunk_size` and hands each full chunk to `put_nowait`,
    which returns False when the queue is full (the chunk is then dropped and counted)."""

    def __init__(
        self,
        width: int,
        chunk_size: int,
        put_nowait: Callable[[np.ndarray], bool],
        counters: Counters,
    ) -> None:
        self._chunk = np.empty((chunk_size, width), np.float32)
        self._n = 0
        self._put = put_nowait
        self.counters = counters

    def add(self, row: np.ndarray) -> None:
        self._chunk[self._n] = row
        self._n += 1
        self.counters.received += 1
        if self._n == len(self._chunk):
            self.flush()

    def flush(self) -> None:
        if self._n == 0:
            return
        chunk, n = self._chunk[: self._n].copy(), self._n
        self._n = 0
        if self._put(chunk):
            self.counters.sent += n
        else:
            self.counters.dropped += n


def _finite_vector(values: Sequence[float], n: int) -> np.ndarray | None:
    if len(values) != n:
        return None
    out = np.asarray(values, np.float32)
    return out if np.isfinite(out).all() else None


class StreamExperience:
    """The state one ActStream needs to turn reports into transitions and episode returns.

    `on_episode(version, episode_return)` is called for every episode that ended wholly under
    one policy version (the rollback monitor judges versions by these).
    """

    def __init__(
        self,
        sink: TransitionSink,
        on_episode: Callable[[int, float], None],
        obs_dim: int,
        act_dim: int,
    ) -> None:
        self._sink = sink
        self._on_episode = on_episode
        self._obs_dim, self._act_dim = obs_dim, act_dim
        self._row = np.empty(row_width(obs_dim, act_dim), np.float32)
        self._obs: np.ndarray | None = None  # s_t
        self._action: np.ndarray | None = None  # a_t in [-1, 1]
        self._bounds: tuple[np.ndarray, np.ndarray] | None = None
        self._episode_return = 0.0
        # The version that served the episode; -1: set by the next served action (a stream is
        # assumed to open at an episode start); None: versions changed mid-episode.
        self._episode_version: int | None = -1

    def report(self, obs: Sequence[float], request: pb.ActRequest) -> None:
        """Close the previous step with what `request` (an ActRequest whose `obs` the policy
        accepted) reports, then remember `obs` as the new s_t."""
        has_reward = request.HasField("reward")
        if has_reward and self._obs is not None and self._action is not None:
            self._close(obs, request)
        elif has_reward:
            self._sink.counters.rejected += 1  # a reward with no served action before it
        self._obs = np.asarray(obs, np.float32)
        self._action = None

    def _close(self, obs: Sequence[float], request: pb.ActRequest) -> None:
        r = request.reward
        terminated = bool(request.terminated)
        truncated = bool(request.truncated)
        done = terminated or truncated
        action = self._action
        if len(request.applied_action):
            applied = _finite_vector(request.applied_action, self._act_dim)
            assert self._bounds is not None
            action = None if applied is None else to_unit(applied, *self._bounds)
        if not done:
            next_obs: np.ndarray | None = np.asarray(obs, np.float32)
        elif len(request.final_obs):
            next_obs = _finite_vector(request.final_obs, self._obs_dim)
        else:
            # terminated: the value after the end is zero, so s' is never used; truncated:
            # bootstrapping from the next episode's first observation would be wrong.
            next_obs = np.asarray(obs, np.float32) if terminated else None
        if action is None or next_obs is None or not math.isfinite(r):
            self._sink.counters.rejected += 1
        else:
            o, a = self._obs_dim, self._act_dim
            row = self._row
            row[:o] = self._obs
            row[o : o + a] = action
            row[o + a] = r
            row[o + a + 1 : 2 * o + a + 1] = next_obs
            row[2 * o + a + 1] = terminated
            row[2 * o + a + 2] = truncated
            self._sink.add(row)
        if math.isfinite(r):
            self._episode_return += r
        if done:
            if self._episode_version is not None:
                self._on_episode(self._episode_version, self._episode_return)
            self._episode_return = 0.0
            self._episode_version = -1  # the next served action starts the episode

    def interrupted(self) -> None:
        """A request was refused: the chain of steps (and the episode's return) is broken."""
        self._obs = self._action = None
        self._episode_version = None

    def served(
        self, action: Sequence[float], version: int, low: np.ndarray, high: np.ndarray
    ) -> None:
        """The action sent for the observation last reported (after exploration and limits)."""
        self._action = to_unit(action, low, high)
        self._bounds = (low, high)
        if self._episode_version == -1:
            self._episode_version = version
        elif self._episode_version is not None and self._episode_version != version:
            self._episode_version = None  # a swap mid-episode: this episode judges no version


class UntrustedExperience:
    """An ActStream whose caller lacks the admin token: its reports are counted as rejected and
    logged once, never learned from nor judged by."""

    def __init__(self, counters: Counters, peer: str) -> None:
        self._counters = counters
        self._peer = peer
        self._warned = False

    def report(self, obs: Sequence[float], request: pb.ActRequest) -> None:
        if not request.HasField("reward"):
            return
        self._counters.rejected += 1
        if not self._warned:
            self._warned = True
            log.warning(
                "ActStream from %s reports experience without the admin token; ignored",
                self._peer,
            )

    def interrupted(self) -> None:
        pass

    def served(
        self, action: Sequence[float], version: int, low: np.ndarray, high: np.ndarray
    ) -> None:
        pass


class Explorer:
    """Bounded Gaussian perturbation of served actions: std and clip in [-1, 1] units, scaled to
    the bounds, and the result clamped to the bounds."""

    def __init__(self, std: float, clip: float, act_dim: int, seed: int) -> None:
        self.std, self.clip = std, clip
        self._rng = np.random.default_rng(seed)
        self._act_dim = act_dim

    def perturb(self, action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        noise = np.clip(self._rng.normal(0.0, self.std, self._act_dim), -self.clip, self.clip)
        return np.clip(action + noise * (high - low) / 2.0, low, high).astype(np.float32)
