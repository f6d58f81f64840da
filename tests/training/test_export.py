"""The policy file: ONNX contract of DESIGN.md, parity with torch, refusal on mismatch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from training import checkpoint, export
from training.config import TrainConfig
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
    assert props["mu.format"] == export.FORMAT
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
    cfg, agent, meta = make_agent()
    monkeypatch.setattr(export, "PARITY_TOL", -1.0)  # no file can pass a negative tolerance
    path = tmp_path / "policy.onnx"
    with pytest.raises(export.ParityError, match="not writing"):
        export.export_policy(agent, meta, cfg, path, replay_obs=np.zeros((10, 12), np.float32))
    assert not path.exists()


def test_export_from_agent_file_rolls_out_for_parity(tmp_path):
    """`mu export` on an agent file (no replay buffer) still checks parity, on states the
    policy visits in the real env."""
    cfg, agent, meta = make_agent(obs_dim=12, act_dim=3)
    meta = {**meta, "action_low": [-1.0] * 3, "action_high": [1.0] * 3}
    checkpoint.save(tmp_path / "agent.pt", cfg, agent, meta)
    out = export.export_checkpoint(tmp_path / "agent.pt", tmp_path / "p.onnx")
    assert (
        ort.InferenceSession(str(out)).get_modelmeta().custom_metadata_map["mu.env_id"]
        == meta["env_id"]
    )
