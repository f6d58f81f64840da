"""The deterministic policy gradient, shown on real states:

    ∂Q/∂u = ∂Q(s, a)/∂a · ∂μ(s; u)/∂u   at a = μ(s; u)

Left side: what autograd gives the actor's parameters u for Q_1(s, μ(s)) (the actor loss in
`td3.update` is its negative mean). Right side: ∂Q/∂a taken with respect to the action alone,
times the Jacobian ∂μ/∂u computed separately with `torch.func.jacrev`.

For TD7 the actor is μ(s, zs; u) with zs = f̄(s) from the fixed state encoder, an input that
does not depend on u, and Q is the critics' mean Q(s, a, ḡ(zs, a), zs): ∂Q/∂a is the total
slope, through a directly and through zsa = ḡ(zs, a). The chain rule is the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev

from training import checkpoint, td7
from training.algos import AnyAgent
from training.export import rollout_observations
from training.networks import Actor, Critics, Normalizer

Objective = Callable[[torch.Tensor], torch.Tensor]  # actions [B, act_dim] → Q per row [B]


def chain_rule_sides(
    normalizer: Normalizer, actor: Actor, critic: Critics, obs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one raw observation [obs_dim]: (autograd ∂Q/∂u, ∂Q/∂a, ∂Q/∂a · ∂μ/∂u), u flattened."""
    s = normalizer(obs.unsqueeze(0))
    return dpg_sides(actor, (s,), lambda a: critic(s, a, members=1)[0])


def actor_objective(
    agent: AnyAgent, obs: torch.Tensor
) -> tuple[tuple[torch.Tensor, ...], Objective]:
    """For raw observations [B, obs_dim]: the actor's inputs, and a → the Q its update climbs
    (TD3: Q_1(s, a); TD7: mean_i Q_i(s, a, ḡ(zs, a), zs))."""
    s = agent.normalizer(obs)
    if isinstance(agent, td7.Agent):
        zs = agent.fixed_encoder.zs(s).detach()
        enc, critic = agent.fixed_encoder, agent.critic
        return (s, zs), lambda a: critic(s, a, enc.zsa(zs, a), zs).mean(0)
    return (s,), lambda a: agent.critic(s, a, members=1)[0]


def agent_sides(
    agent: AnyAgent, obs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chain_rule_sides` for any agent's actor update, at one raw observation [obs_dim]."""
    inputs, q = actor_objective(agent, obs.unsqueeze(0))
    return dpg_sides(agent.actor, inputs, q)


def dpg_sides(
    actor: nn.Module, inputs: tuple[torch.Tensor, ...], q: Objective
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one state (inputs with batch 1): (autograd ∂Q/∂u, ∂Q/∂a, ∂Q/∂a · ∂μ/∂u)."""
    params = dict(actor.named_parameters())

    # left: autograd through the composition Q(s, μ(s; u))
    left = torch.autograd.grad(q(actor(*inputs)).sum(), list(params.values()))
    left = torch.cat([g.reshape(-1) for g in left])

    # right, factor 1: ∂Q/∂a at a = μ(s), the action treated as an independent input
    a = actor(*inputs).detach().requires_grad_(True)
    dq_da = torch.autograd.grad(q(a).sum(), a)[0][0]  # [act_dim]

    # right, factor 2: the Jacobian ∂μ/∂u, [act_dim, n_params]
    def mu(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(actor, p, inputs)[0]

    jac = jacrev(mu)({k: v.detach() for k, v in params.items()})
    jac = torch.cat([jac[k].reshape(dq_da.numel(), -1) for k in params], dim=1)
    return left, dq_da, dq_da @ jac


def explain(source: str | Path, states: int = 3) -> str:
    """A readable report of both sides on `states` observations the policy visits."""
    cfg, agent, meta, state = checkpoint.load(source, "cpu")
    replay = checkpoint.saved_replay(source, state)
    if replay is not None and replay.size >= states:
        obs = replay.recent_obs(states)
    else:
        obs = rollout_observations(agent, meta, states)
    lines = [
        f"{meta['env_id']} ({cfg.algo}, {meta.get('train_steps', '?')} steps): "
        f"actor has {sum(p.numel() for p in agent.actor.parameters())} parameters u",
    ]
    if cfg.algo == "td7":
        lines += [
            "TD7: the actor is μ(s, zs; u), zs = f̄(s) from the fixed state encoder (an input, "
            "not a function of u);",
            "     Q = mean_i Q_i(s, a, ḡ(zs, a), zs), so ∂Q/∂a runs through a and zsa = ḡ(zs, a)",
            "∂Q/∂u (autograd through Q(s, μ(s, zs)))  vs  ∂Q/∂a · ∂μ/∂u (computed apart)",
        ]
    else:
        lines.append("∂Q/∂u (autograd through Q(s, μ(s)))  vs  ∂Q/∂a · ∂μ/∂u (computed apart)")
    for i, o in enumerate(obs):
        left, dq_da, right = agent_sides(agent, torch.as_tensor(o))
        diff = (left - right).abs().max().item()
        top = left.abs().topk(5).indices
        cos = torch.nn.functional.cosine_similarity(left, right, dim=0).item()
        lines += [
            f"state {i}: ∂Q/∂a = {np.array2string(dq_da.numpy(), precision=4)}",
            f"  autograd   at the 5 largest: {_at(left, top)}  norm {left.norm():.6f}",
            f"  chain rule at the 5 largest: {_at(right, top)}  norm {right.norm():.6f}",
            f"  max |difference| {diff:.2e}, cosine {cos:.8f}",
        ]
    return "\n".join(lines)


def _at(v: torch.Tensor, idx: torch.Tensor) -> str:
    return np.array2string(v[idx].numpy(), precision=6)
