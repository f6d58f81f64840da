"""Policies that adapt: history in the actor's input, a privileged critic, randomization that
widens from nominal. Real PyBullet envs, real runs on tiny budgets."""

import dataclasses
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from controller.errors import UsageError
from controller.finetune.config import FinetuneConfig
from controller.finetune.learner import Learner
from training import checkpoint
from training.config import TrainConfig
from training.envs import make_env, to_env_units
from training.evaluate import evaluate_onnx
from training.history import History, HistoryObs
from training.randomization import (
    ActionLatency,
    CleanObs,
    Dynamics,
    Widening,
    find,
    nominal_privileged,
    privileged,
    randomize,
    widening_scale,
)
from training.snapshots import snapshot
from training.td3 import critic_obs
from training.trainer import EvalResult, Run, _grow, branch, train

ENV = "InvertedPendulumBulletEnv-v0"  # 5 observations, 1 action in [-1, 1]
RANGES = {"mass": [0.5, 1.5], "latency": [0, 2]}


def cfg(**kw) -> TrainConfig:
    base = dict(env_id=ENV, steps=700, learning_starts=200, batch_size=32, actor_hidden=[16],
                critic_hidden=[16], eval_every=350, eval_episodes=1, checkpoint_every=10_000,
                rand_mass=RANGES["mass"], rand_latency=RANGES["latency"], history_obs=1,
                history_actions=3, privileged_critic=True)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def assert_same_networks(a: dict, b: dict) -> None:
    """Every tensor of two agents' modules (`Agent.modules()`) equal, bit for bit."""
    assert a.keys() == b.keys()
    for name, module in a.items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, b[name].state_dict()[k]), f"{name}.{k}"


def test_history_holds_the_applied_actions_and_starts_fresh_each_episode():
    env = HistoryObs(
        randomize(make_env(ENV, 0), {"latency": [2, 2]}, np.random.default_rng(0)), 1, 3
    )
    first = env.reset(seed=1)[0]
    obs0 = first[:5]
    np.testing.assert_array_equal(first[5:10], obs0)  # the past observation: the first one
    np.testing.assert_array_equal(first[10:], [0.0, 0.0, 0.0])  # past actions: the midpoint
    sent = [0.5, -0.25, 0.75]
    for a in sent:
        x = env.step(np.array([a], np.float32))[0]
    # newest first; the commanded actions, not the ones the 2-step latency let through
    np.testing.assert_array_equal(x[10:], np.float32([0.75, -0.25, 0.5]))
    assert find(env, ActionLatency).k == 2
    again = env.reset(seed=2)[0]
    np.testing.assert_array_equal(again[10:], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(again[5:10], again[:5])


def test_history_from_a_policy_files_spec_builds_the_same_input():
    env = HistoryObs(make_env(ENV, 0), 2, 2)
    other = History.from_spec(env.history.spec(), [-1.0], [1.0])
    x = env.reset(seed=3)[0]
    np.testing.assert_array_equal(other.reset(x[:5]), x)
    for a in (0.3, -0.6, 0.9):
        x = env.step(np.array([a], np.float32))[0]
        np.testing.assert_array_equal(other.step([a], x[:5]), x)


def test_privileged_vector_is_the_episodes_draws_and_the_clean_observation():
    ranges = {**RANGES, "offset": [-0.2, 0.2], "obs_noise": [0.05, 0.1]}
    env = randomize(CleanObs(make_env(ENV, 0)), ranges, np.random.default_rng(0))
    env.reset(seed=0)
    for _ in range(3):  # the noise scales with a running std: none on the first observation
        noisy = env.step(np.zeros(1, np.float32))[0]
    xi = privileged(env, ranges)
    k, mass = find(env, ActionLatency).k, find(env, Dynamics).values["mass"]
    # sorted knobs: latency, mass, obs_noise, offset (1 action dimension); then 5 observations
    assert xi[0] == pytest.approx(k - 1.0) and xi[1] == pytest.approx(2 * (mass - 0.5) - 1)
    assert -1 <= xi[2] <= 1 and -1 <= xi[3] <= 1
    np.testing.assert_array_equal(xi[4:], find(env, CleanObs).last)
    assert not np.array_equal(xi[4:], noisy)  # the actor sees the noisy one
    nominal = nominal_privileged(ranges, xi[4:], 1)
    assert nominal[1] == pytest.approx(0.0)  # mass 1.0 is the middle of [0.5, 1.5]


def test_widening_starts_at_nominal():
    widening = Widening(0.0)
    env = randomize(make_env(ENV, 0), {"mass": [0.5, 1.5]}, np.random.default_rng(0), widening)
    env.reset(seed=0)
    assert find(env, Dynamics).values["mass"] == 1.0
    widening.scale = 0.5
    draws = []
    for seed in range(20):
        env.reset(seed=seed)
        draws.append(find(env, Dynamics).values["mass"])
    assert 0.75 <= min(draws) < 1.0 < max(draws) <= 1.25


def test_widening_schedule_holds_nominal_then_grows_to_full():
    assert [widening_scale(s, 100, 50) for s in (0, 100, 125, 150, 900)] == [0, 0, 0.5, 1, 1]
    assert [widening_scale(s, 100, 0) for s in (99, 100)] == [0, 1]  # a step to full ranges
    assert widening_scale(0, 0, 0) == 1  # no schedule: full from the first episode
    with pytest.raises(UsageError, match="rand_widen_start widens no rand_"):
        TrainConfig(env_id=ENV, rand_widen_start=100)
    with pytest.raises(UsageError, match="rand_widen_start, rand_widen_steps must be >= 0"):
        cfg(rand_widen_start=-1)
    with pytest.raises(UsageError, match="rand_widen_start=700 >= steps=700"):
        cfg(rand_widen_start=700)


def test_a_run_is_the_nominal_run_until_its_ranges_widen(tmp_path):
    # robust+widening is the nominal run until its ranges widen (FastTD3's two stages): a knob
    # at its nominal value changes no draw, observation, action or seeded stream of the run
    plain = dict(history_obs=0, history_actions=0, privileged_critic=False)
    train(cfg(**plain, rand_mass=[], rand_latency=[]), tmp_path / "nominal", progress=False)
    knobs = dict(rand_friction=[0.5, 1.25], rand_damping=[0.0, 0.1], rand_offset=[-0.1, 0.1],
                 rand_obs_noise=[0.0, 0.05])  # fmt: skip
    knobs.update(rand_widen_start=699, rand_widen_steps=100)
    train(cfg(**plain, **knobs), tmp_path / "widening", progress=False)  # at scale 0 throughout
    assert_same_networks(
        checkpoint.load(tmp_path / "nominal" / "checkpoint.pt")[1].modules(),
        checkpoint.load(tmp_path / "widening" / "checkpoint.pt")[1].modules(),
    )


WIDEN_START, WIDEN_STEPS = 150, 250


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt")
    train(cfg(rand_widen_start=WIDEN_START, rand_widen_steps=WIDEN_STEPS), out, progress=False)
    return out


def test_replay_holds_the_envs_draws(run):
    replay = checkpoint.load(run / "checkpoint.pt")[3]["replay"]
    priv, obs = replay["priv"].numpy(), replay["obs"].numpy()
    np.testing.assert_array_equal(priv[:, 2:], obs[:, :5])  # no sensor noise: clean = seen
    ends = np.flatnonzero(replay["episode_end"].numpy().ravel())
    starts = [0, *(ends + 1)][: len(ends)]
    assert starts[-1] >= WIDEN_START + WIDEN_STEPS  # episodes at full ranges were drawn
    for start, end in zip(starts, ends, strict=True):
        assert len(np.unique(priv[start : end + 1, :2], axis=0)) == 1  # ξ holds for an episode
        # the replay's row is the training step: nominal (latency 0, mass 1) until the widening
        # starts, full ranges (a mass draw is never exactly nominal) once it is done
        if start <= WIDEN_START:
            assert (priv[start, 0], priv[start, 1]) == (-1.0, 0.0)
        if start >= WIDEN_START + WIDEN_STEPS:
            assert priv[start, 1] != 0.0
    latencies = set(np.round(priv[:, 0] + 1).astype(int))  # latency 0..2 mapped to [-1, 1]
    assert latencies <= {0, 1, 2}


def test_the_critic_reads_the_draws_as_drawn_and_the_clean_observation_standardized(run):
    # the draws sit at nominal until the ranges widen: standardized, they would be scaled by
    # 1e4 (clipped to ±10) once they move
    _, agent, _, state = checkpoint.load(run / "checkpoint.pt")
    priv = state["replay"]["priv"][: WIDEN_START + WIDEN_STEPS + 200]
    with torch.no_grad():
        seen = agent.priv_normalizer(priv)
    assert torch.equal(seen[:, :2], priv[:, :2])
    assert priv[:, 1].abs().max() > 0.5  # mass draws far from nominal were seen
    clean = agent.priv_normalizer.scale[2:]
    assert torch.allclose(clean, agent.normalizer.scale[:5])  # clean = seen here (no noise)


def test_the_exported_actor_has_no_privileged_input(run):
    sess = ort.InferenceSession(str(run / "policy.onnx"))
    (inp,) = sess.get_inputs()
    assert (inp.name, inp.shape) == ("obs", ["batch", 5 * 2 + 1 * 3])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["mu.history"]) == {"obs": 1, "actions": 3, "obs_dim": 5}
    assert np.isfinite(evaluate_onnx(str(run / "policy.onnx"), 1).mean_return)


def test_a_late_run_branches_from_the_nominal_run_bit_for_bit(tmp_path):
    # a run whose ranges widen late is its nominal stage until then, generators included: the
    # benchmark trains that stage once and branches each late variant from its checkpoint
    late = cfg(history_obs=0, history_actions=0, privileged_critic=False,
               rand_offset=[-0.1, 0.1], rand_obs_noise=[0.0, 0.05], rand_widen_start=300,
               rand_widen_steps=200)  # fmt: skip
    train(late, tmp_path / "straight", progress=False)
    train(late.nominal_stage(), tmp_path / "nominal", progress=False)  # stops mid-episode
    branch(tmp_path / "nominal", late, tmp_path / "branched", progress=False)
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "branched" / "checkpoint.pt")
    assert_same_networks(a[1].modules(), b[1].modules())
    assert torch.equal(a[3]["replay"]["obs"], b[3]["replay"]["obs"])
    assert [r[:1] + r[2:] for r in a[3]["evals"]] == [r[:1] + r[2:] for r in b[3]["evals"]]
    stage = late.nominal_stage()
    train(cfg(**{**vars(stage), "steps": 700}), tmp_path / "nominal", resume=True, progress=False)
    nominal = checkpoint.load(tmp_path / "nominal" / "checkpoint.pt")[3]["replay"]["obs"]
    assert torch.equal(a[3]["replay"]["obs"][:300], nominal[:300])
    assert not torch.equal(a[3]["replay"]["obs"][:700], nominal[:700])  # then it widened

    with pytest.raises(UsageError, match="batch_size differ"):
        branch(tmp_path / "nominal", cfg(**{**vars(late), "batch_size": 64}), tmp_path / "x")
    with pytest.raises(UsageError, match="past step 300"):
        branch(tmp_path / "nominal", late, tmp_path / "y")
    with pytest.raises(UsageError, match="widen late"):
        cfg(rand_widen_start=300).nominal_stage()  # a privileged critic sees the draws


@pytest.mark.parametrize("algo", ["td3", "td7"])
def test_same_seed_is_bit_identical_and_resumes_exactly(algo, tmp_path):
    extra = {"algo": algo, **({"td7_zs_dim": 8, "td7_target_every": 50} if algo == "td7" else {})}
    extra.update(rand_widen_start=300, rand_widen_steps=300)  # stops while the ranges widen
    train(cfg(**extra), tmp_path / "a", progress=False)
    train(cfg(**extra, steps=433), tmp_path / "b", progress=False)  # stops mid-episode
    train(cfg(**extra), tmp_path / "b", resume=True, progress=False)
    a = checkpoint.load(tmp_path / "a" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "b" / "checkpoint.pt")
    assert "priv_normalizer" in a[1].modules()
    assert_same_networks(a[1].modules(), b[1].modules())
    assert torch.equal(a[3]["replay"]["priv"], b[3]["replay"]["priv"])


def test_finetuning_a_privileged_critic_fills_nominal_draws(run, tmp_path):
    learner = Learner(
        FinetuneConfig(checkpoint=run / "agent.pt", versions_dir=tmp_path / "v", batch_size=32)
    )
    offline = learner.buffer.size
    obs = np.random.default_rng(0).normal(size=(40, 13)).astype(np.float32)
    rows = np.concatenate(
        [obs, np.zeros((40, 1)), np.ones((40, 1)), obs, np.zeros((40, 2))], axis=1
    ).astype(np.float32)
    learner.add(rows)
    priv = learner.buffer.newest(40)["priv"]
    np.testing.assert_array_equal(priv[:, :2], [[-1.0, 0.0]] * 40)  # latency 0 and mass 1.0
    np.testing.assert_array_equal(priv[:, 2:], obs[:, :5])
    assert learner.buffer.size == offline + 40
    losses = learner.step()
    assert np.isfinite(float(losses["critic_loss"]))


def test_grown_inputs_join_at_zero_weight_and_the_run_branches_bit_for_bit(tmp_path):
    # the history and privileged inputs join when the ranges widen: until then the run is the
    # nominal run (its stage); grown, its actor and critics compute what the stage's did
    late = cfg(rand_widen_start=300, rand_widen_steps=200, grow_inputs=True)
    stage = late.nominal_stage()
    assert (stage.history_actions, stage.privileged_critic, stage.grow_inputs) == (0, False, False)
    train(stage, tmp_path / "nominal", progress=False)
    (tmp_path / "grown").mkdir()
    shutil.copy(tmp_path / "nominal" / "checkpoint.pt", tmp_path / "grown")
    _grow(tmp_path / "grown", late)
    _, old, _, before = checkpoint.load(tmp_path / "nominal" / "checkpoint.pt")
    _, new, meta, after = checkpoint.load(tmp_path / "grown" / "checkpoint.pt")
    raw, rows = before["replay"], after["replay"]
    assert meta["history"] == {"obs": 1, "actions": 3, "obs_dim": 5} and meta["priv_dim"] == 7
    assert torch.equal(rows["obs"][:, :5], raw["obs"]) and rows["obs"].shape[1] == 13
    # each next input is the next step's input within an episode; its newest action the stored
    # one, as the env received it
    inside = ~rows["episode_end"][:-1, 0].bool()
    assert torch.equal(rows["next_obs"][:-1][inside], rows["obs"][1:][inside])
    sent = to_env_units(raw["action"].numpy(), np.float32([-1]), np.float32([1]))
    np.testing.assert_array_equal(rows["next_obs"][:, 10:11].numpy(), sent)
    clean = nominal_privileged(late.randomization, raw["obs"][7].numpy(), 1)
    np.testing.assert_array_equal(rows["priv"][7].numpy(), clean)
    with torch.no_grad():
        mu_old = old.actor(old.normalizer(raw["obs"]))
        mu_new = new.actor(new.normalizer(rows["obs"]))
        q_old = old.critic(old.normalizer(raw["obs"]), raw["action"])
        c = critic_obs(new.priv_normalizer, new.normalizer(rows["obs"]), rows["priv"])
        q_new = new.critic(c, raw["action"])
    assert (mu_old - mu_new).abs().max() < 1e-5 and (q_old - q_new).abs().max() < 1e-4
    assert torch.equal(c[:, 13:15], rows["priv"][:, :2])  # the draws pass through as they are
    assert mu_old.std() > 0.01 and q_old.std() > 0.01  # trained networks, not constants
    # Adam steps the new weights at the size it steps their row's others
    first = new.actor_opt.state_dict()["state"][0]
    assert not first["exp_avg"][:, 5:].any()
    row_mean = old.actor_opt.state_dict()["state"][0]["exp_avg_sq"].mean(1)
    assert torch.allclose(first["exp_avg_sq"][:, 12], row_mean)

    # straight, branched from a shorter stage (it trains on to 300, grows, goes on) or resumed:
    # the same run
    train(late, tmp_path / "straight", progress=False)
    short = dataclasses.replace(stage, steps=200)
    train(short, tmp_path / "short", progress=False)
    branch(tmp_path / "short", late, tmp_path / "branched", progress=False)
    train(dataclasses.replace(late, steps=500), tmp_path / "resumed", progress=False)
    train(late, tmp_path / "resumed", resume=True, progress=False)  # resumed once grown
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    for other in ("branched", "resumed"):
        b = checkpoint.load(tmp_path / other / "checkpoint.pt")
        assert_same_networks(a[1].modules(), b[1].modules())
        assert torch.equal(a[3]["replay"]["obs"], b[3]["replay"]["obs"])
    assert TrainConfig.load(tmp_path / "straight" / "config.json") == late
    sess = ort.InferenceSession(str(tmp_path / "straight" / "policy.onnx"))
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("obs", ["batch", 13])]


def test_grown_inputs_need_inputs_to_grow_and_a_widening():
    with pytest.raises(UsageError, match="grow_inputs needs"):
        cfg(grow_inputs=True)  # no rand_widen_start
    with pytest.raises(UsageError, match="grow_inputs needs"):
        cfg(history_obs=0, history_actions=0, privileged_critic=False, rand_widen_start=300,
            grow_inputs=True)  # fmt: skip
    with pytest.raises(UsageError, match="td7's encoders"):
        cfg(algo="td7", rand_widen_start=300, grow_inputs=True)


def test_with_ranges_that_widen_only_actors_trained_on_the_full_ranges_are_exported(tmp_path):
    late = cfg(rand_widen_start=300, rand_widen_steps=200)
    run = Run(late, tmp_path, None)
    run._consider(run.agent, "current", 450, EvalResult(1000.0, 0.0, None))  # scale 0.75
    assert run.best is None  # the best at nominal dynamics, but not yet on the full ranges
    run._consider(run.agent, "current", 500, EvalResult(10.0, 0.0, None))
    assert run.best["step"] == 500
    # a best from before, as a checkpoint branched from a nominal run (or a grown run's stage)
    # brings it, does not compete either
    run.best = snapshot(run.agent, "current", 200, 1000.0, None)
    assert run._best() is None
    run._consider(run.agent, "current", 550, EvalResult(10.0, 0.0, None))
    assert run.best["step"] == 550 and run._best() is run.best
