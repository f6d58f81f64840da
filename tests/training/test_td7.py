"""TD7: the update and its pieces, the checkpoint rule, and runs on a real PyBullet env
(reproducible, exact resume, the best evaluated actor exported with the encoder inside)."""

import copy
import csv
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from controller.cli import main
from training import checkpoint, td7
from training.config import TrainConfig
from training.envs import EVAL_SEED_OFFSET
from training.evaluate import evaluate_onnx
from training.explain import agent_sides, explain
from training.explain_plot import plot_action_slice
from training.trainer import train

ENV = "InvertedPendulumBulletEnv-v0"


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        env_id=ENV,
        algo="td7",
        steps=1200,
        learning_starts=300,
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32],
        td7_zs_dim=16,
        td7_target_every=50,
        eval_every=600,
        eval_episodes=2,
        checkpoint_every=400,
    )
    return TrainConfig(**{**base, **kw})


def weights(path) -> dict[str, torch.Tensor]:
    _, agent, _, _ = checkpoint.load(path)
    return {
        f"{m}.{k}": v for m, mod in agent.modules().items() for k, v in mod.state_dict().items()
    }


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def props(path) -> dict[str, str]:
    return ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map


def batch(n=16, obs_dim=4, act_dim=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "obs": torch.randn(n, obs_dim, generator=g),
        "action": torch.rand(n, act_dim, generator=g) * 2 - 1,
        "reward": torch.randn(n, generator=g),
        "next_obs": torch.randn(n, obs_dim, generator=g),
        "next_obs_1": torch.randn(n, obs_dim, generator=g),
        "terminal": torch.zeros(n),
        "discount": torch.full((n,), 0.99),
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("td7")
    train(small_cfg(), out, progress=False)
    return out


# -- the update ------------------------------------------------------------------------------


def tiny_agent(seed=0) -> tuple[TrainConfig, td7.Agent]:
    torch.manual_seed(seed)
    cfg = TrainConfig(
        algo="td7",
        batch_size=16,
        learning_starts=16,
        actor_hidden=[8],
        critic_hidden=[8],
        td7_zs_dim=6,
    )
    agent = td7.Agent.create(cfg, obs_dim=4, act_dim=2)
    agent.normalizer.update(torch.randn(50, 4))
    return cfg, agent


def test_actor_gradient_is_the_mean_chain_rule_product_through_zs():
    """The actor's input includes zs, yet the gradient `td7.update` leaves on u is still
    -mean_b ∂Q/∂a · ∂μ/∂u, with ∂Q/∂a the total slope (through zsa = ḡ(zs, a) too)."""
    cfg, agent = tiny_agent()
    b = batch()
    before = copy.deepcopy(agent)
    td7.update(agent, b, cfg, update_actor=True)
    got = torch.cat([p.grad.reshape(-1) for p in agent.actor.parameters()])
    view = copy.copy(agent)
    view.actor = before.actor  # the actor as it was when its gradient was taken
    sides = [agent_sides(view, o) for o in b["obs"]]
    want = -torch.stack([right for _, _, right in sides]).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for left, _, right in sides:
        torch.testing.assert_close(left, right, rtol=1e-4, atol=1e-7)


def test_update_trains_the_encoder_and_leaves_fixed_copies_until_refresh():
    cfg, agent = tiny_agent()
    fixed = copy.deepcopy(agent.fixed_encoder.state_dict())
    enc0 = copy.deepcopy(agent.encoder.state_dict())
    losses = [float(td7.update(agent, batch(), cfg, True)["encoder_loss"]) for _ in range(30)]
    assert losses[-1] < losses[0]  # g(f(s), a) learns to predict f(s') on a fixed batch
    assert any(not torch.equal(enc0[k], v) for k, v in agent.encoder.state_dict().items())
    for k, v in agent.fixed_encoder.state_dict().items():
        assert torch.equal(fixed[k], v)
    td7.refresh(agent)
    for k, v in agent.encoder.state_dict().items():
        assert torch.equal(agent.fixed_encoder.state_dict()[k], v)
        assert torch.equal(agent.fixed_encoder_target.state_dict()[k], fixed[k])
    for k, v in agent.actor.state_dict().items():
        assert torch.equal(agent.actor_target.state_dict()[k], v)


def test_value_clipping_uses_the_range_seen_until_the_last_refresh():
    vr = td7.ValueRange()
    q = torch.tensor([-5.0, 0.5, 9.0])
    assert vr.clip(q).tolist() == [0.0, 0.0, 0.0]  # before any refresh: [0, 0], as the paper
    vr.observe(torch.tensor([-2.0, 3.0]))
    vr.observe(torch.tensor([1.0, 4.0]))
    assert vr.clip(q).tolist() == [0.0, 0.0, 0.0]  # seen, not yet in use
    vr.refresh()
    assert vr.clip(q).tolist() == [-2.0, 0.5, 4.0]


def test_first_targets_are_the_rewards_alone():
    """With the clip at [0, 0] the first critic step regresses onto y = r (n-step sums)."""
    cfg, agent = tiny_agent()
    b = batch()
    td7.update(agent, b, cfg, update_actor=False)
    assert float(agent.value_range.seen_low) == pytest.approx(float(b["reward"].min()))
    assert float(agent.value_range.seen_high) == pytest.approx(float(b["reward"].max()))


# -- the checkpoint rule ---------------------------------------------------------------------


def test_checkpoint_rule_early_phase_keeps_the_best_single_episode():
    rule = td7.CheckpointRule(late_episodes=3, switch_at=10_000)
    assert rule.episode_end(100, 10.0, updates=0) == (True, 100)  # anything beats -inf
    assert rule.episode_end(50, 5.0, updates=100) == (False, 50)  # below the bar: train on
    assert rule.episode_end(70, 12.0, updates=150) == (True, 70)
    assert rule.bar == 12.0


def test_checkpoint_rule_late_phase_assesses_several_episodes_and_stops_early():
    rule = td7.CheckpointRule(late_episodes=3, switch_at=150)
    assert rule.episode_end(100, 10.0, updates=0) == (True, 100)
    assert rule.episode_end(60, 20.0, updates=100) == (True, 60)  # crosses update 150
    assert rule.episodes == 3 and rule.bar == pytest.approx(18.0)  # lowered by 0.9
    assert rule.episode_end(10, 19.0, updates=160) == (False, 0)  # still assessing
    assert rule.episode_end(10, 25.0, updates=160) == (False, 0)
    assert rule.episode_end(10, 18.5, updates=160) == (True, 30)  # worst 18.5 >= 18
    assert rule.bar == 18.5
    assert rule.episode_end(10, 30.0, updates=190) == (False, 0)
    assert rule.episode_end(10, 1.0, updates=190) == (False, 20)  # one bad episode ends it
    state = rule.state_dict()
    other = td7.CheckpointRule(late_episodes=3, switch_at=150)
    other.load_state_dict(state)
    assert other.state_dict() == state


# -- runs ------------------------------------------------------------------------------------


def test_run_evaluates_both_actors_and_exports_the_best(run):
    rows = list(csv.DictReader(open(run / "evals.csv")))
    assert [(int(r["step"]), r["actor"]) for r in rows] == [
        (600, "checkpoint"), (600, "current"), (1200, "checkpoint"), (1200, "current")
    ]  # fmt: skip
    c = small_cfg()
    best = max(float(r["return_mean"]) for r in rows)
    meta = props(run / "policy.onnx")
    assert (meta["mu.algo"], meta["mu.export_rule"]) == ("td7", "best")
    # the file holds an actor that returns the best evaluation of any actor the run measured
    assert json.loads(meta["mu.eval_return"]) == pytest.approx(best)
    again = evaluate_onnx(str(run / "policy.onnx"), c.eval_episodes, c.seed + EVAL_SEED_OFFSET)
    assert again.mean_return == pytest.approx(best, abs=1e-3)
    last = props(run / "policy.last.onnx")
    assert last["mu.export_rule"] == "last"
    again = evaluate_onnx(str(run / "policy.last.onnx"), c.eval_episodes, c.seed + EVAL_SEED_OFFSET)
    assert again.mean_return == pytest.approx(json.loads(last["mu.eval_return"]), abs=1e-3)
    ckpt = weights(run / "checkpoint.pt")
    assert any(
        not torch.equal(ckpt[f"checkpoint_actor.{k}"], ckpt[f"actor.{k}"])
        for k in ("embed.weight", "net.0.weight")
    )  # the rule picked an earlier actor than the last
    assert (run / "curve.png").stat().st_size > 0


def test_onnx_holds_the_state_encoder_with_parity(run, tmp_path):
    _, agent, meta, _ = checkpoint.load(run / "agent.pt")  # its deployed actor is policy.onnx's
    state = checkpoint.load(run / "checkpoint.pt")[3]
    policy = agent.checkpointed().policy(meta["action_low"], meta["action_high"])
    obs = state["replay"]["obs"].numpy()[-500:]
    obs = np.concatenate([obs, np.random.default_rng(0).normal(0, 3, (500, obs.shape[1]))])
    obs = obs.astype(np.float32)
    with torch.no_grad():
        want = policy(torch.from_numpy(obs)).numpy()
    got = ort.InferenceSession(str(run / "policy.onnx")).run(["action"], {"obs": obs})[0]
    assert np.abs(got - want).max() <= 1e-5
    with torch.no_grad():  # the encoder matters to the action: zeroing zs changes it
        s = policy.normalizer(torch.from_numpy(obs))
        blind = policy.act_bias + policy.act_scale * policy.actor(s, torch.zeros(len(s), 16))
    assert np.abs(blind.numpy() - got).max() > 1e-3
    # `mu export RUN` of a td7 run writes the actor of its policy.onnx
    assert main(["export", str(run), "--out", str(tmp_path / "p.onnx")]) == 0
    assert props(tmp_path / "p.onnx")["mu.export_rule"] == "best"
    again = ort.InferenceSession(str(tmp_path / "p.onnx")).run(["action"], {"obs": obs})[0]
    assert np.abs(again - got).max() <= 1e-5


def test_same_seed_is_bit_identical(run, tmp_path):
    train(small_cfg(), tmp_path, progress=False)
    assert_same_weights(run / "checkpoint.pt", tmp_path / "checkpoint.pt")
    a = (run / "evals.csv").read_text().splitlines()
    b = (tmp_path / "evals.csv").read_text().splitlines()
    strip_wall = lambda lines: [line.split(",")[:1] + line.split(",")[2:] for line in lines]  # noqa: E731
    assert strip_wall(a) == strip_wall(b)


def test_resume_continues_exactly(run, tmp_path):
    train(small_cfg(steps=500), tmp_path, progress=False)
    state = checkpoint.load(tmp_path / "checkpoint.pt")[3]
    assert 400 <= state["step"] <= 500 and state["checkpoint_rule"]["bar"] > float("-inf")
    train(small_cfg(), tmp_path, resume=True, progress=False)
    assert_same_weights(run / "checkpoint.pt", tmp_path / "checkpoint.pt")
    a = checkpoint.load(run / "checkpoint.pt")[3]
    b = checkpoint.load(tmp_path / "checkpoint.pt")[3]
    assert torch.equal(a["replay"]["priority"], b["replay"]["priority"])
    assert a["checkpoint_rule"] == b["checkpoint_rule"]


def test_explain_shows_the_chain_rule_with_zs(run, tmp_path):
    text = explain(run, states=3)
    assert "μ(s, zs; u)" in text
    diffs = [
        float(line.split("max |difference| ")[1].split(",")[0])
        for line in text.splitlines()
        if "max |difference|" in line
    ]
    assert len(diffs) == 3 and max(diffs) < 1e-5
    path, summary = plot_action_slice(run, tmp_path / "slice.png")
    assert path.stat().st_size > 0 and "one actor step moves μ(s)" in summary


def test_export_last_writes_the_last_actor(run, tmp_path):
    train(small_cfg(export="last"), tmp_path, progress=False)  # same seed: the same run
    assert props(tmp_path / "policy.onnx")["mu.export_rule"] == "last"
    obs = checkpoint.load(run / "checkpoint.pt")[3]["replay"]["obs"].numpy()[-200:]
    a = ort.InferenceSession(str(tmp_path / "policy.onnx")).run(["action"], {"obs": obs})[0]
    b = ort.InferenceSession(str(run / "policy.last.onnx")).run(["action"], {"obs": obs})[0]
    np.testing.assert_array_equal(a, b)
