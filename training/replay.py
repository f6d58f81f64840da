"""A preallocated ring buffer of transitions, sampled uniformly with the trainer's generator."""

from __future__ import annotations

import numpy as np
import torch


class ReplayBuffer:
    """`priv_dim` > 0 adds the privileged critic's inputs (`priv`, `next_priv`: the episode's
    randomization draws and the noise-free observation) beside each transition."""

    def __init__(
        self, capacity: int, obs_dim: int, act_dim: int, device: str = "cpu", priv_dim: int = 0
    ):
        self.capacity = capacity
        self.device = torch.device(device)
        shapes = {
            "obs": obs_dim,
            "action": act_dim,
            "reward": 1,
            "next_obs": obs_dim,
            "terminal": 1,  # a real termination: the value after it is zero
            "episode_end": 1,  # termination or truncation: n-step sums stop here
            **({"priv": priv_dim, "next_priv": priv_dim} if priv_dim else {}),
        }
        self.data = {k: np.zeros((capacity, d), np.float32) for k, d in shapes.items()}
        self.pos = 0
        self.size = 0

    def add(
        self,
        obs,
        action,
        reward: float,
        next_obs,
        terminal: bool,
        truncated: bool,
        priv=None,
        next_priv=None,
    ) -> None:
        """Store one step. `terminal` is true only for a real termination: a time-limit
        truncation is stored as non-terminal so that its value is bootstrapped; it only ends
        the sum of rewards of n-step returns."""
        i = self.pos
        if "priv" in self.data:
            self.data["priv"][i] = priv
            self.data["next_priv"][i] = next_priv
        self.data["obs"][i] = obs
        self.data["action"][i] = action
        self.data["reward"][i] = reward
        self.data["next_obs"][i] = next_obs
        self.data["terminal"][i] = terminal
        self.data["episode_end"][i] = terminal or truncated
        self.pos = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(
        self, batch_size: int, rng: np.random.Generator, n_step: int = 1, gamma: float = 0.99
    ) -> dict[str, torch.Tensor]:
        """Uniform batch of n-step transitions: reward = Σ_{k<m} γ^k r_{t+k}, next_obs and
        terminal from step t+m-1, discount = γ^m, where m ≤ n stops at the episode's end and
        at the newest stored step."""
        return self.gather(rng.integers(0, self.size, size=batch_size), n_step, gamma)

    def gather(self, idx: np.ndarray, n_step: int, gamma: float) -> dict[str, torch.Tensor]:
        """The n-step transitions starting at stored steps `idx` (see `sample`)."""
        batch_size = len(idx)
        offsets = np.arange(n_step)
        steps = (idx[:, None] + offsets) % self.capacity  # [B, n]
        stored = (self.pos - idx - 1) % self.capacity + 1  # steps from idx to the newest
        ends = self.data["episode_end"][steps, 0] > 0
        m = np.minimum(np.where(ends.any(1), ends.argmax(1) + 1, n_step), stored)
        weights = (gamma**offsets) * (offsets < m[:, None])
        last = steps[np.arange(batch_size), m - 1]
        d = self.data
        batch = {
            "obs": d["obs"][idx],
            "action": d["action"][idx],
            "reward": (d["reward"][steps, 0] * weights).sum(1, dtype=np.float32),
            "next_obs": d["next_obs"][last],
            "terminal": d["terminal"][last, 0],
            "discount": (gamma**m).astype(np.float32),
        }
        if "priv" in d:
            batch["priv"], batch["next_priv"] = d["priv"][idx], d["next_priv"][last]
        return {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in batch.items()}

    def newest(self, n: int) -> dict[str, np.ndarray]:
        """The last `n` stored transitions (fewer if the buffer holds fewer), oldest first."""
        n = min(n, self.size)
        idx = (self.pos - n + np.arange(n)) % self.capacity
        return {k: v[idx] for k, v in self.data.items()}

    def recent_obs(self, n: int) -> np.ndarray:
        """The last `n` stored observations (fewer if the buffer holds fewer), oldest first."""
        return self.newest(n)["obs"]

    def extend(self, rows: dict[str, np.ndarray]) -> None:
        """Append transitions in bulk ({field: [n, dim]}, oldest first; `newest`'s layout);
        beyond the capacity only the newest are kept."""
        n = min(len(rows["obs"]), self.capacity)
        idx = (self.pos + np.arange(n)) % self.capacity
        for k, column in self.data.items():
            column[idx] = rows[k][len(rows[k]) - n :]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    @classmethod
    def from_state(cls, state: dict, device: str = "cpu") -> ReplayBuffer:
        """The buffer a checkpoint saved (`state_dict`), rebuilt at its own capacity: how code
        outside the trainer reads a checkpoint's replay."""
        obs_dim, act_dim = state["obs"].shape[1], state["action"].shape[1]
        priv_dim = state["priv"].shape[1] if "priv" in state else 0
        buffer = ReplayBuffer(int(state["capacity"]), obs_dim, act_dim, device, priv_dim)
        ReplayBuffer.load_state_dict(buffer, state)
        return buffer

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
        if ("priv" in state) != ("priv" in self.data):
            raise ValueError("replay: privileged critic inputs in one of saved and configured")
        self.pos, self.size = int(state["pos"]), int(state["size"])
        for k, column in self.data.items():
            column[: self.size] = state[k].numpy()
