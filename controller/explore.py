"""Exploration on served actions, the same on both lanes (ActStream and the local lane)."""

from __future__ import annotations

import numpy as np


class Explorer:
    """Bounded Gaussian perturbation of served actions: std and clip in [-1, 1] units, scaled to
    the bounds, and the result clamped to the bounds."""

    def __init__(self, std: float, clip: float, act_dim: int, seed: int) -> None:
        self.std, self.clip = std, clip
        self._rng = np.random.default_rng(seed)
        self._act_dim = act_dim

    def perturb(self, action: list[float], low: np.ndarray, high: np.ndarray) -> np.ndarray:
        noise = np.clip(self._rng.normal(0.0, self.std, self._act_dim), -self.clip, self.clip)
        return np.clip(np.asarray(action) + noise * (high - low) / 2.0, low, high).astype(
            np.float32
        )
