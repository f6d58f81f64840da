"""The learner's update is training's TD3 update: on a bandit whose best action is known, the
actor's first step follows the sign of ∂Q/∂a and later steps approach the optimum."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from controller.contract import row_width
from controller.finetune.config import FinetuneConfig
from controller.finetune.learner import Learner
from controller.finetune.versions import candidate_paths
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


def make_learner(tmp_path: Path, *, normalize_obs: bool = False, **finetune) -> Learner:
    """A learner on the bandit, from a checkpoint written to tmp_path (normalizer statistics
    set from observations around 3 when `normalize_obs`)."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        env_id="Bandit-v0",
        actor_hidden=[32, 32],
        critic_hidden=[64, 64],
        normalize_obs=normalize_obs,
        batch_size=64,
        learning_starts=64,
        buffer_size=10_000,
    )
    agent = Agent.create(cfg, 2, 1)
    agent.normalizer.update(torch.randn(500, 2) + 3.0)
    meta = {
        "env_id": "Bandit-v0",
        "obs_dim": 2,
        "act_dim": 1,
        "obs_layout": [["obs", 2]],
        "action_low": [-1.0],
        "action_high": [1.0],
    }
    checkpoint.save(tmp_path / "agent.pt", cfg, agent, meta)
    settings = dict(
        batch_size=64,
        actor_warmup=1500,
        updates_per_transition=1.0,
        actor_lr=1e-3,
        critic_lr=1e-3,
        buffer_size=10_000,
    )
    return Learner(FinetuneConfig(checkpoint=tmp_path / "agent.pt", **{**settings, **finetune}))


@pytest.fixture
def learner(tmp_path: Path) -> Learner:
    return make_learner(tmp_path)


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.clone()
        for name, module in learner.agent.modules().items()
        for k, v in module.state_dict().items()
    }


def train(learner: Learner, rng: np.random.Generator, rows: int = 200) -> None:
    learner.add(bandit_rows(rows, rng))
    while learner.can_update():
        learner.step()


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


def test_the_normalizer_stays_frozen_while_fine_tuning(tmp_path: Path, one_torch_thread) -> None:
    learner = make_learner(tmp_path, normalize_obs=True, actor_warmup=0)
    normalizer = learner.agent.normalizer
    before = {k: v.clone() for k, v in normalizer.state_dict().items()}
    rng = np.random.default_rng(1)
    rows = bandit_rows(300, rng)
    rows[:, :2] += 40.0  # observations far from what the statistics were built on
    rows[:, 4:6] += 40.0
    learner.add(rows)
    while learner.can_update():
        learner.step()
    assert learner.actor_updates > 0
    assert not normalizer.training
    for k, v in normalizer.state_dict().items():
        assert torch.equal(v, before[k]), f"normalizer {k} moved"


def test_after_a_rollback_the_learner_continues_from_that_versions_agent(
    tmp_path: Path, one_torch_thread
) -> None:
    learner = make_learner(tmp_path, actor_warmup=0)
    versions = learner.cfg.versions_dir
    rng = np.random.default_rng(2)

    def candidate(index: int) -> Path:
        """What export_candidate leaves on disk, minus the ONNX export (served() reads only the
        agent snapshot next to the file)."""
        onnx_path, agent_path = candidate_paths(versions, index)
        checkpoint.save(agent_path, learner.train_cfg, learner.agent, learner.meta)
        onnx_path.write_bytes(b"stand-in")
        return onnx_path

    train(learner, rng)
    v2, at_v2 = candidate(1), weights(learner)
    learner.served(str(v2), False)
    train(learner, rng)
    v3 = candidate(2)
    learner.served(str(v3), False)
    train(learner, rng)
    assert weights(learner).keys() == at_v2.keys()
    assert any(not torch.equal(v, at_v2[k]) for k, v in weights(learner).items())

    learner.served(str(v2), True)  # version 3 regressed: back to version 2
    for k, v in weights(learner).items():
        assert torch.equal(v, at_v2[k]), f"{k} is not version 2's"
    assert [g["lr"] for g in learner.agent.actor_opt.param_groups] == [learner.cfg.actor_lr]
    assert not learner.agent.normalizer.training

    # back to the policy the server started with (no snapshot): the --finetune checkpoint
    learner.served(str(tmp_path / "policy.onnx"), True)
    _, original, _, _ = checkpoint.load(learner.cfg.checkpoint)
    for name, module in original.modules().items():
        for k, v in module.state_dict().items():
            assert torch.equal(learner.agent.modules()[name].state_dict()[k], v)


def test_start_paused_holds_updates_until_resumed(tmp_path: Path) -> None:
    learner = make_learner(tmp_path, start_paused=True)
    learner.add(bandit_rows(200, np.random.default_rng(3)))
    assert learner.paused and not learner.can_update()
    learner.paused = False  # what the "resume" command sets
    assert learner.can_update()


def test_candidates_after_the_first_fill_its_graph(tmp_path: Path, one_torch_thread) -> None:
    """Only the first candidate goes through torch.onnx.export; later ones, after a rollback
    too, fill its graph with their own weights: each file acts as its agent snapshot does."""
    learner = make_learner(tmp_path, normalize_obs=True, actor_warmup=0)
    rng = np.random.default_rng(4)
    found = []
    for rollback in (False, False, True):
        if rollback:
            learner.served(found[0]["path"], True)
        train(learner, rng)
        found.append(learner.export_candidate())
    assert [c["kind"] for c in found] == ["candidate"] * 3
    assert (learner.exporter.full_exports, learner.exporter.reused) == (1, 2)
    obs = rng.normal(3, 2, (300, 2)).astype(np.float32)
    actions = []
    for c in found:
        onnx_path, agent_path = candidate_paths(learner.cfg.versions_dir, c["index"])
        _, agent, meta, _ = checkpoint.load(agent_path)
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        actions.append(sess.run(["action"], {"obs": obs})[0])
        want = agent.policy(meta["action_low"], meta["action_high"])(torch.from_numpy(obs))
        np.testing.assert_allclose(actions[-1], want.detach().numpy(), atol=1e-5)
        written = sess.get_modelmeta().custom_metadata_map["mu.train_steps"]
        assert written == str(meta["train_steps"])
    assert not np.allclose(actions[0], actions[1]) and not np.allclose(actions[1], actions[2])
