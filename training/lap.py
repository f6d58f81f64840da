"""LAP (loss-adjusted prioritized replay, Fujimoto et al. 2020) on a sum-tree, for TD7.

A transition is drawn with probability p_i / Σ_j p_j, where p_i = max(|δ_i|, min_priority)^α
is set from its last TD error δ_i (new transitions get the largest priority seen). The
priorities sit at the leaves of a binary tree whose inner nodes hold the sums of their two
children: a draw descends one root-to-leaf path and a priority write climbs one, both
O(log N), where a cumulative sum over the buffer is O(N) per batch.
"""

from __future__ import annotations

import numpy as np
import torch

from training.replay import ReplayBuffer


class SumTree:
    """Node 1 is the root, node i has children 2i and 2i+1, leaf k is node `leaves + k`. Inner
    nodes are recomputed from their children on every write (never incremented), so the tree
    is a pure function of its leaves: no drift, and a rebuilt tree is identical."""

    def __init__(self, capacity: int):
        self.depth = max(1, (capacity - 1).bit_length())  # levels below the root
        self.leaves = 1 << self.depth
        self.tree = np.zeros(2 * self.leaves, np.float64)

    @property
    def total(self) -> float:
        return float(self.tree[1])

    def get(self, idx: np.ndarray) -> np.ndarray:
        return self.tree[self.leaves + np.asarray(idx)]

    def set(self, idx: np.ndarray, values: np.ndarray) -> None:
        """Write leaves `idx` and the sums on their paths to the root: depth levels per write
        (repeated indices are harmless, their parents are recomputed to the same sum)."""
        node = self.leaves + np.asarray(idx, np.int64)
        self.tree[node] = values
        for _ in range(self.depth):
            node = node // 2
            self.tree[node] = self.tree[2 * node] + self.tree[2 * node + 1]

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each mass m in [0, total): the leaf k with Σ_{j<k} p_j ≤ m < Σ_{j≤k} p_j, found by
        descending from the root: go right (subtracting the left sum) when m is past the left
        subtree. A right subtree that is empty is never entered, so rounding cannot land on a
        leaf of priority zero."""
        node = np.ones(len(mass), np.int64)
        mass = np.asarray(mass, np.float64).copy()
        for _ in range(self.depth):
            left = 2 * node
            left_sum = self.tree[left]
            right = (mass >= left_sum) & (self.tree[left + 1] > 0)
            mass -= np.where(right, left_sum, 0.0)
            node = left + right
        return node - self.leaves


class PrioritizedReplay(ReplayBuffer):
    """`ReplayBuffer` (same storage and n-step targets) sampled in proportion to priorities."""

    def __init__(
        self, capacity: int, obs_dim: int, act_dim: int, device: str = "cpu", priv_dim: int = 0
    ):
        super().__init__(capacity, obs_dim, act_dim, device, priv_dim)
        self.priority = SumTree(capacity)
        self.max_priority = 1.0

    def add(
        self, obs, action, reward: float, next_obs, terminal: bool, truncated: bool, *priv
    ) -> None:
        """New transitions get the largest priority seen, so each is drawn soon at least once."""
        self.priority.set(np.array([self.pos]), np.array([self.max_priority]))
        super().add(obs, action, reward, next_obs, terminal, truncated, *priv)

    def sample(
        self, batch_size: int, rng: np.random.Generator, n_step: int = 1, gamma: float = 0.99
    ) -> dict[str, torch.Tensor]:
        """A batch drawn with probability p_i / Σ p, with n-step targets as in `ReplayBuffer`
        plus `next_obs_1`, the state one step later (what SALE's encoder learns to predict
        whatever n is), and `index` (CPU, int64): the stored steps, for `update_priorities`."""
        idx = self.priority.find(rng.uniform(0.0, self.priority.total, batch_size))
        next_obs_1 = torch.from_numpy(self.data["next_obs"][idx]).to(self.device)
        return {
            **self.gather(idx, n_step, gamma),
            "next_obs_1": next_obs_1,
            "index": torch.from_numpy(idx),
        }

    def update_priorities(self, idx: np.ndarray, priority: np.ndarray) -> None:
        self.priority.set(idx, priority)
        self.max_priority = max(self.max_priority, float(priority.max()))

    def reset_max_priority(self) -> None:
        """The priority new transitions get falls back to the largest one stored (O(N), but
        called once per target refresh, every few hundred updates)."""
        self.max_priority = float(self.priority.get(np.arange(self.size)).max())

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "priority": torch.from_numpy(self.priority.get(np.arange(self.size)).copy()),
            "max_priority": self.max_priority,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.priority.set(np.arange(self.size), state["priority"].numpy())
        self.max_priority = float(state["max_priority"])
