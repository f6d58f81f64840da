"""Exploration noise in [-1, 1] action units, so it scales with the action bounds."""

from __future__ import annotations

import numpy as np


class GaussianNoise:
    def __init__(self, act_dim: int, std: float, rng: np.random.Generator):
        self.act_dim, self.std, self.rng = act_dim, std, rng

    def __call__(self) -> np.ndarray:
        return self.rng.normal(0.0, self.std, self.act_dim).astype(np.float32)

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OrnsteinUhlenbeckNoise:
    """Temporally correlated noise, x ← x + θ(-x)dt + σ√dt·N(0, 1); reset at episode start."""

    def __init__(
        self,
        act_dim: int,
        std: float,
        rng: np.random.Generator,
        theta: float = 0.15,
        dt: float = 1e-2,
    ):
        self.act_dim, self.std, self.rng, self.theta, self.dt = act_dim, std, rng, theta, dt
        self.x = np.zeros(act_dim)

    def __call__(self) -> np.ndarray:
        self.x = (
            self.x
            - self.theta * self.x * self.dt
            + self.std * np.sqrt(self.dt) * self.rng.normal(size=self.act_dim)
        )
        return self.x.astype(np.float32)

    def reset(self) -> None:
        self.x = np.zeros(self.act_dim)

    def state_dict(self) -> dict:
        return {"x": self.x.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.x = np.asarray(state["x"])


def make_noise(kind: str, act_dim: int, std: float, rng: np.random.Generator):
    return {"gaussian": GaussianNoise, "ou": OrnsteinUhlenbeckNoise}[kind](act_dim, std, rng)
