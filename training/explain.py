"""The deterministic policy gradient, shown on real states:

    ∂Q/∂u = ∂Q(s, a)/∂a · ∂μ(s; u)/∂u   at a = μ(s; u)

Left side: what autograd gives the actor's parameters u for Q_1(s, μ(s)) (the actor loss in
`td3.update` is its negative mean). Right side: ∂Q/∂a taken with respect to the action alone,
times the Jacobian ∂μ/∂u computed separately with `torch.func.jacrev`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, jacrev

from training import checkpoint
from training.export import rollout_observations
from training.networks import Actor, Critics, Normalizer


def chain_rule_sides(
    normalizer: Normalizer, actor: Actor, critic: Critics, obs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one raw observation [obs_dim]: (autograd ∂Q/∂u, ∂Q/∂a, ∂Q/∂a · ∂μ/∂u), u flattened."""
    s = normalizer(obs.unsqueeze(0))
    params = dict(actor.named_parameters())

    # left: autograd through the composition Q(s, μ(s; u))
    q = critic(s, actor(s), members=1)[0].sum()
    left = torch.autograd.grad(q, list(params.values()))
    left = torch.cat([g.reshape(-1) for g in left])

    # right, factor 1: ∂Q/∂a at a = μ(s), the action treated as an independent input
    a = actor(s).detach().requires_grad_(True)
    dq_da = torch.autograd.grad(critic(s, a, members=1)[0].sum(), a)[0][0]  # [act_dim]

    # right, factor 2: the Jacobian ∂μ/∂u, [act_dim, n_params]
    def mu(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return functional_call(actor, p, (s,))[0]

    jac = jacrev(mu)({k: v.detach() for k, v in params.items()})
    jac = torch.cat([jac[k].reshape(dq_da.numel(), -1) for k in params], dim=1)
    return left, dq_da, dq_da @ jac


def explain(source: str | Path, states: int = 3) -> str:
    """A readable report of both sides on `states` observations the policy visits."""
    cfg, agent, meta, state = checkpoint.load(source, "cpu")
    if state is not None and state["replay"]["size"] >= states:
        obs = state["replay"]["obs"][-states:].numpy()
    else:
        obs = rollout_observations(agent, meta, states)
    lines = [
        f"{meta['env_id']} ({cfg.algo}, {meta.get('train_steps', '?')} steps): "
        f"actor has {sum(p.numel() for p in agent.actor.parameters())} parameters u",
        "∂Q/∂u (autograd through Q(s, μ(s)))  vs  ∂Q/∂a · ∂μ/∂u (computed apart)",
    ]
    for i, o in enumerate(obs):
        left, dq_da, right = chain_rule_sides(
            agent.normalizer, agent.actor, agent.critic, torch.as_tensor(o)
        )
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
