"""Hot swap: LoadPolicy under load with zero failed requests, refusals, rollback, file watch."""

import os
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

SWAPS = 8
STREAMS = 3


def test_swaps_under_concurrent_streams_fail_no_request(connected, make_policy) -> None:
    files = [make_policy(f"p{i}.onnx", seed=i + 1) for i in range(SWAPS)]
    stop = threading.Event()
    versions: list[list[int]] = [[] for _ in range(STREAMS)]
    errors: list[str] = []

    def hammer(k: int) -> None:
        def requests():
            seq = 0
            while not stop.is_set():
                seq += 1
                yield pb.ActRequest(obs=[0.1 * k] * 26, seq=seq)

        try:
            for reply in connected.stub.ActStream(requests(), timeout=120):
                if reply.HasField("error") or len(reply.action) != 6:
                    errors.append(f"stream {k} seq {reply.seq}: {reply.error.message}")
                versions[k].append(reply.policy_version)
        except grpc.RpcError as e:
            errors.append(f"stream {k}: {e.code()} {e.details()}")

    threads = [threading.Thread(target=hammer, args=(k,)) for k in range(STREAMS)]
    for t in threads:
        t.start()
    try:
        for i, path in enumerate(files):
            info = connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(path)), timeout=30)
            assert info.version == i + 2 and info.previous_version == i + 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    for seen in versions:
        assert seen, "a stream got no replies"
        assert seen == sorted(seen), "versions went backwards"
    assert connected.server.policy.version == SWAPS + 1


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
    info = connected.stub.LoadPolicy(pb.LoadPolicyRequest(path=str(make_policy("ok.onnx", 3))))
    assert info.version == 2


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


def test_watch_reloads_a_replaced_file(server_factory, make_policy, tmp_path: Path) -> None:
    served = make_policy("served.onnx", seed=0)
    server = server_factory(served, watch=True, watch_interval_s=0.05)
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
        good = make_policy("good.onnx", seed=6)
        os.replace(good, served)
        assert _wait_for_version(stub, 3)


def _wait_for_version(stub: pb_grpc.ControllerStub, version: int) -> bool:
    """Poll GetPolicy until the version is reached (bounded: about 20 s)."""
    event = threading.Event()
    for _ in range(400):
        if stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version >= version:
            return True
        event.wait(0.05)
    return False
