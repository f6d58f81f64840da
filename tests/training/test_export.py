"""The policy file: ONNX contract of docs/contract.md, parity with torch, refusal on mismatch."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from controller.contract import FORMAT_TAG
from training import checkpoint, export, td7
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


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def onnx_actions(data: bytes, obs: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(
        ["action"], {"obs": obs}
    )[0]


@pytest.fixture
def full_exports(monkeypatch) -> list[torch.nn.Module]:
    """The networks that went through torch.onnx.export (a spy around export._export)."""
    seen: list[torch.nn.Module] = []
    full = export._export

    def spy(policy, obs_dim):
        seen.append(policy)
        return full(policy, obs_dim)

    monkeypatch.setattr(export, "_export", spy)
    return seen


def test_a_reused_graph_is_a_full_export_of_the_new_weights(tmp_path, full_exports):
    """The second export fills the first one's graph: every tensor of the network differs from
    the first's (actor, normalizer, and action bounds, hence act_scale and act_bias), so a
    tensor left stale, swapped with another of its shape or put under the wrong name shows
    in the initializers and in the actions, which must be a full export's, bit for bit."""
    cfg, first, meta = make_agent(seed=0)
    _, second, _ = make_agent(seed=1)
    meta2 = {**meta, "action_low": [-1.0, -0.5, 0.0], "action_high": [3.0, 1.0, 0.25],
             "train_steps": 456}  # fmt: skip
    replay = np.random.default_rng(0).normal(0.5, 2, (1000, 12)).astype(np.float32)
    exporter = export.Exporter()
    export.export_policy(first, meta, cfg, tmp_path / "a.onnx", replay, exporter=exporter)
    export.export_policy(second, meta2, cfg, tmp_path / "b.onnx", replay, exporter=exporter)
    assert len(full_exports) == 1 and (exporter.full_exports, exporter.reused) == (1, 1)

    policy = second.policy(meta2["action_low"], meta2["action_high"])
    full = export.to_onnx(policy, 12, {})
    reused = (tmp_path / "b.onnx").read_bytes()
    weights = initializers(onnx.ModelProto.FromString(full))
    got = initializers(onnx.load(tmp_path / "b.onnx"))
    assert got.keys() == weights.keys()
    for name, array in weights.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
    state = policy.state_dict()
    for name in ["actor.net.0.weight", "actor.net.2.bias", "normalizer.shift", "act_scale"]:
        np.testing.assert_array_equal(got[name], state[name].numpy(), err_msg=name)
    obs = np.random.default_rng(3).normal(0.5, 5, (500, 12)).astype(np.float32)
    want = onnx_actions(full, obs)
    assert np.max(np.abs(onnx_actions(reused, obs) - want)) <= 1e-6
    assert np.max(np.abs(onnx_actions((tmp_path / "a.onnx").read_bytes(), obs) - want)) > 1e-2
    props = {p.key: p.value for p in onnx.load(tmp_path / "b.onnx").metadata_props}
    assert props["mu.train_steps"] == "456"
    assert json.loads(props["mu.action_high"]) == meta2["action_high"]
    assert set(KEYS) <= set(props)


def test_a_template_fits_only_its_architecture_and_settings(tmp_path, full_exports):
    cfg, agent, meta = make_agent()
    low, high = meta["action_low"], meta["action_high"]
    policy = agent.policy(low, high)
    program = export._export(policy, 12)
    model = program.model_proto
    template = export.OnnxTemplate.of(program, model, policy, 12)
    unused = {"normalizer.count", "normalizer.mean", "normalizer.m2"}  # the running statistics
    assert template is not None and set(template.slots) == set(policy.state_dict()) - unused
    # a graph in which a tensor the network computes with has no initializer of its name, or
    # one of another shape, is no template
    for edit in ("name", "shape"):
        broken = onnx.ModelProto.FromString(model.SerializeToString())
        (b,) = [t for t in broken.graph.initializer if t.name == "actor.net.2.bias"]
        if edit == "name":
            b.name = "renamed"
        else:
            b.dims[0] += 1
        assert export.OnnxTemplate.of(program, broken, policy, 12) is None, edit

    assert template.fill(make_agent(seed=1)[1].policy(low, high), 12) is not None
    wider = Agent.create(TrainConfig(actor_hidden=[32, 48], critic_hidden=[32]), 12, 3)
    clipped, unnormalized, doubled, with_tensor = (
        make_agent(seed=1)[1].policy(low, high) for _ in range(4)
    )
    clipped.normalizer.clip = 0.5  # a constant of the graph, not a tensor
    unnormalized.normalizer.enabled = False
    doubled.double()
    with_tensor.actor.offset = torch.ones(3)  # a plain tensor attribute: a graph constant
    for misfit in [wider.policy(low, high), clipped, unnormalized, doubled, with_tensor]:
        assert template.fill(misfit, 12) is None
    assert template.fill(policy, 13) is None

    # export_policy exports a misfit in full, and its graph becomes the template
    exporter = export.Exporter()
    exporter.template = template
    replay = np.random.default_rng(0).normal(0.5, 2, (1000, 12)).astype(np.float32)
    path = tmp_path / "wider.onnx"
    export.export_policy(wider, meta, cfg, path, replay, exporter=exporter)
    assert len(full_exports) == 2 and (exporter.full_exports, exporter.reused) == (1, 0)
    assert exporter.template is not None and exporter.template.fill(wider.policy(low, high), 12)
    obs = np.random.default_rng(1).normal(0.5, 5, (200, 12)).astype(np.float32)
    want = wider.policy(low, high)(torch.from_numpy(obs)).detach().numpy()
    np.testing.assert_allclose(onnx_actions(path.read_bytes(), obs), want, atol=1e-5)


def test_a_reused_graph_that_fails_parity_is_exported_in_full(tmp_path, full_exports, monkeypatch):
    """A wrong fill (a weight nudged by 1e-3) is caught by the parity check and never written:
    the file is a full export, and the exporter stops reusing graphs."""
    cfg, agent, meta = make_agent()
    replay = np.random.default_rng(0).normal(0.5, 2, (1000, 12)).astype(np.float32)
    exporter = export.Exporter()
    export.export_policy(agent, meta, cfg, tmp_path / "a.onnx", replay, exporter=exporter)
    fill = export.OnnxTemplate.fill

    def nudged(self, policy, obs_dim):
        model = fill(self, policy, obs_dim)
        (w,) = [t for t in model.graph.initializer if t.name == "actor.net.0.weight"]
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + 1e-3, w.name))
        return model

    monkeypatch.setattr(export.OnnxTemplate, "fill", nudged)
    path = tmp_path / "b.onnx"
    export.export_policy(agent, meta, cfg, path, replay, exporter=exporter)
    assert len(full_exports) == 2 and not exporter.reuse and exporter.template is None
    written = initializers(onnx.load(path))["actor.net.0.weight"]
    np.testing.assert_array_equal(written, agent.actor.net[0].weight.detach().numpy())


def test_a_td7_graph_with_its_encoder_is_reused(tmp_path, full_exports):
    cfg = TrainConfig(algo="td7", actor_hidden=[16, 16], critic_hidden=[16], td7_zs_dim=8)
    meta = make_agent()[2]
    replay = np.random.default_rng(0).normal(0.5, 2, (1000, 12)).astype(np.float32)
    exporter = export.Exporter()
    agents = []
    for seed, path in [(0, tmp_path / "a.onnx"), (1, tmp_path / "b.onnx")]:
        torch.manual_seed(seed)
        agents.append(td7.Agent.create(cfg, 12, 3))
        export.export_policy(agents[-1], meta, cfg, path, replay, exporter=exporter)
    assert len(full_exports) == 1 and exporter.reused == 1
    policy = agents[1].policy(meta["action_low"], meta["action_high"])
    obs = np.random.default_rng(3).normal(0.5, 5, (500, 12)).astype(np.float32)
    want = onnx_actions(export.to_onnx(policy, 12, {}), obs)
    assert np.max(np.abs(onnx_actions((tmp_path / "b.onnx").read_bytes(), obs) - want)) <= 1e-6
