"""A preallocated ring buffer of transitions, sampled uniformly with the trainer's generator."""

from __future__ import annotations

import numpy as np
import torch

FIELDS = ("obs", "action", "reward", "next_obs", "terminal")


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int, device: str = "cpu"):
        self.capacity = capacity
        self.device = torch.device(device)
        shapes = {
            "obs": obs_dim,
            "action": act_dim,
            "reward": 1,
            "next_obs": obs_dim,
            "terminal": 1,
        }
        self.data = {k: np.zeros((capacity, d), np.float32) for k, d in shapes.items()}
        self.pos = 0
        self.size = 0

    def add(self, obs, action, reward: float, next_obs, terminal: bool) -> None:
        """Store one step. `terminal` is true only for a real termination: a time-limit
        truncation is stored as non-terminal so that its value is bootstrapped."""
        i = self.pos
        self.data["obs"][i] = obs
        self.data["action"][i] = action
        self.data["reward"][i] = reward
        self.data["next_obs"][i] = next_obs
        self.data["terminal"][i] = terminal
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, self.size, size=batch_size)
        batch = {k: torch.from_numpy(v[idx]) for k, v in self.data.items()}
        batch["reward"] = batch["reward"].squeeze(1)
        batch["terminal"] = batch["terminal"].squeeze(1)
        if self.device.type != "cpu":
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        return batch

    def recent_obs(self, n: int) -> np.ndarray:
        """The last `n` stored observations (fewer if the buffer holds fewer)."""
        n = min(n, self.size)
        idx = (self.pos - n + np.arange(n)) % self.capacity
        return self.data["obs"][idx]

    def state_dict(self) -> dict:
        """Only the filled part is saved."""
        return {
            "capacity": self.capacity,
            "pos": self.pos,
            "size": self.size,
            **{k: torch.from_numpy(v[: self.size].copy()) for k, v in self.data.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity:
            raise ValueError(f"replay capacity {state['capacity']} != configured {self.capacity}")
        self.pos, self.size = int(state["pos"]), int(state["size"])
        for k in FIELDS:
            self.data[k][: self.size] = state[k].numpy()
