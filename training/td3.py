"""The TD3 update, top to bottom in the order of the math. DDPG is the same code with one
critic, no target-policy noise and no delay (see `TrainConfig.__post_init__`).

    critic:  y = r + γ^n (1 - terminal) min_i Q'_i(s', clip(μ'(s') + clip(ε, ±c), -1, 1))
             (with a privileged critic, Q reads s beside ξ: Q(s, ξ, a); μ reads s alone)
             minimise Σ_i mean (Q_i(s, a) - y)²
    actor:   every `policy_delay` critic steps, minimise -Q_1(s, μ(s)).mean(); autograd gives
             ∂/∂u = -∂Q_1/∂a · ∂μ/∂u, the deterministic policy gradient (docs/actor_update.md)
    targets: w' ← (1 - τ) w' + τ w,  u' ← (1 - τ) u' + τ u
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch

from training.config import TrainConfig
from training.networks import Actor, Critics, Normalizer, Policy
from training.randomization import knob_dim
from training.replay import ReplayBuffer


@dataclass
class Agent:
    """Everything the update touches. Targets are deep copies, never trained directly."""

    normalizer: Normalizer
    actor: Actor
    critic: Critics
    actor_target: Actor
    critic_target: Critics
    actor_opt: torch.optim.Adam
    critic_opt: torch.optim.Adam
    # the privileged critic's extra inputs, normalized apart (None: the critic sees what the
    # actor sees)
    priv_normalizer: Normalizer | None = None

    @classmethod
    def create(cls, cfg: TrainConfig, obs_dim: int, act_dim: int, priv_dim: int = 0) -> Agent:
        normalizer = Normalizer(obs_dim, enabled=cfg.normalize_obs).to(cfg.device)
        actor = Actor(obs_dim, act_dim, cfg.actor_hidden).to(cfg.device)
        critic = Critics(
            cfg.n_critics, obs_dim + priv_dim, act_dim, cfg.critic_hidden, cfg.critic_layer_norm
        ).to(cfg.device)
        actor_target, critic_target = copy.deepcopy(actor), copy.deepcopy(critic)
        for p in [*actor_target.parameters(), *critic_target.parameters()]:
            p.requires_grad_(False)
        return cls(
            normalizer,
            actor,
            critic,
            actor_target,
            critic_target,
            # fused: one kernel for all parameters, 4–7% more updates/s on CPU here
            torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr, fused=True),
            torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, fused=True),
            privileged_normalizer(cfg, act_dim, priv_dim),
        )

    def modules(self) -> dict[str, torch.nn.Module]:
        return {
            "normalizer": self.normalizer,
            "actor": self.actor,
            "critic": self.critic,
            "actor_target": self.actor_target,
            "critic_target": self.critic_target,
            **({"priv_normalizer": self.priv_normalizer} if self.priv_normalizer else {}),
        }

    def policy(self, low, high) -> Policy:
        """The deployable graph (a CPU copy, in eval mode)."""
        return (
            Policy(copy.deepcopy(self.normalizer), copy.deepcopy(self.actor), low, high)
            .cpu()
            .eval()
        )

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action in [-1, 1] for raw observations."""
        return self.actor(self.normalizer(obs))

    # The parts a deployed actor acts through, each with the slot that holds the exported one.
    DEPLOYED = {"normalizer": "normalizer", "actor": "actor"}


def privileged_normalizer(cfg: TrainConfig, act_dim: int, priv_dim: int) -> Normalizer | None:
    """The privileged inputs' normalizer (None without them): the knob draws lead ξ, already
    mapped to [-1, 1] by their ranges (`privileged_vector`), and pass through; the noise-free
    observation after them is standardized like the actor's."""
    if not priv_dim:
        return None
    return Normalizer(priv_dim, raw=knob_dim(cfg.randomization, act_dim)).to(cfg.device)


def critic_obs(
    priv_normalizer: Normalizer | None, s: torch.Tensor, priv: torch.Tensor | None
) -> torch.Tensor:
    """What the critics read: the actor's (normalized) input, and beside it the privileged
    inputs where the critic has them (Baisero & Amato 2022: beside, not instead)."""
    return s if priv_normalizer is None else torch.cat([s, priv_normalizer(priv)], -1)


def update(
    agent: Agent, batch: dict[str, torch.Tensor], cfg: TrainConfig, update_actor: bool
) -> dict[str, torch.Tensor]:
    """One TD3 step on a batch of (obs, action in [-1, 1], reward, next_obs, terminal,
    discount): with n-step returns, reward sums n discounted rewards and discount is γ^n.
    Returns detached losses (tensors, so no device sync happens here)."""
    s = agent.normalizer(batch["obs"])
    s2 = agent.normalizer(batch["next_obs"])
    c = critic_obs(agent.priv_normalizer, s, batch.get("priv"))
    c2 = critic_obs(agent.priv_normalizer, s2, batch.get("next_priv"))
    a, r = batch["action"], batch["reward"]
    terminal, discount = batch["terminal"], batch["discount"]

    # 1. TD target from the target actor (smoothed by clipped noise) and the smallest target critic
    with torch.no_grad():
        eps = (torch.randn_like(a) * cfg.target_noise).clamp(
            -cfg.target_noise_clip, cfg.target_noise_clip
        )
        a2 = (agent.actor_target(s2) + eps).clamp(-1.0, 1.0)
        q2 = agent.critic_target(c2, a2).min(dim=0).values
        y = r + discount * (1.0 - terminal) * q2

    # 2. critic regression onto the target, all ensemble members at once
    q = agent.critic(c, a)
    critic_loss = ((q - y) ** 2).mean(dim=1).sum()
    agent.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    agent.critic_opt.step()
    out = {"critic_loss": critic_loss.detach(), "q": q.detach().mean()}
    if not update_actor:
        return out

    # 3. actor: ascend Q_1(s, μ(s)); backward applies ∂Q/∂a · ∂μ/∂u. Only Q_1 is evaluated, and
    #    the critic's own weights are frozen for this pass, so no work is spent on the others.
    agent.critic.requires_grad_(False)
    actor_loss = -agent.critic(c, agent.actor(s), members=1)[0].mean()
    agent.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_opt.step()
    agent.critic.requires_grad_(True)

    # 4. Polyak averaging of both targets, in place
    with torch.no_grad():
        for net, target in ((agent.actor, agent.actor_target), (agent.critic, agent.critic_target)):
            torch._foreach_lerp_(list(target.parameters()), list(net.parameters()), cfg.tau)
    out["actor_loss"] = actor_loss.detach()
    return out


def learn(
    agent: Agent,
    buffer: ReplayBuffer,
    rng: np.random.Generator,
    cfg: TrainConfig,
    n: int,
    actor_ready: bool = True,
) -> dict[str, torch.Tensor]:
    """Update number `n` (counted from 1): a uniform batch, then the TD3 step; the actor and the
    targets follow every `policy_delay` updates, once `actor_ready`. The one TD3 step of the
    trainer and of the online learner."""
    batch = buffer.sample(cfg.batch_size, rng, cfg.n_step, cfg.gamma)
    return update(agent, batch, cfg, actor_ready and n % cfg.policy_delay == 0)


class StepSchedule:
    """When TD3 and DDPG learn: `updates_per_step` updates after every step past
    `learning_starts`."""

    def __init__(
        self, agent: Agent, buffer: ReplayBuffer, rng: np.random.Generator, cfg: TrainConfig
    ):
        self.agent, self.buffer, self.rng, self.cfg = agent, buffer, rng, cfg
        self.updates = 0

    def after_step(self, steps: int) -> dict[str, torch.Tensor] | None:
        """After environment step number `steps`: the losses of the updates run, if any."""
        if steps <= self.cfg.learning_starts:
            return None
        for _ in range(self.cfg.updates_per_step):
            self.updates += 1
            losses = learn(self.agent, self.buffer, self.rng, self.cfg, self.updates)
        return losses

    def after_episode(self, learned: int, ep_return: float) -> dict[str, torch.Tensor] | None:
        return None

    def state_dict(self) -> dict:
        return {"updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
