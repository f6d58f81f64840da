"""PolicyClient against real servers: actions, fallback on missed deadlines, reconnection, admin."""

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.proto import controller_pb2 as pb
from controller.robot.client import ActRefused, PolicyClient

OBS = np.random.default_rng(11).normal(0, 2, (8, 26)).astype(np.float32)


def _expected(path: Path) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["action"], {"obs": OBS})[0]


@pytest.mark.parametrize("stream", [True, False])
def test_act_matches_the_policy(connected, policy_path: Path, stream: bool) -> None:
    expected = _expected(policy_path)
    with PolicyClient(connected.server.target, deadline_s=5, stream=stream) as client:
        for row, want in zip(OBS, expected, strict=True):
            np.testing.assert_allclose(client.act(row), want, atol=1e-6)
        np.testing.assert_allclose(client.act_batch(OBS), expected, atol=1e-6)
        assert client.misses == 0
        assert client.get_policy().obs_dim == 26


@pytest.mark.parametrize("stream", [True, False])
def test_invalid_observation_raises(connected, stream: bool) -> None:
    with PolicyClient(connected.server.target, deadline_s=5, stream=stream) as client:
        with pytest.raises(ActRefused, match="observation has 25 values; the policy expects 26"):
            client.act([0.0] * 25)
        assert client.act([0.0] * 26).shape == (6,)  # the stream survived
        assert client.misses == 0


def test_nan_action_falls_back(server_factory, nan_policy: Path) -> None:
    server = server_factory(nan_policy)
    with PolicyClient(server.target, deadline_s=5, fallback="hold") as client:
        held = client.act([0.0] * 26)
        np.testing.assert_array_equal(client.act([101.0] + [0.0] * 25), held)
        assert client.misses == 1 and "INTERNAL" in client.last_error


@pytest.fixture
def stalled_server() -> Iterator[str]:
    """A server that answers GetPolicy but never answers an action request."""
    release = threading.Event()
    info = pb.PolicyInfo(version=1, obs_dim=26, act_dim=2, action_low=[0.5, -1], action_high=[1, 1])

    def get_policy(request, context):
        return info

    def act(request, context):
        release.wait(30)
        return pb.ActResponse()

    def act_stream(requests, context):
        for _ in requests:
            release.wait(30)
            yield pb.ActResponse()

    handlers = {
        "GetPolicy": grpc.unary_unary_rpc_method_handler(
            get_policy, pb.GetPolicyRequest.FromString, pb.PolicyInfo.SerializeToString
        ),
        "Act": grpc.unary_unary_rpc_method_handler(
            act, pb.ActRequest.FromString, pb.ActResponse.SerializeToString
        ),
        "ActStream": grpc.stream_stream_rpc_method_handler(
            act_stream, pb.ActRequest.FromString, pb.ActResponse.SerializeToString
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("mu.v1.Controller", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    release.set()
    server.stop(0)


@pytest.mark.parametrize("stream", [True, False])
def test_missed_deadline_returns_zeros_clamped_into_bounds(
    stalled_server: str, stream: bool
) -> None:
    with PolicyClient(stalled_server, deadline_s=0.05, stream=stream, fallback="zeros") as client:
        client.get_policy()
        for i in range(2):
            np.testing.assert_array_equal(client.act([0.0] * 26), [0.5, 0.0])
            assert client.misses == i + 1


class ScriptedStreams:
    """A stand-in robot-facing server for the client's stream logic (the client is under test).

    Every ActStream it accepts gets a number (1, 2, ...); `received` records (stream, seq) for
    each request. Requests with a seq in `hold` are answered only once `release` is set; the
    others at once, with action [seq, 0]. With answer=False nothing is ever answered.
    """

    def __init__(self, hold: tuple[int, ...] = (), answer: bool = True) -> None:
        self.hold, self.answer = hold, answer
        self.release = threading.Event()
        self.changed = threading.Condition()
        self.received: list[tuple[int, int]] = []
        self._streams = 0
        info = pb.PolicyInfo(version=1, obs_dim=26, act_dim=2, action_low=[-1, -1],
                             action_high=[1, 1])  # fmt: skip

        def act_stream(requests, context):
            with self.changed:
                self._streams += 1
                stream = self._streams
            for request in requests:
                with self.changed:
                    self.received.append((stream, request.seq))
                    self.changed.notify_all()
                if not self.answer:
                    continue
                if request.seq in self.hold:
                    self.release.wait(30)
                yield pb.ActResponse(action=[float(request.seq), 0.0], seq=request.seq)

        handlers = {
            "GetPolicy": grpc.unary_unary_rpc_method_handler(
                lambda request, context: info,
                pb.GetPolicyRequest.FromString,
                pb.PolicyInfo.SerializeToString,
            ),
            "ActStream": grpc.stream_stream_rpc_method_handler(
                act_stream, pb.ActRequest.FromString, pb.ActResponse.SerializeToString
            ),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("mu.v1.Controller", handlers)]
        )
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def wait_received(self, n: int) -> list[tuple[int, int]]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.received) >= n, timeout=30)
            return list(self.received)

    def stop(self) -> None:
        self.release.set()
        self.server.stop(0)


def test_a_late_reply_is_matched_by_seq_and_dropped() -> None:
    server = ScriptedStreams(hold=(1,))
    try:
        with PolicyClient(server.target, deadline_s=0.05, fallback="zeros") as client:
            client.get_policy()
            np.testing.assert_array_equal(client.act([0.0] * 26), [0.0, 0.0])  # seq 1: held
            assert client.misses == 1
            server.release.set()  # seq 1's reply now goes out, late, ahead of seq 2's
            client.deadline_s = 30.0
            for seq in (2, 3):
                np.testing.assert_array_equal(client.act([0.0] * 26), [float(seq), 0.0])
            assert client.misses == 1
        assert [stream for stream, _ in server.received] == [1, 1, 1]  # one stream throughout
    finally:
        server.stop()


def test_three_misses_in_a_row_reopen_the_stream() -> None:
    server = ScriptedStreams(answer=False)
    try:
        with PolicyClient(server.target, deadline_s=0.05, fallback="zeros") as client:
            client.get_policy()
            for _ in range(4):
                client.act([0.0] * 26)
            assert client.misses == 4
            # seqs 1-3 went out on the first stream; after the third miss, seq 4 on a new one
            assert server.wait_received(4) == [(1, 1), (1, 2), (1, 3), (2, 4)]
    finally:
        server.stop()


def test_server_restart_holds_then_reconnects(
    server_factory, policy_path: Path, tmp_path: Path
) -> None:
    socket = f"unix:{tmp_path / 'mu.sock'}"
    server = server_factory(policy_path, listen=socket)
    with PolicyClient(socket, deadline_s=2, stream=True, fallback="hold") as client:
        first = client.act(OBS[0])
        server.stop()
        np.testing.assert_array_equal(client.act(OBS[1]), first)  # held
        assert client.misses >= 1
        server_factory(policy_path, listen=socket)
        client.wait_ready()
        for _ in range(50):  # the channel may need a few attempts to see the new server
            action = client.act(OBS[1])
            if not np.array_equal(action, first):
                break
        np.testing.assert_allclose(action, _expected(policy_path)[1], atol=1e-6)


def test_admin_calls(server_factory, policy_path: Path, make_policy, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("abc")
    server = server_factory(policy_path, admin_token_file=token)
    other = make_policy("other.onnx", seed=4)
    with PolicyClient(server.target, token="wrong") as client:
        with pytest.raises(grpc.RpcError) as refused:
            client.load_policy(other)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with PolicyClient(server.target, token="abc") as client:
        assert client.load_policy(other).version == 2
        assert client.load_policy(other, upload=True).source == "<bytes>"
        assert client.load_policy(other.read_bytes()).version == 4
        assert client.rollback().version == 3


def test_each_lane_takes_only_its_own_arguments(connected) -> None:
    """One interface, two classes: the gRPC lane's client has no local-lane arguments or
    methods, and the other way round."""
    from controller.robot.client import Client
    from controller.robot.local import LocalClient

    target = connected.server.target
    with pytest.raises(TypeError, match="LocalClient"):
        PolicyClient(target, local=True)
    with pytest.raises(TypeError, match="deadline_s"):
        LocalClient(target, deadline_s=0.01)
    with PolicyClient(target, deadline_s=5) as remote, LocalClient(target) as local:
        for client in (remote, local):
            assert isinstance(client, Client)
            assert client.act([0.0] * 26).shape == (6,) and client.version == 1
        assert not hasattr(remote, "report") and not hasattr(remote, "watcher")
        assert not hasattr(local, "deadline_s")
