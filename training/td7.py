"""The TD7 update (Fujimoto et al., NeurIPS 2023), top to bottom in the order of the math. It is
TD3 (training/td3.py, the reference) with four additions: SALE embeddings, LAP replay, value
clipping and policy checkpoints.

    encoder: zs = f(s), zsa = g(zs, a); minimise mean (g(f(s), a) - sg f(s'))², s' one step on
    critic:  y = r + γ^n (1 - terminal) clip(min_i Q'_i(s', a', zsa', zs'), q_lo, q_hi)
             with zs' = f̄'(s'), a' = clip(μ'(s', zs') + clip(ε, ±c), -1, 1), zsa' = ḡ'(zs', a')
             minimise mean_b Σ_i LAP-Huber(|Q_i(s, a, ḡ(zs, a), zs) - y|),  zs = f̄(s)
    LAP:     priority p = max(max_i |δ_i|, min_priority)^α, written back to the sum-tree
    actor:   every `policy_delay` critic steps, minimise -mean_i Q_i(s, μ(s, zs), ḡ(zs, μ), zs);
             zs does not depend on u, so ∂/∂u = -∂Q/∂a · ∂μ/∂u as in TD3 (docs/actor_update.md)
    every `td7_target_every` updates: targets ← online (hard copies), f̄' ← f̄ ← f (and ḡ),
             [q_lo, q_hi] ← the range of targets seen, max priority reset

f̄, ḡ (`fixed_encoder`) are the encoder as of the last refresh; f̄', ḡ' one refresh older.
Actor and critic read the fixed copies, so their inputs change only at a refresh.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.lap import PrioritizedReplay
from training.networks import Normalizer
from training.sale import Encoder, SaleActor, SaleCritics, SalePolicy
from training.td3 import critic_obs, privileged_normalizer

CHECKPOINT_RESET_WEIGHT = 0.9  # the bar is lowered by this when assessments lengthen (paper's)


class ValueRange(nn.Module):
    """Value clipping: TD targets are clipped to the range of targets seen up to the last refresh
    (starting at [0, 0], as the paper's code does). Buffers, so checkpoints carry them."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("seen_low", torch.tensor(float("inf")))
        self.register_buffer("seen_high", torch.tensor(float("-inf")))

    def clip(self, q: torch.Tensor) -> torch.Tensor:
        return q.clamp(self.low, self.high)

    def observe(self, y: torch.Tensor) -> None:
        torch.minimum(self.seen_low, y.min(), out=self.seen_low)
        torch.maximum(self.seen_high, y.max(), out=self.seen_high)

    def refresh(self) -> None:
        self.low.copy_(self.seen_low)
        self.high.copy_(self.seen_high)


@dataclass
class Agent:
    """Everything the update touches, plus the checkpoint policy (what evaluations judge and
    policy.onnx holds). Copies (targets, fixed encoders, checkpoint) are never trained directly."""

    normalizer: Normalizer
    encoder: Encoder
    fixed_encoder: Encoder
    fixed_encoder_target: Encoder
    actor: SaleActor
    critic: SaleCritics
    actor_target: SaleActor
    critic_target: SaleCritics
    value_range: ValueRange
    checkpoint_normalizer: Normalizer
    checkpoint_encoder: Encoder
    checkpoint_actor: SaleActor
    encoder_opt: torch.optim.Adam
    actor_opt: torch.optim.Adam
    critic_opt: torch.optim.Adam
    priv_normalizer: Normalizer | None = None  # as in td3.Agent

    @classmethod
    def create(cls, cfg: TrainConfig, obs_dim: int, act_dim: int, priv_dim: int = 0) -> Agent:
        zs_dim, dev = cfg.td7_zs_dim, cfg.device
        normalizer = Normalizer(obs_dim, enabled=cfg.normalize_obs).to(dev)
        # SALE's encoders see what the actor sees; only the critics read the privileged inputs
        encoder = Encoder(obs_dim, act_dim, zs_dim, cfg.critic_hidden).to(dev)
        actor = SaleActor(obs_dim, act_dim, zs_dim, cfg.actor_hidden).to(dev)
        critic = SaleCritics(
            cfg.n_critics, obs_dim + priv_dim, act_dim, zs_dim, cfg.critic_hidden
        ).to(dev)
        copies = [copy.deepcopy(m) for m in (encoder, encoder, actor, critic, encoder, actor)]
        for p in (p for m in copies for p in m.parameters()):
            p.requires_grad_(False)
        fixed, fixed_target, actor_target, critic_target, ckpt_encoder, ckpt_actor = copies
        return cls(
            normalizer,
            encoder,
            fixed,
            fixed_target,
            actor,
            critic,
            actor_target,
            critic_target,
            ValueRange().to(dev),
            copy.deepcopy(normalizer),
            ckpt_encoder,
            ckpt_actor,
            torch.optim.Adam(encoder.parameters(), lr=cfg.critic_lr, fused=True),
            torch.optim.Adam(actor.parameters(), lr=cfg.actor_lr, fused=True),
            torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, fused=True),
            privileged_normalizer(cfg, act_dim, priv_dim),
        )

    def modules(self) -> dict[str, nn.Module]:
        return {
            name: getattr(self, name)
            for name in (
                "normalizer",
                "encoder",
                "fixed_encoder",
                "fixed_encoder_target",
                "actor",
                "critic",
                "actor_target",
                "critic_target",
                "value_range",
                "checkpoint_normalizer",
                "checkpoint_encoder",
                "checkpoint_actor",
                "priv_normalizer",
            )
            if getattr(self, name) is not None
        }

    def policy(self, low, high) -> SalePolicy:
        """The deployable graph of the acting actor (a CPU copy, in eval mode); for the
        checkpoint policy, call it on `checkpointed()`."""
        parts = (self.normalizer, self.fixed_encoder, self.actor)
        return SalePolicy(*(copy.deepcopy(m) for m in parts), low, high).cpu().eval()

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Deterministic action in [-1, 1] for raw observations (the actor being trained)."""
        s = self.normalizer(obs)
        return self.actor(s, self.fixed_encoder.zs(s))

    # The parts a deployed actor acts through, each with the slot that holds the exported one:
    # the checkpoint policy's, which evaluations and `deployed` use.
    DEPLOYED = {
        "normalizer": "checkpoint_normalizer",
        "fixed_encoder": "checkpoint_encoder",
        "actor": "checkpoint_actor",
    }

    def checkpointed(self) -> Agent:
        """A view in which the acting parts are the checkpoint's (shared, not copied)."""
        return replace(self, **{part: getattr(self, slot) for part, slot in self.DEPLOYED.items()})

    def save_checkpoint(self) -> None:
        """The acting actor, with the encoder and normalizer it acts through, becomes the
        checkpoint policy."""
        for part, slot in self.DEPLOYED.items():
            getattr(self, slot).load_state_dict(getattr(self, part).state_dict())


def update(
    agent: Agent, batch: dict[str, torch.Tensor], cfg: TrainConfig, update_actor: bool
) -> dict[str, torch.Tensor]:
    """One TD7 step on a batch (as in `td3.update`, plus `next_obs_1`: the state one step on,
    for the encoder, where `next_obs` is n steps on). Returns detached losses and `priority`,
    the batch's new LAP priorities, for the caller to write into the replay (see `learn`)."""
    s = agent.normalizer(batch["obs"])
    s1 = agent.normalizer(batch["next_obs_1"])
    s2 = agent.normalizer(batch["next_obs"])
    c = critic_obs(agent.priv_normalizer, s, batch.get("priv"))
    c2 = critic_obs(agent.priv_normalizer, s2, batch.get("next_priv"))
    a, r = batch["action"], batch["reward"]
    terminal, discount = batch["terminal"], batch["discount"]

    # 1. SALE: g(f(s), a) learns to predict f(s'), the next state's embedding (held fixed)
    with torch.no_grad():
        zs1_goal = agent.encoder.zs(s1)
    zsa_pred = agent.encoder.zsa(agent.encoder.zs(s), a)
    encoder_loss = ((zsa_pred - zs1_goal) ** 2).mean()
    agent.encoder_opt.zero_grad(set_to_none=True)
    encoder_loss.backward()
    agent.encoder_opt.step()

    # 2. TD target as in TD3, through the target encoder, the bootstrap clipped to the range of
    #    targets seen so far; then the embeddings of (s, a) from the fixed encoder
    with torch.no_grad():
        zs2 = agent.fixed_encoder_target.zs(s2)
        eps = (torch.randn_like(a) * cfg.target_noise).clamp(
            -cfg.target_noise_clip, cfg.target_noise_clip
        )
        a2 = (agent.actor_target(s2, zs2) + eps).clamp(-1.0, 1.0)
        zsa2 = agent.fixed_encoder_target.zsa(zs2, a2)
        q2 = agent.critic_target(c2, a2, zsa2, zs2).min(dim=0).values
        y = r + discount * (1.0 - terminal) * agent.value_range.clip(q2)
        agent.value_range.observe(y)
        zs = agent.fixed_encoder.zs(s)
        zsa = agent.fixed_encoder.zsa(zs, a)

    # 3. critic regression onto the target with LAP's loss: quadratic below min_priority and
    #    linear above, the loss whose gradient prioritized sampling leaves unbiased
    q = agent.critic(c, a, zsa, zs)
    td = (q - y).abs()
    k = cfg.td7_min_priority
    critic_loss = torch.where(td < k, 0.5 * td**2, k * td).sum(0).mean()
    agent.critic_opt.zero_grad(set_to_none=True)
    critic_loss.backward()
    agent.critic_opt.step()

    # 4. LAP priorities from the largest TD error over the critics
    priority = td.detach().max(dim=0).values.clamp_min(k).pow(cfg.td7_lap_alpha)
    out = {
        "encoder_loss": encoder_loss.detach(),
        "critic_loss": critic_loss.detach(),
        "q": q.detach().mean(),
        "priority": priority,
    }
    if not update_actor:
        return out

    # 5. actor: ascend the critics' mean at a = μ(s, zs). zsa = ḡ(zs, μ) is a function of the
    #    action, so ∂Q/∂a includes the path through it; zs is an input, untouched by u.
    agent.critic.requires_grad_(False)
    a_pi = agent.actor(s, zs)
    actor_loss = -agent.critic(c, a_pi, agent.fixed_encoder.zsa(zs, a_pi), zs).mean()
    agent.actor_opt.zero_grad(set_to_none=True)
    actor_loss.backward()
    agent.actor_opt.step()
    agent.critic.requires_grad_(True)
    out["actor_loss"] = actor_loss.detach()
    return out


@torch.no_grad()
def refresh(agent: Agent) -> None:
    """Step 6, every `td7_target_every` updates: hard target copies, the encoder chain
    f → f̄ → f̄', and the value range."""
    for src, dst in (
        (agent.actor, agent.actor_target),
        (agent.critic, agent.critic_target),
        (agent.fixed_encoder, agent.fixed_encoder_target),
        (agent.encoder, agent.fixed_encoder),
    ):
        dst.load_state_dict(src.state_dict())
    agent.value_range.refresh()


def learn(
    agent: Agent, buffer: PrioritizedReplay, rng: np.random.Generator, cfg: TrainConfig, n: int
) -> dict[str, torch.Tensor]:
    """Update number `n` (counted from 1): sample by priority, update, write the priorities
    back, and refresh when due."""
    batch = buffer.sample(cfg.batch_size, rng, cfg.n_step, cfg.gamma)
    out = update(agent, batch, cfg, n % cfg.policy_delay == 0)
    buffer.update_priorities(batch["index"].numpy(), out.pop("priority").cpu().numpy())
    if n % cfg.td7_target_every == 0:
        refresh(agent)
        buffer.reset_max_priority()
    return out


class CheckpointRule:
    """TD7's policy checkpoints. The actor being trained is assessed on its own (exploring)
    training episodes, and updates wait until the assessment ends, so that it is one fixed
    actor that is judged. An assessment lasts `episodes` episodes; if all of them return at
    least the bar (the worst return of the checkpoint's assessment), the actor becomes the
    checkpoint and its worst return the new bar. One episode below the bar ends it early,
    without a checkpoint. Either way, the updates owed for the steps collected then run.

    Assessments take 1 episode until `switch_at` updates, `late_episodes` after; at the
    switch the bar is multiplied by 0.9 (the paper: 1, then 10 or 20 after 750k steps).
    """

    def __init__(self, late_episodes: int, switch_at: int, updates_per_step: int = 1):
        self.late_episodes, self.switch_at = late_episodes, switch_at
        self.per_step = updates_per_step
        self.episodes = 1
        self.bar = float("-inf")
        self.worst = float("inf")  # worst return of the assessment under way
        self.seen = 0  # its episodes so far
        self.owed = 0  # environment steps not yet trained on

    def episode_end(self, steps: int, ep_return: float, updates: int) -> tuple[bool, int]:
        """After an episode of `steps` learning steps, with `updates` done so far: (make the
        current actor the checkpoint now, updates to run now)."""
        self.seen += 1
        self.owed += steps
        self.worst = min(self.worst, ep_return)
        if self.worst < self.bar:
            take = False
        elif self.seen == self.episodes:
            take, self.bar = True, self.worst
        else:
            return False, 0
        owed = self.owed * self.per_step
        self.seen, self.owed, self.worst = 0, 0, float("inf")
        if updates <= self.switch_at < updates + owed:
            self.bar *= CHECKPOINT_RESET_WEIGHT
            self.episodes = self.late_episodes
        return take, owed

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        vars(self).update(state)


class EpisodeSchedule:
    """When TD7 learns: at episode ends, as many updates as steps were collected, after the
    checkpoint rule has judged the episode (`CheckpointRule`)."""

    def __init__(
        self, agent: Agent, buffer: PrioritizedReplay, rng: np.random.Generator, cfg: TrainConfig
    ):
        self.agent, self.buffer, self.rng, self.cfg = agent, buffer, rng, cfg
        self.rule = CheckpointRule(
            cfg.td7_checkpoint_episodes, cfg.td7_checkpoint_switch, cfg.updates_per_step
        )
        self.updates = 0

    def after_step(self, steps: int) -> dict[str, torch.Tensor] | None:
        return None

    def after_episode(self, learned: int, ep_return: float) -> dict[str, torch.Tensor] | None:
        """After an episode with `learned` steps past learning_starts: the losses of the
        updates run, if any."""
        if learned <= 0:
            return None
        take, owed = self.rule.episode_end(learned, ep_return, self.updates)
        if take:
            self.agent.save_checkpoint()
        losses = None
        for _ in range(owed):
            self.updates += 1
            losses = learn(self.agent, self.buffer, self.rng, self.cfg, self.updates)
        return losses

    def state_dict(self) -> dict:
        return {"updates": self.updates, "checkpoint_rule": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = state["updates"]
        self.rule.load_state_dict(state["checkpoint_rule"])
