"""The local lane against real servers: WatchPolicy swaps, rollbacks, refusals, restarts,
exploration and experience reporting; and INVALID_ARGUMENT for undecodable request bytes.

No test asserts a time: waits are on the watcher's own condition (bounded only so that a broken
build fails instead of hanging).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.hardening import Blackhole
from controller.finetune.config import FinetuneConfig
from controller.proto import controller_pb2 as pb
from controller.proto import grpc_service_pb2 as inference_pb
from controller.robot.client import PolicyClient
from controller.robot.local import ExperienceQueue, LocalClient
from controller.transitions import Transition

REPO = Path(__file__).resolve().parents[3]
POLICY = REPO / "policies" / "panda_reach" / "policy.onnx"
AGENT = REPO / "policies" / "panda_reach" / "agent.pt"
OBS = np.random.default_rng(5).normal(0, 2, (6, 26)).astype(np.float32)
WAIT_S = 60  # a bound for a broken build, not a measurement


def _expected(path: Path, obs: np.ndarray = OBS) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["action"], {"obs": obs})[0]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _acts(client: LocalClient) -> np.ndarray:
    return np.stack([client.act(row) for row in OBS])


def test_watcher_applies_a_swap_and_a_rollback(server_factory, policy_path, make_policy) -> None:
    server = server_factory(policy_path)
    other = make_policy("other.onnx", seed=3)
    with (
        LocalClient(server.target, client_id="arm-1") as robot,
        PolicyClient(server.target) as admin,
    ):
        np.testing.assert_allclose(_acts(robot), _expected(policy_path), atol=1e-6)
        assert robot.version == 1
        robot.watcher.wait_handled(1, timeout=WAIT_S)

        assert admin.load_policy(other).version == 2
        robot.watcher.wait(2, timeout=WAIT_S)
        np.testing.assert_allclose(_acts(robot), _expected(other), atol=1e-6)
        assert robot.version == 2
        robot.watcher.wait_handled(2, timeout=WAIT_S)
        (loop,) = admin.get_policy().local_loops
        assert loop.client_id == "arm-1" and loop.connected
        assert (loop.applied_version, loop.applied_sha256) == (2, _sha(other))

        assert admin.rollback().version == 1
        robot.watcher.wait(1, timeout=WAIT_S)
        np.testing.assert_allclose(_acts(robot), _expected(policy_path), atol=1e-6)
        robot.watcher.wait_handled(3, timeout=WAIT_S)
        assert admin.get_policy().local_loops[0].applied_version == 1
        assert robot.watcher.refused == 0 and robot.misses == 0


@pytest.fixture
def lying_server(policy_path: Path, make_policy) -> Iterator[tuple[str, list[pb.PolicyAck]]]:
    """A WatchPolicy source that sends a good policy, then a file whose sha256 does not match
    what the update claims; it records the acknowledgements."""
    other = make_policy("other.onnx", seed=3)
    good, bad = policy_path.read_bytes(), other.read_bytes()
    low, high = [-1.0, -2.0, -0.5, -1.0, 0.0, -3.0], [1.0, 2.0, 0.5, 3.0, 1.0, 3.0]
    acks: list[pb.PolicyAck] = []
    release = threading.Event()

    def watch(request, context):
        yield pb.PolicyUpdate(nonce="n1", version=1, sha256=hashlib.sha256(good).hexdigest(),
                              onnx=good, action_low=low, action_high=high)  # fmt: skip
        yield pb.PolicyUpdate(nonce="n2", version=2, sha256=hashlib.sha256(good).hexdigest(),
                              onnx=bad, action_low=low, action_high=high)  # fmt: skip
        release.wait(WAIT_S)

    def ack(request, context):
        acks.append(request)
        return pb.AckPolicyResponse()

    handlers = {
        "WatchPolicy": grpc.unary_stream_rpc_method_handler(
            watch, pb.WatchPolicyRequest.FromString, pb.PolicyUpdate.SerializeToString
        ),
        "AckPolicy": grpc.unary_unary_rpc_method_handler(
            ack, pb.PolicyAck.FromString, pb.AckPolicyResponse.SerializeToString
        ),
    }
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("mu.v1.Controller", handlers)]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", acks
    release.set()
    server.stop(0)


def test_watcher_refuses_a_sha256_mismatch_and_keeps_the_old_policy(
    lying_server, policy_path: Path
) -> None:
    target, acks = lying_server
    with LocalClient(target) as robot:
        robot.watcher.wait_handled(2, timeout=WAIT_S)
        assert robot.version == 0 and robot.policy.version == 1
        np.testing.assert_allclose(_acts(robot), _expected(policy_path), atol=1e-6)
        assert robot.watcher.applied == 1 and robot.watcher.refused == 1
    assert [(a.nonce, a.version, a.applied) for a in acks] == [("n1", 1, True), ("n2", 2, False)]
    assert "sha256" in acks[1].error


def test_watcher_survives_a_server_restart(
    server_factory, policy_path: Path, make_policy, tmp_path: Path
) -> None:
    listen = f"unix:{tmp_path / 'mu.sock'}"
    server = server_factory(policy_path, listen=listen)
    other = make_policy("other.onnx", seed=3)
    with LocalClient(listen) as robot:
        before = _acts(robot)
        server.stop()
        for _ in range(20):  # ticks with the server gone: the last verified policy, no miss
            np.testing.assert_array_equal(_acts(robot), before)
        assert robot.misses == 0
        server_factory(other, listen=listen)  # a new process: versions restart at 1
        robot.watcher.wait(1, sha256=_sha(other), timeout=WAIT_S)
        np.testing.assert_allclose(_acts(robot), _expected(other), atol=1e-6)
        assert robot.watcher.reconnects >= 1 and robot.misses == 0


def test_a_silently_vanished_server_is_noticed_by_keepalive(server_factory, policy_path) -> None:
    """No FIN, no RST, no reply: only the keepalive ping can tell. The loop keeps its policy.

    Documented: noticed within 2 x keepalive_s (2 s here). The bound, 10 s, is far from that and
    far from gRPC's 60 s ping timeout, which a keepalive left to its defaults would wait for."""
    relay = Blackhole(server_factory(policy_path).target)
    try:
        with LocalClient(relay.target, keepalive_s=1.0) as robot:
            before = _acts(robot)
            assert robot.watcher.connected and robot.watcher.reconnects == 0
            relay.cut.set()
            for _ in range(10 * 100):
                if robot.watcher.reconnects:
                    break
                threading.Event().wait(0.01)
            assert robot.watcher.reconnects >= 1, "the dead stream went unnoticed for 10 s"
            assert not robot.watcher.connected and "WatchPolicy" in robot.watcher.last_error
            np.testing.assert_array_equal(_acts(robot), before)
            assert robot.misses == 0
    finally:
        relay.close()


def test_a_silent_client_is_reaped_by_the_servers_keepalive(server_factory, policy_path) -> None:
    """The loop's connection goes silent (no FIN, no RST): the server's own keepalive (1 s
    here) closes it, and GetPolicy shows the loop disconnected. The bound, 10 s, is far from
    the 2 s documented and from the never of a server without keepalive."""
    server = server_factory(policy_path, client_keepalive_s=1.0)
    relay = Blackhole(server.target)
    try:
        with (
            LocalClient(relay.target, client_id="arm-1") as robot,
            PolicyClient(server.target) as admin,
        ):
            robot.watcher.wait_handled(1, timeout=WAIT_S)
            assert [loop.connected for loop in admin.get_policy().local_loops] == [True]
            relay.cut.set()
            for _ in range(10 * 100):
                if not admin.get_policy().local_loops[0].connected:
                    break
                threading.Event().wait(0.01)
            (loop,) = admin.get_policy().local_loops
            assert not loop.connected, "the silent loop still shows connected after 10 s"
    finally:
        relay.close()


def test_local_loops_are_bounded_in_size_and_count(connected) -> None:
    """A client_id longer than 256 characters is refused (two of 3 MB made every GetPolicy
    reply too large), an AckPolicy cannot add a loop past the cap (only WatchPolicy does), and
    a loop's refusal reason is kept to 1024 characters."""
    stub = connected.stub
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as refused:
            next(stub.WatchPolicy(pb.WatchPolicyRequest(client_id="x" * 3_000_000), timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "client_id has 3000000 characters; at most 256" in refused.value.details()
    assert len(stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).local_loops) == 0

    watch = stub.WatchPolicy(pb.WatchPolicyRequest(client_id="arm-1"), timeout=WAIT_S)
    update = next(watch)
    ack = {"nonce": update.nonce, "version": update.version, "sha256": update.sha256}
    for i in range(20):
        with pytest.raises(grpc.RpcError) as refused:
            stub.AckPolicy(pb.PolicyAck(client_id=f"ghost-{i}", applied=True, **ack), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "has no WatchPolicy stream" in refused.value.details()
    stub.AckPolicy(pb.PolicyAck(client_id="arm-1", error="e" * 100_000, **ack), timeout=10)
    (loop,) = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).local_loops
    watch.cancel()
    assert loop.client_id == "arm-1" and loop.refused_version == update.version
    assert loop.refused_error.startswith("e" * 1024 + "... [98976 more characters]")


def test_local_lane_runs_the_servers_safety_code(server_factory, policy_path: Path) -> None:
    """Same slew limit, same order, same numbers as ActStream: one implementation. A loop that
    warms the policy before each tick (run_loop on its own CPU) gets the same numbers too."""
    server = server_factory(policy_path, max_delta=0.05)
    rows = np.random.default_rng(9).normal(0, 3, (30, 26)).astype(np.float32)
    with (
        LocalClient(server.target) as robot,
        LocalClient(server.target) as warmed,
        PolicyClient(server.target, deadline_s=5) as remote,
    ):
        assert robot.policy.max_delta == pytest.approx(0.05)
        local = np.stack([robot.act(r) for r in rows])
        served = np.stack([remote.act(r) for r in rows])
        after_warm = []
        for r in rows:
            warmed.warm(-10 * r)  # far from r: a slew state it touched would show
            after_warm.append(warmed.act(r))
    np.testing.assert_array_equal(local, served)
    np.testing.assert_array_equal(np.stack(after_warm), served)
    assert np.abs(np.diff(local, axis=0)).max() <= 0.05 + 1e-6


def test_local_lane_refuses_bad_observations_like_the_server(connected) -> None:
    from controller.robot.client import ActRefused

    with LocalClient(connected.server.target) as robot:
        with pytest.raises(ActRefused, match="observation has 25 values; the policy expects 26"):
            robot.act([0.0] * 25)
        with pytest.raises(ActRefused, match="NaN or infinite"):
            robot.act([float("nan")] + [0.0] * 25)
        assert robot.act([0.0] * 26).shape == (6,)


def test_nan_action_falls_back_on_the_local_lane(server_factory, nan_policy: Path) -> None:
    server = server_factory(nan_policy)
    with LocalClient(server.target, fallback="hold") as robot:
        held = robot.act([0.0] * 26)
        np.testing.assert_array_equal(robot.act([101.0] + [0.0] * 25), held)
        assert robot.misses == 1 and "INTERNAL" in robot.last_error


def test_a_bug_inside_a_tick_is_raised_not_a_fallback(connected, monkeypatch) -> None:
    """Only onnxruntime's own errors become a fallback action; a bug keeps its traceback."""
    with LocalClient(connected.server.target) as robot:
        robot.act([0.0] * 26)
        policy = robot.watcher.current.policy

        def broken(obs):
            raise RuntimeError("bug inside the tick")

        monkeypatch.setattr(policy, "act_values", broken)
        with pytest.raises(RuntimeError, match="bug inside the tick"):
            robot.act([0.0] * 26)
        assert robot.misses == 0


def test_watch_policy_needs_the_token(server_factory, policy_path: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret")
    server = server_factory(policy_path, admin_token_file=token)
    with pytest.raises(PermissionError, match="UNAUTHENTICATED"):
        LocalClient(server.target, call_deadline_s=WAIT_S)
    with pytest.raises(PermissionError, match="PERMISSION_DENIED"):
        LocalClient(server.target, token="wrong", call_deadline_s=WAIT_S)
    with LocalClient(server.target, token="s3cret") as robot:
        assert robot.policy.version == 1


def test_experience_queue_drops_and_counts_instead_of_blocking(connected) -> None:
    queue = ExperienceQueue(connected.channel, maxsize=3, start=False)  # nothing drains it
    obs, act = np.zeros(26, np.float32), np.zeros(6, np.float32)
    t = Transition(obs, act, 1.0, obs, False, False, 1, act - 1, act + 1)
    assert [queue.put(t) for _ in range(10)] == [True] * 3 + [False] * 7
    assert queue.dropped == 7 and queue.pending() == 3


def test_undecodable_bytes_are_invalid_argument(connected) -> None:
    channel = connected.channel  # raw bytes: no serializer
    garbage = b"\xff\xff\xff\xff"
    for method in ("/mu.v1.Controller/Act", "/mu.v1.Controller/ActBatch",
                   "/inference.GRPCInferenceService/ModelInfer"):  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(method)(garbage, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
        assert "does not decode as" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        next(channel.unary_stream("/mu.v1.Controller/WatchPolicy")(garbage, timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # ActStream answers in-band and the stream carries on
    good = pb.ActRequest(obs=[0.0] * 26, seq=7).SerializeToString()
    replies = channel.stream_stream("/mu.v1.Controller/ActStream")(
        iter([garbage, good]), timeout=10
    )
    bad, ok = (pb.ActResponse.FromString(r) for r in replies)
    assert bad.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "does not decode as mu.v1.ActRequest" in bad.error.message
    assert ok.seq == 7 and len(ok.action) == 6
    # a well-formed request still works on the guarded unary path
    reply = connected.stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=10)
    assert len(reply.action) == 6
    assert inference_pb.ModelInferRequest  # the OIP module is importable beside ours


def test_finetuning_in_local_mode_explores_reports_and_promotes(server_factory, tmp_path) -> None:
    """The loop explores with the server's std, reports through the queue, the learner's
    candidate reaches the loop as a new version, and a planted regression rolls it back."""
    fast = dict(actor_warmup=0, candidate_every=2, batch_size=32, gate_states=32, chunk_size=8,
                learner_idle_priority=False)  # fmt: skip
    cfg = FinetuneConfig(
        checkpoint=AGENT, versions_dir=tmp_path / "v", explore_std=0.05, rollback_window=3, **fast
    )
    server = server_factory(POLICY, finetune=cfg)
    rng = np.random.default_rng(0)
    seen: list[int] = []
    with LocalClient(server.target, queue_size=100_000) as robot:
        assert robot.policy.finetune and robot.policy.explore_std == pytest.approx(0.05)
        deterministic = _expected(POLICY, np.zeros((1, 12), np.float32))[0]
        assert not np.allclose(robot.act(np.zeros(12, np.float32)), deterministic, atol=1e-6)
        for _ in range(100_000):  # bounded: a broken learner fails here instead of hanging
            for t in range(5):
                robot.act(rng.normal(0, 0.1, 12))
                # the planted regression: every version after the first earns three times less
                robot.report(-1.0 if robot.version == 1 else -3.0, rng.normal(0, 0.1, 12),
                             truncated=t == 4)  # fmt: skip
                if not seen or seen[-1] != robot.version:
                    seen.append(robot.version)
            if len(seen) >= 3:
                break
            threading.Event().wait(0.002)  # a robot's pace between episodes, not a sync point
        experience = robot.experience
        assert experience is not None and experience.dropped == 0
    assert seen == [1, 2, 1], seen


def test_mu_loop_local_runs_an_episode(server_factory, make_policy, tmp_path: Path) -> None:
    import argparse
    import json

    from controller.robot.loop import add_loop_arguments, loop_from_args

    panda = make_policy("panda.onnx", env_id="PandaReachDense-v3", obs_dim=12, act_dim=3,
                        low=[-1.0] * 3, high=[1.0] * 3)  # fmt: skip
    server = server_factory(panda)
    parser = argparse.ArgumentParser()
    add_loop_arguments(parser)
    out = tmp_path / "loop.json"
    args = parser.parse_args(["--env", "PandaReachDense-v3", "--target", server.target,
                              "--rate", "500", "--episodes", "1", "--local",
                              "--json", str(out)])  # fmt: skip
    assert loop_from_args(args) == 0
    s = json.loads(out.read_text())
    assert s["lane"] == "local" and s["episodes"] == 1 and s["versions"] == [1]
    assert s["misses"]["fallbacks"] == 0


def test_the_server_side_and_the_robot_side_import_only_what_they_share() -> None:
    """The server never imports the robot side; the robot side never imports fine-tuning."""
    import subprocess
    import sys

    for imports, prefix in (("controller.server, controller.echo", "controller.robot"),
                            ("controller.robot.demo, controller.robot.loop, controller.bench",
                             "controller.finetune")):  # fmt: skip
        code = f"import sys, {imports}; print(sorted(m for m in sys.modules if '{prefix}' in m))"
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[]", imports
