"""Test policies (built with onnx.helper, no torch) and running servers for the controller tests."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from controller.config import ServeConfig
from controller.proto import controller_pb2_grpc
from controller.server import RunningServer, start_in_thread

OBS_DIM = 26
ACT_DIM = 6
HIDDEN = 32
LOW = [-1.0, -2.0, -0.5, -1.0, 0.0, -3.0]
HIGH = [1.0, 2.0, 0.5, 3.0, 1.0, 3.0]


def policy_model(
    seed: int = 0,
    *,
    obs_dim: int = OBS_DIM,
    act_dim: int = ACT_DIM,
    low: list[float] | None = None,
    high: list[float] | None = None,
    env_id: str = "TestEnv-v0",
    metadata: dict[str, str] | None = None,
    nan_guard_index: int | None = None,
) -> onnx.ModelProto:
    """obs -> Gemm -> Tanh -> Gemm -> Tanh -> Mul(scale) -> Add(bias), with full metadata.

    With `nan_guard_index`, the output is NaN whenever obs[:, nan_guard_index] > 100
    (Sqrt of a negative number), to exercise the server's NaN guard.
    """
    low = np.asarray(LOW[:act_dim] if low is None else low, dtype=np.float32)
    high = np.asarray(HIGH[:act_dim] if high is None else high, dtype=np.float32)
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 0.5, (obs_dim, HIDDEN)).astype(np.float32)
    b1 = rng.normal(0, 0.1, HIDDEN).astype(np.float32)
    w2 = rng.normal(0, 0.5, (HIDDEN, act_dim)).astype(np.float32)
    b2 = rng.normal(0, 0.1, act_dim).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(b1, "b1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(b2, "b2"),
        numpy_helper.from_array((high - low) / 2, "scale"),
        numpy_helper.from_array((high + low) / 2, "bias"),
    ]
    nodes = [
        helper.make_node("Gemm", ["obs", "w1", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["t1"]),
        helper.make_node("Gemm", ["t1", "w2", "b2"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["t2"]),
        helper.make_node("Mul", ["t2", "scale"], ["scaled"]),
    ]
    last = "scaled"
    if nan_guard_index is not None:
        # nan_term = sqrt(100 - obs[:, i:i+1]) * 0: 0 normally, NaN when obs[:, i] > 100.
        inits += [
            numpy_helper.from_array(np.array([nan_guard_index], np.int64), "gi"),
            numpy_helper.from_array(np.array([nan_guard_index + 1], np.int64), "gj"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([100.0], np.float32), "hundred"),
            numpy_helper.from_array(np.array([0.0], np.float32), "zero"),
        ]
        nodes += [
            helper.make_node("Slice", ["obs", "gi", "gj", "axis1"], ["col"]),
            helper.make_node("Sub", ["hundred", "col"], ["room"]),
            helper.make_node("Sqrt", ["room"], ["root"]),
            helper.make_node("Mul", ["root", "zero"], ["nan_term"]),
            helper.make_node("Add", ["scaled", "nan_term"], ["scaled_nan"]),
        ]
        last = "scaled_nan"
    nodes.append(helper.make_node("Add", [last, "bias"], ["action"]))
    graph = helper.make_graph(
        nodes,
        "policy",
        [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["batch", obs_dim])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", act_dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    meta = {
        "mu.format": "mu.policy.v1",
        "mu.env_id": env_id,
        "mu.obs_dim": str(obs_dim),
        "mu.act_dim": str(act_dim),
        "mu.action_low": json.dumps(low.tolist()),
        "mu.action_high": json.dumps(high.tolist()),
        "mu.obs_layout": json.dumps([["observation", obs_dim - 6], ["goal", 6]]),
        "mu.algo": "td3",
        "mu.train_steps": "1000",
        "mu.eval_return": "12.5",
        "mu.created_utc": "2026-01-01T00:00:00Z",
    }
    meta.update(metadata or {})
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def write_policy(path: Path, seed: int = 0, **kwargs) -> Path:
    onnx.save(policy_model(seed, **kwargs), str(path))
    return path


@pytest.fixture
def policy_path(tmp_path: Path) -> Path:
    return write_policy(tmp_path / "policy.onnx", seed=0)


@pytest.fixture
def make_policy(tmp_path: Path) -> Callable[..., Path]:
    """make_policy(name, seed=..., **policy_model kwargs) -> path of a new policy file."""

    def make(name: str, seed: int = 0, **kwargs) -> Path:
        return write_policy(tmp_path / name, seed, **kwargs)

    return make


@pytest.fixture
def corrupt_policy(tmp_path: Path, policy_path: Path) -> Path:
    data = policy_path.read_bytes()
    path = tmp_path / "corrupt.onnx"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def wrong_metadata_policy(make_policy) -> Path:
    """Metadata consistent with itself (obs_dim 25) but not with the graph (26 inputs)."""
    meta = {"mu.obs_dim": "25", "mu.obs_layout": '[["obs", 25]]'}
    return make_policy("wrong_meta.onnx", metadata=meta)


@pytest.fixture
def nan_policy(make_policy) -> Path:
    return make_policy("nan.onnx", nan_guard_index=0)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., RunningServer]]:
    """server_factory(policy=..., **ServeConfig fields) -> a started server; stopped at teardown."""
    started: list[RunningServer] = []

    def start(policy: Path, **fields) -> RunningServer:
        fields.setdefault("listen", "127.0.0.1:0")
        running = start_in_thread(ServeConfig(policy=policy, **fields))
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@dataclass
class Connected:
    server: RunningServer
    channel: grpc.Channel
    stub: controller_pb2_grpc.ControllerStub


@pytest.fixture
def connected(server_factory, policy_path: Path) -> Iterator[Connected]:
    """A server on 127.0.0.1:0 serving `policy_path`, with a ready channel and stub."""
    server = server_factory(policy_path)
    channel = grpc.insecure_channel(server.target)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield Connected(server, channel, controller_pb2_grpc.ControllerStub(channel))
    channel.close()


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A throwaway CA with a server certificate (localhost, 127.0.0.1) and a client certificate."""
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=mu-test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, san in (("server", "DNS:localhost,IP:127.0.0.1"), ("client", "DNS:robot")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                 "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return Certs(
        d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key"
    )
