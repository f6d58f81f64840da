"""Which agent and replay an algorithm uses: TD3 and DDPG share `td3.Agent` and uniform replay;
TD7 has its own agent (`td7.Agent`) and prioritized replay (`lap.PrioritizedReplay`)."""

from __future__ import annotations

from training import td3, td7
from training.config import TrainConfig
from training.lap import PrioritizedReplay
from training.replay import ReplayBuffer

AnyAgent = td3.Agent | td7.Agent
OPTIMIZERS = ("actor_opt", "critic_opt", "encoder_opt")  # those an agent has are checkpointed


def create_agent(cfg: TrainConfig, obs_dim: int, act_dim: int) -> AnyAgent:
    agent_cls = td7.Agent if cfg.algo == "td7" else td3.Agent
    return agent_cls.create(cfg, obs_dim, act_dim)


def create_buffer(cfg: TrainConfig, obs_dim: int, act_dim: int) -> ReplayBuffer:
    buffer_cls = PrioritizedReplay if cfg.algo == "td7" else ReplayBuffer
    return buffer_cls(cfg.buffer_size, obs_dim, act_dim, cfg.device)


def deployed(agent: AnyAgent) -> AnyAgent:
    """The agent whose actor evaluations judge and `policy.onnx` holds by default: TD7's
    checkpoint policy, or the agent itself."""
    return agent.checkpointed() if isinstance(agent, td7.Agent) else agent
