"""TD7's networks (Fujimoto et al. 2023, "For SALE"): the state and state-action encoders, and
the actor and critics that read their embeddings.

    zs  = AvgL1Norm(f(s))        state embedding
    zsa = g(zs, a)               state-action embedding, trained so that zsa ≈ f(s')
    μ(s, zs)                     actor: AvgL1Norm(linear(s)) beside zs, then an MLP, then tanh
    Q_i(s, a, zsa, zs)           critics: AvgL1Norm(linear(s, a)) beside zsa and zs, then an MLP

As in `networks.py`, observations arrive normalized and actions are in [-1, 1]. The encoders and
critics use ELU, the actor ReLU (the paper's choices).
"""

from __future__ import annotations

import torch
from torch import nn

from training.networks import EnsembleLinear, Normalizer, mlp, register_action_bounds


def avg_l1_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x divided by its mean absolute value over the last axis: keeps embeddings on one scale
    whatever the encoder learns, so the actor and critic inputs cannot drift in magnitude."""
    return x / x.abs().mean(-1, keepdim=True).clamp_min(eps)


class Encoder(nn.Module):
    """f (state encoder) and g (state-action encoder) of SALE."""

    def __init__(self, obs_dim: int, act_dim: int, zs_dim: int, hidden: list[int]):
        super().__init__()
        self.f = mlp([obs_dim, *hidden, zs_dim], nn.ELU)
        self.g = mlp([zs_dim + act_dim, *hidden, zs_dim], nn.ELU)

    def zs(self, obs_norm: torch.Tensor) -> torch.Tensor:
        return avg_l1_norm(self.f(obs_norm))

    def zsa(self, zs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.g(torch.cat([zs, action], -1))


class SaleActor(nn.Module):
    """μ(s, zs; u) → action in [-1, 1]. zs is an input like s: the actor's parameters u do not
    reach into the encoder, so ∂μ/∂u is the Jacobian of this module alone."""

    def __init__(self, obs_dim: int, act_dim: int, zs_dim: int, hidden: list[int]):
        super().__init__()
        self.embed = nn.Linear(obs_dim, hidden[0])
        self.net = mlp([hidden[0] + zs_dim, *hidden, act_dim])

    def forward(self, obs_norm: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        x = torch.cat([avg_l1_norm(self.embed(obs_norm)), zs], -1)
        return torch.tanh(self.net(x))


class SaleCritics(nn.Module):
    """Q_i(s, a, zsa, zs; w_i) for i < n as one ensemble (batched matmuls, like `Critics`).
    Returns [n, B], or [members, B] for the first `members` critics."""

    def __init__(self, n: int, obs_dim: int, act_dim: int, zs_dim: int, hidden: list[int]):
        super().__init__()
        self.n = n
        self.embed = EnsembleLinear(n, obs_dim + act_dim, hidden[0])
        sizes = [hidden[0] + 2 * zs_dim, *hidden, 1]
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(EnsembleLinear(n, sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ELU())
        self.net = nn.Sequential(*layers)

    def forward(
        self,
        obs_norm: torch.Tensor,
        action: torch.Tensor,
        zsa: torch.Tensor,
        zs: torch.Tensor,
        members: int | None = None,
    ) -> torch.Tensor:
        k = members or self.n
        sa = self.embed(torch.cat([obs_norm, action], -1).expand(k, -1, -1))
        z = torch.cat([zsa, zs], -1).expand(k, -1, -1)
        return self.net(torch.cat([avg_l1_norm(sa), z], -1)).squeeze(-1)


class SalePolicy(nn.Module):
    """The exported graph for TD7: raw observation → normalizer → (state encoder → zs) →
    actor(s, zs) → scale and bias to [low, high]. Same input and output as `Policy`."""

    def __init__(self, normalizer: Normalizer, encoder: Encoder, actor: SaleActor, low, high):
        super().__init__()
        self.normalizer = normalizer
        self.f = encoder.f  # only the state encoder is needed to act
        self.actor = actor
        register_action_bounds(self, low, high)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        s = self.normalizer(obs)
        zs = avg_l1_norm(self.f(s))
        return self.act_bias + self.act_scale * self.actor(s, zs)
