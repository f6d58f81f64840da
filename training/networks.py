"""The networks: observation normalizer, actor μ(s; u), critic ensemble Q_i(s, a; w_i), and the
exported policy that maps raw observations to actions in the robot's units.

The actor and critics work in normalized units: observations through `Normalizer`, actions in
[-1, 1]. Only `Policy` (the exported graph) scales actions to the environment's bounds.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Normalizer(nn.Module):
    """Running mean/variance of observations. Statistics are buffers: saved with the model,
    frozen unless `update` is called, and copied into the exported graph as constants. The
    first `raw` inputs, already in [-1, 1], pass through: standardized, an input that stays
    constant for most of a run (a randomization draw before its range widens) would be
    scaled 1e4× once it moves."""

    def __init__(
        self, dim: int, enabled: bool = True, clip: float = 10.0, eps: float = 1e-8, raw: int = 0
    ):
        super().__init__()
        self.enabled = enabled
        self.clip = clip
        self.eps = eps
        self.raw = raw
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(dim, dtype=torch.float64))
        # float32 copies used in forward, refreshed by `update`
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    @torch.no_grad()
    def update(self, obs: torch.Tensor) -> None:
        """Merge a batch [n, dim] into the statistics (Chan et al. parallel variance)."""
        if not self.enabled:
            return
        obs = obs.to(torch.float64).reshape(-1, self.mean.numel())
        n = obs.shape[0]
        batch_mean = obs.mean(0)
        delta = batch_mean - self.mean
        total = self.count + n
        self.mean += delta * (n / total)
        self.m2 += ((obs - batch_mean) ** 2).sum(0) + delta**2 * (self.count * n / total)
        self.count.copy_(total)
        std = (self.m2 / self.count).sqrt()
        self.shift.copy_(self.mean)
        self.scale.copy_(1.0 / (std + self.eps).clamp_min(1e-4))
        self.shift[: self.raw] = 0.0
        self.scale[: self.raw] = 1.0

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return obs
        return ((obs - self.shift) * self.scale).clamp(-self.clip, self.clip)


def mlp(sizes: list[int], activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """μ(s; u): normalized observation → action in [-1, 1]."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: list[int]):
        super().__init__()
        self.net = mlp([obs_dim, *hidden, act_dim])

    def forward(self, obs_norm: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs_norm))


class EnsembleLinear(nn.Module):
    """`n` independent linear layers evaluated as one batched matmul: [k, B, in] → [k, B, out]
    for the first k ≤ n members."""

    def __init__(self, n: int, d_in: int, d_out: int):
        super().__init__()
        bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        return torch.baddbmm(self.bias[:k], x, self.weight[:k])


class Critics(nn.Module):
    """Q_i(s, a; w_i) for i < n, as one ensemble (twin critics for TD3, one for DDPG).
    Returns [n, B], or [members, B] for the first `members` critics only. Optional LayerNorm
    (no affine, so members stay independent) after each hidden layer."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, hidden: list[int], layer_norm: bool):
        super().__init__()
        self.n = n
        sizes = [obs_dim + act_dim, *hidden, 1]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(EnsembleLinear(n, sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                if layer_norm:
                    layers.append(nn.LayerNorm(sizes[i + 1], elementwise_affine=False))
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(
        self, obs_norm: torch.Tensor, action: torch.Tensor, members: int | None = None
    ) -> torch.Tensor:
        x = torch.cat([obs_norm, action], -1).expand(members or self.n, -1, -1)
        return self.net(x).squeeze(-1)


def register_action_bounds(module: nn.Module, low, high) -> None:
    """Buffers `act_scale` and `act_bias` mapping tanh's [-1, 1] to [low, high]."""
    low = torch.as_tensor(low, dtype=torch.float32)
    high = torch.as_tensor(high, dtype=torch.float32)
    module.register_buffer("act_scale", (high - low) / 2)
    module.register_buffer("act_bias", (high + low) / 2)


class Policy(nn.Module):
    """The exported graph: raw observation → normalizer → actor → scale and bias to [low, high]."""

    def __init__(self, normalizer: Normalizer, actor: Actor, low, high):
        super().__init__()
        self.normalizer = normalizer
        self.actor = actor
        register_action_bounds(self, low, high)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.act_bias + self.act_scale * self.actor(self.normalizer(obs))
