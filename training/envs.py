"""Environments: any Gymnasium id, with PyBullet locomotion and panda-gym arms registered.

Dict observations are flattened in the order the Dict space keeps its keys (gymnasium sorts
them), and that order is recorded as the observation layout that travels with the policy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Iterator

import gymnasium as gym
import numpy as np

from controller.errors import UsageError

ObsLayout = list[tuple[str, int]]
# Evaluation envs are seeded this far from the training seed, so the two never share starts.
EVAL_SEED_OFFSET = 1_000_000
_libc = ctypes.CDLL(None)


@contextlib.contextmanager
def quiet_pybullet() -> Iterator[None]:
    """Silence what pybullet's C side prints (build time on stderr, "argv[0]=" on stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        _libc.fflush(None)  # C stdio buffers would otherwise print once restored
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


with quiet_pybullet():
    import pybullet_envs_gymnasium  # noqa: F401  (registers the *BulletEnv-v0 ids)

    try:
        import panda_gym  # noqa: F401  (registers the Panda*-v3 ids)
    except ImportError:  # panda-gym is optional for locomotion-only installs
        pass


def obs_layout(space: gym.Space) -> ObsLayout:
    """The flat observation's parts as (name, size), in the order they are concatenated."""
    if isinstance(space, gym.spaces.Dict):
        return [(key, int(np.prod(sub.shape))) for key, sub in space.spaces.items()]
    if isinstance(space, gym.spaces.Box):
        return [("obs", int(np.prod(space.shape)))]
    raise UsageError(f"unsupported observation space {space}; mu needs Box or Dict of Box")


class FlatObs(gym.ObservationWrapper):
    """Flattens Box or Dict-of-Box observations to one float32 vector, in `obs_layout` order."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.layout = obs_layout(env.observation_space)
        self._keys = (
            list(env.observation_space.spaces)
            if isinstance(env.observation_space, gym.spaces.Dict)
            else None
        )
        dim = sum(size for _, size in self.layout)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)

    def observation(self, obs: dict | np.ndarray) -> np.ndarray:
        if self._keys is None:
            return np.asarray(obs, dtype=np.float32).reshape(-1)
        return np.concatenate([np.asarray(obs[k], np.float32).reshape(-1) for k in self._keys])


def make_env(env_id: str, seed: int | None = None) -> FlatObs:
    """Create `env_id` with flat float32 observations; seeds the env and its action space."""
    with quiet_pybullet():
        try:
            made = gym.make(env_id)
        except gym.error.DependencyNotInstalled as err:  # its message says what to install
            raise UsageError(f"{env_id} needs a package this install lacks: {err}") from None
        except gym.error.UnregisteredEnv as err:
            hint = " (Panda*-v3 ids come with panda-gym)" if env_id.startswith("Panda") else ""
            raise UsageError(f"{env_id}: {err}{hint}") from None
        if not isinstance(made.action_space, gym.spaces.Box):
            made.close()
            raise UsageError(
                f"{env_id} has {made.action_space} actions; deterministic actor-critics (TD3, "
                "DDPG, TD7) need continuous (Box) actions"
            )
        env = FlatObs(made)
        env.reset(seed=seed)
    env.action_space.seed(seed)
    return env


def action_bounds(env: gym.Env) -> tuple[np.ndarray, np.ndarray]:
    low = np.asarray(env.action_space.low, np.float32)
    high = np.asarray(env.action_space.high, np.float32)
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high)) and np.all(low < high)):
        raise UsageError(f"action bounds must be finite with low < high, got {low}, {high}")
    return low, high


def to_env_units(action: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map an action in [-1, 1] (what the actor outputs) to [low, high]."""
    return low + (action + 1.0) * 0.5 * (high - low)


def is_success(info: dict) -> float | None:
    """The env's success flag (panda-gym reports `is_success`), or None when it has none."""
    flag = info.get("is_success")
    return None if flag is None else float(flag)


def run_episodes(
    env: gym.Env, act: Callable[[np.ndarray], np.ndarray], episodes: int, seed: int
) -> tuple[list[float], float | None]:
    """Returns of `episodes` episodes, episode i reset with seed + i (the same start states at
    every evaluation), with `act` mapping an observation to an action in the env's units; and
    the success rate, None when the env reports none."""
    returns, successes = [], []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done, info = 0.0, False, {}
        while not done:
            obs, r, terminated, truncated, info = env.step(act(obs))
            total += float(r)
            done = terminated or truncated
        returns.append(total)
        successes.append(is_success(info))
    rate = None if successes[0] is None else float(np.mean(successes))
    return returns, rate
