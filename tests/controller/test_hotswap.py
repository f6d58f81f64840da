"""Hot swap: LoadPolicy under load with zero failed requests, refusals, rollback, file watch."""

import hashlib
import logging
import os
import threading
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from tests.controller.conftest import policy_model

SWAPS = 8
STREAMS = 3


def test_swaps_under_concurrent_streams_fail_no_request(
    connected, policy_path: Path, make_policy
) -> None:
    files = [policy_path] + [make_policy(f"p{i}.onnx", seed=i + 1) for i in range(SWAPS)]
    obs = {k: np.full((1, 26), 0.1 * k, np.float32) for k in range(STREAMS)}
    # version v serves files[v - 1]: what each stream must get from it
    expected = {
        v: {k: _session(path).run(["action"], {"obs": obs[k]})[0][0] for k in range(STREAMS)}
        for v, path in enumerate(files, start=1)
    }
    stop = threading.Event()
    seen = threading.Condition()
    replies: list[list[tuple[int, list[float]]]] = [[] for _ in range(STREAMS)]
    errors: list[str] = []

    def hammer(k: int) -> None:
        def requests():
            seq = 0
            while not stop.is_set():
                seq += 1
                yield pb.ActRequest(obs=obs[k][0].tolist(), seq=seq)

        try:
            for reply in connected.stub.ActStream(requests(), timeout=120):
                if reply.HasField("error") or len(reply.action) != 6:
                    errors.append(f"stream {k} seq {reply.seq}: {reply.error.message}")
                with seen:
                    replies[k].append((reply.policy_version, list(reply.action)))
                    seen.notify_all()
        except BaseException as e:  # noqa: BLE001  (a thread's failure must reach the test)
            errors.append(f"stream {k}: {e!r}")

    def every_stream_saw(version: int) -> bool:
        return all(r and r[-1][0] >= version for r in replies) or bool(errors)

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(STREAMS)]
    for t in threads:
        t.start()
    try:
        with seen:
            assert seen.wait_for(lambda: every_stream_saw(1), timeout=60), "streams never started"
        for i, path in enumerate(files[1:]):
            info = connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(path)), timeout=30)
            assert info.version == i + 2 and info.previous_version == i + 1
            # the streams keep running across each swap: every one gets an answer from it
            with seen:
                assert seen.wait_for(lambda v=info.version: every_stream_saw(v), timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a stream did not finish"
    assert errors == []
    for k, got in enumerate(replies):
        versions = [v for v, _ in got]
        assert versions == sorted(versions), "versions went backwards"
        assert len(set(versions)) >= 2, f"stream {k} saw one version: swaps did not overlap it"
        # each reply was computed by the policy its version names, never a neighbour's
        for version, action in got:
            np.testing.assert_allclose(action, expected[version][k], atol=1e-6)
    assert connected.server.policy.version == SWAPS + 1


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_loaded_policy_serves_its_own_actions(connected, make_policy) -> None:
    other = make_policy("other.onnx", seed=42)
    before = connected.stub.Act(pb.ActRequest(obs=[0.5] * 26), timeout=5)
    info = connected.stub.LoadPolicy(pb.LoadPolicyRequest(onnx=other.read_bytes()), timeout=30)
    assert info.version == 2 and info.source == "<bytes>"
    after = connected.stub.Act(pb.ActRequest(obs=[0.5] * 26), timeout=5)
    assert after.policy_version == 2
    assert not np.allclose(before.action, after.action)


@pytest.mark.parametrize(
    ("fixture", "code", "match"),
    [
        ("corrupt_policy", grpc.StatusCode.INVALID_ARGUMENT, "not a loadable ONNX model"),
        ("wrong_metadata_policy", grpc.StatusCode.INVALID_ARGUMENT, "mu.obs_dim"),
        ("missing", grpc.StatusCode.NOT_FOUND, "cannot read policy file"),
        ("other_env", grpc.StatusCode.FAILED_PRECONDITION, "env id OtherEnv-v0"),
    ],
)
def test_bad_file_is_refused_and_old_version_keeps_serving(
    request, connected, tmp_path: Path, make_policy, fixture, code, match
) -> None:
    if fixture == "missing":
        path = tmp_path / "missing.onnx"
    elif fixture == "other_env":
        path = make_policy("env.onnx", env_id="OtherEnv-v0")
    else:
        path = request.getfixturevalue(fixture)
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(path)), timeout=30)
    assert refused.value.code() == code
    assert match in refused.value.details()
    reply = connected.stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=5)
    assert reply.policy_version == 1 and len(reply.action) == 6
    # The next good load still gets the next version number.
    ok = pb.LoadPolicyRequest(path=str(make_policy("ok.onnx", 3)))
    info = connected.stub.LoadPolicy(ok, timeout=30)
    assert info.version == 2


def _variant(change) -> bytes:
    """The test policy with `change(model)` applied: its bytes."""
    model = policy_model(0)
    change(model)
    return model.SerializeToString()


def _set(name: str, index: tuple[int, ...], value: float):
    def change(model: onnx.ModelProto) -> None:
        init = next(i for i in model.graph.initializer if i.name == name)
        array = numpy_helper.to_array(init).copy()
        array[index] = value
        init.CopyFrom(numpy_helper.from_array(array, name))

    return change


def _nan_clip_bound(model: onnx.ModelProto) -> None:
    """An observation normalizer's clip whose upper bound is a NaN Constant."""
    nodes = [
        helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(np.float32(-5))),
        helper.make_node("Constant", [], ["hi"], name="clip_hi",
                         value=numpy_helper.from_array(np.float32("nan"))),
        helper.make_node("Clip", ["obs", "lo", "hi"], ["obs_clipped"]),
    ]  # fmt: skip
    model.graph.node[0].input[0] = "obs_clipped"
    for i, node in enumerate(nodes):
        model.graph.node.insert(i, node)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_nan_clip_bound, "attribute 'value' of Constant node 'clip_hi' contains NaN or infinite"),
        (_set("w2", (3, 2), np.inf), "initializer 'w2' contains NaN or infinite values"),
        (_set("b1", (0,), np.inf), "initializer 'b1' contains NaN or infinite values"),
        (_set("w1", (slice(None),), 0.0), "its action does not depend on the observation"),
    ],
    ids=["nan-clip-bound", "inf-weight", "inf-bias", "constant-action"],
)
def test_policies_with_non_finite_parameters_or_a_constant_action_are_refused(
    connected, change, match
) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.LoadPolicy(pb.LoadPolicyRequest(onnx=_variant(change)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in refused.value.details()
    reply = connected.stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=5)
    assert reply.policy_version == 1 and len(reply.action) == 6


def test_a_policy_saturated_on_every_probe_is_served(connected, caplog) -> None:
    """A finite policy whose actions sit at their bounds on every probe (a young policy does
    that on arbitrary observations) is served, with a warning: saturation is not a broken
    actor."""
    info = connected.stub.LoadPolicy(
        pb.LoadPolicyRequest(onnx=_variant(_set("b2", (slice(None),), 1e4))), timeout=30
    )
    assert info.version == 2
    assert "at its bounds, for 8 probe observations" in caplog.text


def test_load_needs_a_source(connected) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.LoadPolicy(pb.LoadPolicyRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_rollback(connected, make_policy) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        connected.stub.RollbackPolicy(pb.RollbackPolicyRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    original = connected.stub.Act(pb.ActRequest(obs=[0.5] * 26), timeout=5)
    connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(make_policy("v2.onnx", 9))), timeout=30)
    info = connected.stub.RollbackPolicy(pb.RollbackPolicyRequest(), timeout=5)
    assert info.version == 1 and info.previous_version == 2
    again = connected.stub.Act(pb.ActRequest(obs=[0.5] * 26), timeout=5)
    assert again.policy_version == 1
    np.testing.assert_array_equal(again.action, original.action)
    # A second rollback undoes the first.
    assert connected.stub.RollbackPolicy(pb.RollbackPolicyRequest(), timeout=5).version == 2


class _LogSeen(logging.Handler):
    """Sets `event` when a record containing `needle` is logged (from any thread)."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.WARNING)
        self.needle = needle
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.needle in record.getMessage():
            self.event.set()


def test_watch_reloads_a_replaced_file(server_factory, make_policy, tmp_path: Path) -> None:
    served = make_policy("served.onnx", seed=0)
    server = server_factory(served, watch=True, watch_interval_s=0.05)
    refused = _LogSeen("watch: keeping version 2")
    store_log = logging.getLogger("controller.store")
    store_log.addHandler(refused)
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ControllerStub(channel)
            # Replace atomically, as an exporter should: write aside, then rename over.
            fresh = make_policy("fresh.onnx", seed=5)
            os.replace(fresh, served)
            assert _wait_for_version(stub, 2)
            # A corrupt replacement is refused; version 2 keeps serving.
            bad = tmp_path / "bad.onnx"
            bad.write_bytes(b"not onnx at all")
            os.replace(bad, served)
            assert refused.event.wait(30), "the watcher never refused the corrupt file"
            assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version == 2
            good = make_policy("good.onnx", seed=6)
            good_sha = hashlib.sha256(good.read_bytes()).hexdigest()
            os.replace(good, served)
            assert _wait_for_version(stub, 3)
            # the refusal took no version number, and the good file is what serves
            info = stub.GetPolicy(pb.GetPolicyRequest(), timeout=5)
            assert (info.version, info.sha256) == (3, good_sha)
    finally:
        store_log.removeHandler(refused)


def test_watch_survives_any_file_and_says_what_it_refused(
    server_factory, make_policy, tmp_path: Path
) -> None:
    """Metadata that is not UTF-8, a symlink loop and a FIFO at the watched path each get a
    warning, and the next good file is still loaded."""
    served = make_policy("served.onnx", seed=0)
    server = server_factory(served, watch=True, watch_interval_s=0.05)
    store_log = logging.getLogger("controller.store")
    bad_meta = tmp_path / "bad_meta.onnx"
    data = policy_model(1, metadata={"mu.algo": "ZZZZ"}).SerializeToString()
    bad_meta.write_bytes(data.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc"))
    loop = tmp_path / "loop"
    loop.symlink_to(served.name)  # renamed over `served`, it points at itself
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for replacement, reason in (
            (bad_meta, "metadata that is not valid UTF-8"),
            (loop, "Too many levels of symbolic links"),
            (fifo, "is not a regular file"),
        ):
            seen = _LogSeen(reason)
            store_log.addHandler(seen)
            try:
                os.replace(replacement, served)
                assert seen.event.wait(30), f"the watcher said nothing of {replacement.name}"
            finally:
                store_log.removeHandler(seen)
        os.replace(make_policy("good.onnx", seed=6), served)
        assert _wait_for_version(stub, 2), "the watcher stopped"


def test_load_policy_of_a_fifo_is_refused_without_blocking_later_loads(
    connected, make_policy, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(fifo)), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is not a regular file" in refused.value.details()
        good = pb.LoadPolicyRequest(path=str(make_policy("good.onnx", seed=2)))
        assert connected.stub.LoadPolicy(good, timeout=10).version == 2
    finally:  # a reader still blocked on the FIFO (a broken build) gets its end of file
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # ENXIO: nobody reads it, as it should be
            pass


def _wait_for_version(stub: pb_grpc.ControllerStub, version: int) -> bool:
    """Poll GetPolicy until the version is reached (bounded: about 20 s)."""
    event = threading.Event()
    for _ in range(400):
        if stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version >= version:
            return True
        event.wait(0.05)
    return False
