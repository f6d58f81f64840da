"""What `run_loop` (engine.py) drives: the simulated robot, or a synthetic plant for benchmarks."""

from __future__ import annotations

import numpy as np


class SimPlant:
    """A Gymnasium env (training.envs.make_env: flat float32 observations, pybullet silenced)."""

    def __init__(self, env_id: str, seed: int = 0) -> None:
        from training.envs import is_success, make_env  # gymnasium + pybullet, no torch

        self.env = make_env(env_id, seed)  # UsageError: an env id this install cannot run
        self._is_success = is_success
        self._seed = seed
        self.obs_dim = int(self.env.observation_space.shape[0])
        #: Whether the last step ended the episode by a time limit (not a real termination).
        self.truncated = False

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self._seed)
        self._seed += 1
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.truncated = bool(truncated) and not terminated
        return obs, float(reward), bool(terminated or truncated), self._is_success(info)

    def close(self) -> None:
        self.env.close()


class SyntheticPlant:
    """Random observations, no physics: isolates the service's timing (benchmarks)."""

    def __init__(self, obs_dim: int, seed: int = 0) -> None:
        self._obs = np.random.default_rng(seed).normal(0, 1, (64, obs_dim)).astype(np.float32)
        self._i = 0

    def reset(self) -> np.ndarray:
        return self._obs[0]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        self._i += 1
        return self._obs[self._i % len(self._obs)], 0.0, False, None
