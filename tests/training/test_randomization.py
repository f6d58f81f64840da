"""Domain randomization on real PyBullet envs: values read back from the simulator."""

import json

import gymnasium as gym
import numpy as np
import onnx
import pytest
import torch

from controller.cli import main
from training import checkpoint
from training.config import TrainConfig
from training.envs import make_env
from training.evaluate import shifted_env
from training.presets import preset
from training.randomization import (
    ActionLatency,
    ActionOffset,
    Dynamics,
    Pushes,
    find,
    randomize,
)
from training.trainer import train

CHEETAH = "HalfCheetahBulletEnv-v0"
PANDA = "PandaReachDense-v3"
BUNDLED = "policies/panda_reach/policy.onnx"


def links(env: gym.Env) -> tuple:
    robot = env.unwrapped.robot
    p = env.unwrapped._p
    return p, [(b, k) for b in robot.objects for k in range(-1, p.getNumJoints(b))]


def test_resets_resample_from_nominal_without_compounding():
    reference = make_env(CHEETAH, 0)  # an untouched twin: the nominal values
    p0, ref_links = links(reference)
    nominal_mass = [p0.getDynamicsInfo(b, k)[0] for b, k in ref_links]
    nominal_friction = [p0.getDynamicsInfo(b, k)[1] for b, k in ref_links]
    nominal_power = reference.unwrapped.robot.power

    ranges = {"mass": [0.5, 1.5], "friction": [0.25, 2.0], "strength": [0.4, 1.4]}
    env = randomize(make_env(CHEETAH, 0), ranges, np.random.default_rng(0))
    dynamics = find(env, Dynamics)
    p, env_links = links(env)
    draws = set()
    for i in range(100):
        env.reset(seed=i)
        v = dynamics.values
        draws.add(round(v["mass"], 6))
        mass = [p.getDynamicsInfo(b, k)[0] for b, k in env_links]
        friction = [p.getDynamicsInfo(b, k)[1] for b, k in env_links]
        np.testing.assert_allclose(mass, np.multiply(nominal_mass, v["mass"]), rtol=1e-6)
        np.testing.assert_allclose(
            friction, np.multiply(nominal_friction, v["friction"]), rtol=1e-6
        )
        assert env.unwrapped.robot.power == pytest.approx(nominal_power * v["strength"])
    assert len(draws) == 100  # really redrawn each episode


def test_latency_fifo_delays_by_exactly_k_steps():
    sent, applied = [], []

    class Record(gym.Wrapper):  # sits between the FIFO and the env: what the env receives
        def step(self, action):
            applied.append(np.array(action))
            return self.env.step(action)

    k = 3
    env = ActionLatency(Record(make_env(PANDA, 0)), (k, k), np.random.default_rng(0))
    env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(12):
        a = rng.uniform(-1, 1, 3).astype(np.float32)
        sent.append(a)
        env.step(a)
    assert all(np.array_equal(a, np.zeros(3)) for a in applied[:k])  # bounds' midpoint
    for t in range(k, 12):
        np.testing.assert_array_equal(applied[t], sent[t - k])


def test_unsupported_knob_is_a_clear_error():
    with pytest.raises(ValueError, match="InvertedPendulumBulletEnv-v0 cannot honour.*strength"):
        randomize(make_env("InvertedPendulumBulletEnv-v0", 0), {"strength": [0.8, 1.2]}, None)
    with pytest.raises(ValueError, match="PandaReachDense-v3 cannot honour.*push"):
        randomize(make_env(PANDA, 0), {"push": [0.0, 1.0]}, None)
    with pytest.raises(ValueError, match="unknown randomization knob 'gravity'"):
        randomize(make_env(PANDA, 0), {"gravity": [1, 2]}, None)
    with pytest.raises(ValueError, match="rand_latency expects a list of int"):
        TrainConfig(rand_latency=[0, 1.5])
    with pytest.raises(ValueError, match="mass: multipliers must be > 0"):
        TrainConfig(rand_mass=[0, 1])


def test_robust_preset():
    robust = preset(PANDA, "robust")
    assert robust["rand_strength"] == [0.5, 1.2] and robust["gamma"] == 0.95
    with pytest.raises(ValueError, match="no robust preset for InvertedPendulumBulletEnv-v0"):
        preset("InvertedPendulumBulletEnv-v0", "robust")


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        env_id="InvertedPendulumBulletEnv-v0",
        steps=900,
        learning_starts=300,
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32],
        eval_every=450,
        eval_episodes=1,
        checkpoint_every=300,
        rand_friction=[0.5, 1.25],
        rand_mass=[0.8, 1.2],
        rand_damping=[0.0, 0.1],
        rand_latency=[0, 2],
        rand_offset=[-0.1, 0.1],
        rand_obs_noise=[0.0, 0.1],
    )
    return TrainConfig(**{**base, **kw})


def weights(run) -> dict:
    _, agent, _, _ = checkpoint.load(run / "agent.pt")
    return {
        f"{m}.{k}": v for m, mod in agent.modules().items() for k, v in mod.state_dict().items()
    }


def test_randomized_training_is_same_seed_bit_identical_and_resumes_exactly(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(small_cfg(), a, progress=False)
    train(small_cfg(), b, progress=False)
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    nominal = tmp_path / "n"
    off = {f"rand_{k}": [] for k in small_cfg().randomization}
    train(small_cfg(**off), nominal, progress=False)
    assert not all(torch.equal(wa[k], v) for k, v in weights(nominal).items())

    train(small_cfg(steps=600), c, progress=False)  # stop, then continue to 900
    train(small_cfg(), c, resume=True, progress=False)
    wc = weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    props = {p.key: p.value for p in onnx.load(str(a / "policy.onnx")).metadata_props}
    assert json.loads(props["mu.randomization"]) == small_cfg().randomization


def test_eval_shift_sets_the_quantity_it_names():
    p0, ref_links = links(make_env(CHEETAH, 0))
    nominal_friction = [p0.getDynamicsInfo(b, k)[1] for b, k in ref_links]
    nominal_mass = [p0.getDynamicsInfo(b, k)[0] for b, k in ref_links]
    shifts = {"friction": 0.5, "mass": 1.3, "strength": 0.7, "latency": 2, "offset": 0.2}
    env = shifted_env(CHEETAH, 0, shifts)
    env.reset(seed=0)
    p, env_links = links(env)
    np.testing.assert_allclose(
        [p.getDynamicsInfo(b, k)[1] for b, k in env_links], np.multiply(nominal_friction, 0.5)
    )
    np.testing.assert_allclose(
        [p.getDynamicsInfo(b, k)[0] for b, k in env_links], np.multiply(nominal_mass, 1.3)
    )
    assert env.unwrapped.robot.power == pytest.approx(0.9 * 0.7)
    assert find(env, ActionLatency).k == 2
    np.testing.assert_allclose(find(env, ActionOffset).bias, 0.2)


def test_eval_cli_shift_and_sweep(tmp_path, capsys):
    assert main(["eval", BUNDLED, "--episodes", "2"]) == 0
    assert main(["eval", BUNDLED, "--episodes", "2", "--shift", "strength=0.4"]) == 0
    nominal, weak = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert weak["shifts"] == {"strength": 0.4}
    assert weak["mean_return"] < nominal["mean_return"]  # a weaker motor reaches more slowly
    assert main(["eval", BUNDLED, "--shift", "friction"]) == 2
    assert "expected KNOB=NUMBER" in capsys.readouterr().err

    out = tmp_path / "sweep"
    args = ["eval", BUNDLED, BUNDLED, "--sweep", "--episodes", "1", "--out", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    assert (out / "sweep.png").stat().st_size > 0
    for knob in ["friction", "mass", "strength", "damping", "latency", "offset", "obs_noise"]:
        assert len(result["sweeps"][knob]) >= 7
        assert f"| {knob} |" in text
    assert "push" not in result["sweeps"]  # the arm cannot be pushed
    assert [list(h) for h in result["heatmaps"]] == [["friction", "mass"], ["strength", "offset"]]
    same = [c["returns"][0] == c["returns"][1] for c in result["cells"]]
    assert all(same)  # one policy twice: every cell meets the same seeds and draws


def test_pushes_move_the_robot():
    def run(ranges):
        env = randomize(make_env(CHEETAH, 0), ranges, np.random.default_rng(0))
        obs, _ = env.reset(seed=0)
        for _ in range(300):
            obs, *_ = env.step(np.zeros(6, np.float32))
        return env, obs

    env, pushed = run({"push": [2.0, 2.0]})
    _, still = run({})
    assert find(env, Pushes).pushes > 0
    assert not np.allclose(pushed, still)


def test_bundled_robust_policy_records_its_randomization():
    bundle = "policies/panda_reach_robust"
    props = {p.key: p.value for p in onnx.load(f"{bundle}/policy.onnx").metadata_props}
    saved = TrainConfig.load(f"{bundle}/config.json")
    assert json.loads(props["mu.randomization"]) == saved.randomization != {}
    cfg, _, meta, _ = checkpoint.load(f"{bundle}/agent.pt")  # what fine-tuning starts from
    assert cfg.randomization == saved.randomization and meta["export_rule"] == "best"
