"""The learner's update is training's TD3 update: on a bandit whose best action is known, the
actor's first step follows the sign of ∂Q/∂a and later steps approach the optimum."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from controller.finetune.config import FinetuneConfig
from controller.finetune.experience import row_width
from controller.finetune.learner import Learner
from training import checkpoint
from training.config import TrainConfig
from training.explain import chain_rule_sides
from training.td3 import Agent

BEST = 0.5  # reward -(a - 0.5)^2, every step terminal: Q(s, a) = r(a), best action 0.5


def bandit_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    rows = np.zeros((n, row_width(2, 1)), np.float32)
    obs = rng.normal(0, 1, (n, 2))
    action = rng.uniform(-1, 1, n)
    rows[:, :2] = obs
    rows[:, 2] = action
    rows[:, 3] = -((action - BEST) ** 2)
    rows[:, 4:6] = obs
    rows[:, 6] = 1.0  # terminated
    return rows


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread, as in the learner process, restored afterwards: the setting is
    process-wide and would otherwise carry into the tests that follow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def learner(tmp_path: Path) -> Learner:
    torch.manual_seed(0)
    cfg = TrainConfig(
        env_id="Bandit-v0",
        actor_hidden=[32, 32],
        critic_hidden=[64, 64],
        normalize_obs=False,
        batch_size=64,
        learning_starts=64,
        buffer_size=10_000,
    )
    agent = Agent.create(cfg, 2, 1)
    meta = {
        "env_id": "Bandit-v0",
        "obs_dim": 2,
        "act_dim": 1,
        "obs_layout": [["obs", 2]],
        "action_low": [-1.0],
        "action_high": [1.0],
    }
    checkpoint.save(tmp_path / "agent.pt", cfg, agent, meta)
    ft = FinetuneConfig(
        checkpoint=tmp_path / "agent.pt",
        batch_size=64,
        actor_warmup=1500,
        updates_per_transition=1.0,
        actor_lr=1e-3,
        critic_lr=1e-3,
        buffer_size=10_000,
    )
    return Learner(ft)


def test_actor_follows_dq_da_towards_the_known_optimum(learner: Learner, one_torch_thread) -> None:
    rng = np.random.default_rng(0)
    # critic only until actor_warmup transitions have been seen
    learner.add(bandit_rows(1000, rng))
    while learner.can_update():
        learner.step()
    assert learner.updates == 1000 and learner.actor_updates == 0

    learner.add(bandit_rows(1000, rng))
    probe = torch.as_tensor(rng.normal(0, 1, (64, 2)), dtype=torch.float32)
    agent = learner.agent
    before = agent.act(probe)[:, 0]
    dq_da = torch.stack(
        [chain_rule_sides(agent.normalizer, agent.actor, agent.critic, s)[1][0] for s in probe]
    )
    # the critic has learned the slope: up below the optimum, down above it
    agree = (torch.sign(dq_da) == torch.sign(BEST - before)).float().mean()
    assert agree > 0.9, (before, dq_da)
    while learner.actor_updates == 0:
        learner.step()
    moved = agent.act(probe)[:, 0] - before
    # the first actor step moves the actions the way ∂Q/∂a points, on average and per state
    assert torch.sign(moved.mean()) == torch.sign(dq_da.mean())
    assert (torch.sign(moved) == torch.sign(dq_da)).float().mean() > 0.8

    while learner.can_update():
        learner.step()
    after = agent.act(probe)[:, 0]
    assert (after - BEST).abs().mean() < 0.5 * (before - BEST).abs().mean()
