"""Inputs that join a run when its ranges start to widen (`grow_inputs`): the nominal run's
agent, replay and optimizers rewritten as those of a run with history in the actor's input and
a privileged critic, computing the same functions.

A run with history from its first step is another run from its first step: the gait it finds
is a draw of its own (benchmarks/README.md). Grown at the widening, it is the nominal run until
then, gait included, and then learns to use the inputs:
- the actor's and the critics' new first-layer weights are zero, so μ and Q are unchanged;
- the normalizer keeps its statistics for the observation and takes the new inputs' from the
  replay;
- the replay's observations are rebuilt with their history (`History`, from each episode's
  start and its stored actions) and the privileged inputs the nominal dynamics had
  (`nominal_privileged`);
- Adam's moments for the new weights start at zero (first moment) and at the mean of their
  row's second moments: a zero second moment would step them 3-6x the learning rate for the
  first few hundred updates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from controller.history import History
from training.algos import actor_weights
from training.envs import to_env_units
from training.networks import Normalizer
from training.replay import ReplayBuffer
from training.td3 import Agent


def embed(old: torch.Tensor, like: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`like` (a copy) with `old` written into it at `index` along the one dim where their
    shapes differ; `old` itself where they do not."""
    if old.shape == like.shape:
        return old.clone()
    (dim,) = [i for i, (a, b) in enumerate(zip(old.shape, like.shape, strict=True)) if a != b]
    return like.clone().index_copy_(dim, index.to(like.device), old.to(like.dtype))


def grow_state(
    old: dict[str, torch.Tensor], like: dict[str, torch.Tensor], index: torch.Tensor
) -> dict[str, torch.Tensor]:
    """A module's state dict grown into `like`'s shapes (`embed`, tensor by tensor)."""
    return {k: embed(v, like[k], index) for k, v in old.items()}


def grow_normalizer(old: dict, new: Normalizer, obs: np.ndarray, index: torch.Tensor) -> dict:
    """`old`'s statistics at `index`, the statistics of `obs` (the grown replay's inputs)
    elsewhere, at `old`'s count (a wrapped replay holds fewer steps than the normalizer saw)."""
    fresh = Normalizer(new.mean.numel(), new.enabled, new.clip, new.eps, new.raw)
    fresh.update(torch.as_tensor(obs))
    fresh.m2 *= old["count"] / fresh.count
    return grow_state(old, {k: v.to(new.mean.device) for k, v in fresh.state_dict().items()}, index)


def grow_adam(old: dict, params: list[torch.nn.Parameter], index: torch.Tensor) -> dict:
    """An Adam state dict for `params` from `old`'s, for the same parameters grown (module
    doc: the new weights' first moment zero, second moment their row's mean)."""
    state = {}
    for i, moments in old["state"].items():
        p = params[i]
        grown = dict(moments)
        if moments["exp_avg"].shape != p.shape:
            sq = moments["exp_avg_sq"]
            (dim,) = [d for d, (a, b) in enumerate(zip(p.shape, sq.shape, strict=True)) if a != b]
            grown["exp_avg"] = embed(moments["exp_avg"], torch.zeros_like(p), index)
            like = sq.mean(dim, keepdim=True).expand_as(p)
            grown["exp_avg_sq"] = embed(sq, like.contiguous(), index)
        state[i] = grown
    return {"state": state, "param_groups": old["param_groups"]}


def grow_module(old: dict[str, torch.Tensor], new: torch.nn.Module, index: torch.Tensor) -> dict:
    """A network's state dict grown into `new`'s shapes, the new weights at zero."""
    return grow_state(old, {k: torch.zeros_like(v) for k, v in new.state_dict().items()}, index)


def grow_agent(old: Agent, new: Agent, obs: np.ndarray, priv: np.ndarray | None) -> None:
    """Load into `new` (created for the grown inputs) `old`'s agent, grown; `obs` and `priv`
    are the grown replay's columns, for the new inputs' statistics."""
    d, dim = old.normalizer.mean.numel(), new.normalizer.mean.numel()
    p = 0 if priv is None else priv.shape[1]
    act_dim = old.actor.net[-1].out_features
    actor_index = torch.arange(d)
    # the critics read [observation, privileged, action]: the action moves past the new inputs
    critic_index = torch.cat([torch.arange(d), torch.arange(dim + p, dim + p + act_dim)])
    for part, weights in grow_weights(actor_weights(old), new, obs).items():
        getattr(new, part).load_state_dict(weights)
    if new.priv_normalizer is not None:
        new.priv_normalizer.update(torch.as_tensor(priv, device=new.priv_normalizer.mean.device))
    for slot, index in (("actor_target", actor_index), ("critic", critic_index),
                        ("critic_target", critic_index)):  # fmt: skip
        net = getattr(new, slot)
        net.load_state_dict(grow_module(getattr(old, slot).state_dict(), net, index))
    for name, index in (("actor", actor_index), ("critic", critic_index)):
        params = list(getattr(new, name).parameters())
        old_state = getattr(old, f"{name}_opt").state_dict()
        getattr(new, f"{name}_opt").load_state_dict(grow_adam(old_state, params, index))


def grow_weights(weights: dict, new: Agent, obs: np.ndarray) -> dict:
    """Deployed weights (`algos.actor_weights`: normalizer and actor; a snapshot's) grown."""
    index = torch.arange(weights["normalizer"]["mean"].numel())
    return {
        "normalizer": grow_normalizer(weights["normalizer"], new.normalizer, obs, index),
        "actor": grow_module(weights["actor"], new.actor, index),
    }


def grow_replay(
    old: ReplayBuffer,
    new: ReplayBuffer,
    history: History | None,
    low: np.ndarray,
    high: np.ndarray,
    priv: Callable[[np.ndarray], np.ndarray] | None,
) -> dict[str, np.ndarray]:
    """Fill `new` with `old`'s transitions, oldest first, their observations with history (each
    episode from its start, with its stored actions as the env received them; a wrapped
    buffer's oldest episode from its oldest stored step) and `priv(observation)` beside them.
    Returns what it stored ({field: [n, dim]}, oldest first: `ReplayBuffer.newest`'s layout)."""
    raw = old.newest(old.size)
    rows = dict(raw)
    if history is not None:
        obs, next_obs = [], []
        start = True
        steps = zip(raw["obs"], raw["action"], raw["next_obs"], raw["episode_end"], strict=True)
        for o, a, o2, end in steps:
            obs.append(history.reset(o) if start else next_obs[-1])
            next_obs.append(history.step(to_env_units(a, low, high), o2))
            start = bool(end[0])
        rows["obs"], rows["next_obs"] = np.stack(obs), np.stack(next_obs)
    if priv is not None:
        rows["priv"] = np.stack([priv(o) for o in raw["obs"]])
        rows["next_priv"] = np.stack([priv(o) for o in raw["next_obs"]])
    new.extend(rows)
    return rows
