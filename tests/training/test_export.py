"""The policy file: ONNX contract of docs/contract.md, parity with torch, refusal on mismatch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from controller.contract import FORMAT_TAG
from training import checkpoint, export
from training.config import TrainConfig
from training.envs import make_env
from training.td3 import Agent

KEYS = [
    "mu.format", "mu.env_id", "mu.obs_dim", "mu.act_dim", "mu.action_low", "mu.action_high",
    "mu.obs_layout", "mu.algo", "mu.train_steps", "mu.eval_return", "mu.created_utc",
]  # fmt: skip


def make_agent(obs_dim=12, act_dim=3, seed=0):
    torch.manual_seed(seed)
    cfg = TrainConfig(env_id="PandaReachDense-v3", actor_hidden=[32, 32], critic_hidden=[32])
    agent = Agent.create(cfg, obs_dim, act_dim)
    agent.normalizer.update(torch.randn(500, obs_dim) * 2 + 0.5)
    meta = {
        "env_id": "PandaReachDense-v3",
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "obs_layout": [["achieved_goal", 3], ["desired_goal", 3], ["observation", 6]],
        "action_low": [-2.0, -1.0, 0.0],  # asymmetric bounds exercise scale and bias
        "action_high": [2.0, 1.0, 0.5],
        "train_steps": 123,
        "eval_return": -1.5,
    }
    return cfg, agent, meta


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg, agent, meta = make_agent()
    path = tmp_path_factory.mktemp("export") / "policy.onnx"
    replay = np.random.default_rng(0).normal(0.5, 2, (1000, 12)).astype(np.float32)
    export.export_policy(agent, meta, cfg, path, replay_obs=replay)
    return path, agent, meta


def test_contract_io_metadata_and_opset(exported):
    path, _, meta = exported
    model = onnx.load(path)
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "obs" and out.name == "action"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    props = {p.key: p.value for p in model.metadata_props}
    assert set(KEYS) <= set(props)
    assert props["mu.format"] == FORMAT_TAG
    assert json.loads(props["mu.obs_layout"]) == meta["obs_layout"]
    assert json.loads(props["mu.action_low"]) == meta["action_low"]
    assert (props["mu.obs_dim"], props["mu.act_dim"], props["mu.algo"]) == ("12", "3", "td3")
    assert json.loads(props["mu.eval_return"]) == -1.5


def test_onnx_matches_torch_and_stays_in_bounds(exported):
    path, agent, meta = exported
    sess = ort.InferenceSession(str(path))
    obs = np.random.default_rng(1).normal(0, 50, (257, 12)).astype(np.float32)  # far out too
    got = sess.run(["action"], {"obs": obs})[0]
    want = (
        agent.policy(meta["action_low"], meta["action_high"])(torch.from_numpy(obs))
        .detach()
        .numpy()
    )
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(got >= np.array(meta["action_low"]) - 1e-6)
    assert np.all(got <= np.array(meta["action_high"]) + 1e-6)
    # normalization is inside the graph: raw observations, not normalized ones, go in
    assert not np.allclose(sess.run(["action"], {"obs": obs[:1] * 0})[0], got[:1])


def test_batch_of_one_and_many(exported):
    sess = ort.InferenceSession(str(exported[0]))
    obs = np.random.default_rng(2).normal(size=(64, 12)).astype(np.float32)
    batched = sess.run(["action"], {"obs": obs})[0]
    single = np.concatenate([sess.run(["action"], {"obs": o[None]})[0] for o in obs])
    np.testing.assert_allclose(batched, single, atol=1e-6)


def test_export_refuses_when_parity_fails(tmp_path, monkeypatch):
    """One weight of the written graph nudged by 1e-3: the real 1e-5 tolerance refuses it."""
    cfg, agent, meta = make_agent()
    to_onnx = export.to_onnx

    def nudged(policy, obs_dim, props):
        model = onnx.ModelProto.FromString(to_onnx(policy, obs_dim, props))
        (w,) = [t for t in model.graph.initializer if t.name == "actor.net.0.weight"]
        array = numpy_helper.to_array(w).copy()
        array[0, 0] += 1e-3
        w.CopyFrom(numpy_helper.from_array(array, w.name))
        return model.SerializeToString()

    monkeypatch.setattr(export, "to_onnx", nudged)
    assert export.PARITY_TOL == 1e-5
    path = tmp_path / "policy.onnx"
    with pytest.raises(export.ParityError, match="not writing"):
        export.export_policy(agent, meta, cfg, path, replay_obs=np.zeros((10, 12), np.float32))
    assert not path.exists()


def test_export_from_agent_file_rolls_out_for_parity(tmp_path, monkeypatch):
    """`mu export` on an agent file (no replay buffer) still checks parity, on states the
    policy visits in the real env."""
    cfg, agent, meta = make_agent(obs_dim=12, act_dim=3)
    meta = {**meta, "action_low": [-1.0] * 3, "action_high": [1.0] * 3}
    checkpoint.save(tmp_path / "agent.pt", cfg, agent, meta)
    # spies around the real functions: which states were rolled out, which ones were compared
    rolled: list[np.ndarray] = []
    probed: list[np.ndarray] = []
    rollout, parity = export.rollout_observations, export.parity_error

    def rollout_spy(*args, **kwargs):
        rolled.append(rollout(*args, **kwargs))
        return rolled[-1]

    def parity_spy(policy, onnx_bytes, obs):
        probed.append(np.asarray(obs))
        return parity(policy, onnx_bytes, obs)

    monkeypatch.setattr(export, "rollout_observations", rollout_spy)
    monkeypatch.setattr(export, "parity_error", parity_spy)
    out = export.export_checkpoint(tmp_path / "agent.pt", tmp_path / "p.onnx")
    assert (
        ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["mu.env_id"]
        == meta["env_id"]
    )
    (states,), (probes,) = rolled, probed
    assert states.shape == (export.PARITY_SAMPLES, 12)
    # the rollout is in the real env: it starts where PandaReach resets with that seed ...
    env = make_env(meta["env_id"], 0)
    first, _ = env.reset(seed=0)
    env.close()
    np.testing.assert_array_equal(states[0], first)
    assert len(np.unique(states, axis=0)) > 100  # ... and moves on from there
    # parity was checked on those states, plus as many random ones around them
    np.testing.assert_array_equal(probes[: len(states)], states)
    assert len(probes) == 2 * export.PARITY_SAMPLES


class _Cancelling(torch.nn.Module):
    """A network whose float32 arithmetic is coarse: (1e4 x + 0.1) - 1e4 x - 0.1 is 0 exactly,
    but float32 rounds the large terms (the way deep ELU / AvgL1Norm stacks lose digits)."""

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        big = 1e4 * obs[:, :1]
        return torch.tanh((big + 0.1) - big - 0.1 + obs[:, 1:2] / 10)


def test_parity_tolerance_follows_the_networks_own_float32_rounding() -> None:
    obs = np.random.default_rng(0).uniform(-3, 3, (500, 4)).astype(np.float32)
    cfg, agent, meta = make_agent(obs_dim=4, act_dim=3)
    conditioned = agent.policy(meta["action_low"], meta["action_high"])
    data = export.to_onnx(conditioned, 4, {})
    err, tol = export.parity_error(conditioned, data, obs)
    assert err <= tol == export.PARITY_TOL  # a well-conditioned net keeps the 1e-5 bar
    coarse = _Cancelling()
    err, tol = export.parity_error(coarse, export.to_onnx(coarse, 4, {}), obs)
    assert tol > 10 * export.PARITY_TOL and err <= tol  # the bar is float32's, not tighter
