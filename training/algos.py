"""Which agent, replay and update schedule an algorithm uses: TD3 and DDPG share `td3.Agent`,
uniform replay and an update after every step (`td3.StepSchedule`); TD7 has its own agent
(`td7.Agent`), prioritized replay (`lap.PrioritizedReplay`) and updates at episode ends
(`td7.EpisodeSchedule`). Also the one place that knows which actor an agent deploys."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np

from training import td3, td7
from training.config import TrainConfig
from training.lap import PrioritizedReplay
from training.replay import ReplayBuffer

AnyAgent = td3.Agent | td7.Agent
AnySchedule = td3.StepSchedule | td7.EpisodeSchedule
OPTIMIZERS = ("actor_opt", "critic_opt", "encoder_opt")  # those an agent has are checkpointed


def create_agent(cfg: TrainConfig, obs_dim: int, act_dim: int, priv_dim: int = 0) -> AnyAgent:
    agent_cls = td7.Agent if cfg.algo == "td7" else td3.Agent
    return agent_cls.create(cfg, obs_dim, act_dim, priv_dim)


def create_buffer(cfg: TrainConfig, obs_dim: int, act_dim: int, priv_dim: int = 0) -> ReplayBuffer:
    buffer_cls = PrioritizedReplay if cfg.algo == "td7" else ReplayBuffer
    return buffer_cls(cfg.buffer_size, obs_dim, act_dim, cfg.device, priv_dim)


def create_schedule(
    cfg: TrainConfig, agent: AnyAgent, buffer: ReplayBuffer, rng: np.random.Generator
) -> AnySchedule:
    schedule_cls = td7.EpisodeSchedule if cfg.algo == "td7" else td3.StepSchedule
    return schedule_cls(agent, buffer, rng, cfg)


def deployed(agent: AnyAgent) -> AnyAgent:
    """The agent whose actor evaluations judge first and `mu export` writes: TD7's checkpoint
    policy, or the agent itself."""
    return agent.checkpointed() if isinstance(agent, td7.Agent) else agent


def actors(agent: AnyAgent) -> dict[str, AnyAgent]:
    """The actors an evaluation measures, by name: the deployed one first, then the one being
    trained where it is another (TD7's checkpoint policy and current actor)."""
    if isinstance(agent, td7.Agent):
        return {"checkpoint": agent.checkpointed(), "current": agent}
    return {"current": agent}


def actor_weights(view: AnyAgent) -> dict[str, Any]:
    """Copies of the weights a view acts through (actor, normalizer, TD7's encoder): plain
    tensors, so a training checkpoint holding them loads with weights_only."""
    return {part: copy.deepcopy(getattr(view, part).state_dict()) for part in view.DEPLOYED}


def with_deployed(agent: AnyAgent, weights: dict[str, Any]) -> AnyAgent:
    """A copy of `agent` whose deployed actor has `weights` (from `actor_weights`); the parts
    it trains are shared, the deployed ones copied, so `agent` is left as it is."""
    parts = {}
    for part, slot in agent.DEPLOYED.items():
        module = copy.deepcopy(getattr(agent, slot))
        module.load_state_dict(weights[part])
        parts[slot] = module
    return dataclasses.replace(agent, **parts)
