"""The control RPCs against a real server: correct actions, streaming, batch, bad input."""

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

RNG = np.random.default_rng(7)
OBS = RNG.normal(0, 2, (16, 26)).astype(np.float32)


def _expected(path: Path, obs: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["action"], {"obs": obs})[0]


def _assert_serving(stub: pb_grpc.ControllerStub) -> None:
    reply = stub.Act(pb.ActRequest(obs=[0.0] * 26, seq=99), timeout=5)
    assert len(reply.action) == 6 and reply.seq == 99


def test_act_equals_onnxruntime(connected, policy_path: Path) -> None:
    expected = _expected(policy_path, OBS)
    for i, row in enumerate(OBS):
        reply = connected.stub.Act(pb.ActRequest(obs=row.tolist(), seq=i), timeout=5)
        assert reply.seq == i and reply.policy_version == 1
        np.testing.assert_allclose(reply.action, expected[i], atol=1e-6)


def test_unix_socket(server_factory, policy_path: Path, tmp_path: Path) -> None:
    server = server_factory(policy_path, listen=f"unix:{tmp_path / 'mu.sock'}")
    assert server.target == f"unix:{tmp_path / 'mu.sock'}" and server.port == 0
    with grpc.insecure_channel(server.target) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        reply = pb_grpc.ControllerStub(channel).Act(pb.ActRequest(obs=OBS[0].tolist()), timeout=5)
    np.testing.assert_allclose(reply.action, _expected(policy_path, OBS[:1])[0], atol=1e-6)


def test_stream_is_lock_step_and_correct(connected, policy_path: Path) -> None:
    expected = _expected(policy_path, OBS)
    requests = (pb.ActRequest(obs=row.tolist(), seq=100 + i) for i, row in enumerate(OBS))
    replies = list(connected.stub.ActStream(requests, timeout=10))
    assert [r.seq for r in replies] == [100 + i for i in range(len(OBS))]
    np.testing.assert_allclose([list(r.action) for r in replies], expected, atol=1e-6)


def test_batch(connected, policy_path: Path) -> None:
    request = pb.ActBatchRequest(obs=OBS.ravel().tolist(), batch_size=len(OBS), seq=5)
    reply = connected.stub.ActBatch(request, timeout=5)
    assert (reply.batch_size, reply.act_dim, reply.seq, reply.policy_version) == (16, 6, 5, 1)
    actions = np.asarray(reply.actions).reshape(16, 6)
    np.testing.assert_allclose(actions, _expected(policy_path, OBS), atol=1e-6)


def test_get_policy(connected) -> None:
    info = connected.stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
    assert (info.version, info.env_id, info.obs_dim, info.act_dim) == (1, "TestEnv-v0", 26, 6)
    assert list(info.action_low) == [-1.0, -2.0, -0.5, -1.0, 0.0, -3.0]
    assert [(f.name, f.size) for f in info.obs_layout] == [("observation", 20), ("goal", 6)]
    assert info.algo == "td3" and info.train_steps == 1000 and info.eval_return == 12.5
    assert info.loaded_at.seconds > 0 and len(info.sha256) == 64 and info.previous_version == 0
    assert info.metadata["mu.format"] == "mu.policy.v1"


BAD_ACTS = [
    ([0.0] * 25, "observation has 25 values; the policy expects 26"),
    ([], "observation is empty"),
    ([float("nan")] + [0.0] * 25, "NaN or infinite values at indices [0]"),
    ([0.0] * 25 + [float("-inf")], "NaN or infinite values at indices [25]"),
]


@pytest.mark.parametrize(("obs", "message"), BAD_ACTS)
def test_bad_act_is_invalid_argument(connected, obs, message: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.Act(pb.ActRequest(obs=obs), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    _assert_serving(connected.stub)


@pytest.mark.parametrize(
    ("obs", "batch_size", "message"),
    [
        ([0.0] * 51, 2, "batch has 51 values; 2 observations of 26 need 52"),
        ([], 0, "batch_size must be at least 1"),
        ([0.0] * 30 + [float("nan")] + [0.0] * 21, 2, "observations [1] contain NaN"),
    ],
)
def test_bad_batch_is_invalid_argument(connected, obs, batch_size: int, message: str) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.ActBatch(pb.ActBatchRequest(obs=obs, batch_size=batch_size), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in refused.value.details()
    _assert_serving(connected.stub)


def test_stream_reports_bad_requests_in_band_and_continues(connected) -> None:
    obs = [[0.0] * 26] + [o for o, _ in BAD_ACTS] + [[0.0] * 26]
    requests = (pb.ActRequest(obs=o, seq=i) for i, o in enumerate(obs))
    replies = list(connected.stub.ActStream(requests, timeout=10))
    assert [r.seq for r in replies] == list(range(len(obs)))
    assert not replies[0].HasField("error") and not replies[-1].HasField("error")
    for reply, (_, message) in zip(replies[1:-1], BAD_ACTS, strict=True):
        assert reply.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert message in reply.error.message
        assert len(reply.action) == 0 and reply.policy_version == 1
    np.testing.assert_array_equal(replies[0].action, replies[-1].action)


def test_oversized_message_is_resource_exhausted(server_factory, policy_path: Path) -> None:
    server = server_factory(policy_path, max_message_bytes=4096)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Act(pb.ActRequest(obs=[0.0] * 2000), timeout=5)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _assert_serving(stub)


def test_nan_from_the_model_never_leaves_the_server(server_factory, nan_policy: Path) -> None:
    server = server_factory(nan_policy)
    poison = [101.0] + [0.0] * 25
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Act(pb.ActRequest(obs=poison), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as refused:
            stub.ActBatch(pb.ActBatchRequest(obs=[0.0] * 26 + poison, batch_size=2), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INTERNAL
        assert "observations [1]" in refused.value.details()
        requests = [pb.ActRequest(obs=poison, seq=1), pb.ActRequest(obs=[0.0] * 26, seq=2)]
        first, second = stub.ActStream(iter(requests), timeout=10)
        assert first.error.code == grpc.StatusCode.INTERNAL.value[0] and not first.action
        assert np.isfinite(second.action).all() and len(second.action) == 6


def test_stream_slew_limit(server_factory, policy_path: Path) -> None:
    server = server_factory(policy_path, max_delta=0.05)
    rng = np.random.default_rng(3)
    obs = rng.normal(0, 3, (30, 26))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        requests = (pb.ActRequest(obs=o.tolist(), seq=i) for i, o in enumerate(obs))
        actions = np.array([list(r.action) for r in stub.ActStream(requests, timeout=10)])
        assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).max_delta == pytest.approx(0.05)
    steps = np.abs(np.diff(actions, axis=0))
    assert steps.max() <= 0.05 + 1e-6
    assert (steps > 0.05 - 1e-6).any()  # the limit was actually needed
    assert (actions >= server.policy.low).all() and (actions <= server.policy.high).all()
