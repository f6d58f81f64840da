"""The Open Inference Protocol endpoint: unmodified tritonclient.grpc gets Act's actions, the
protocol's own messages (fp32_contents and raw bytes) get the same validation as Act.

tritonclient ships its own `inference` protos; protobuf refuses two definitions of one package in
a process, so tritonclient runs in a client subprocess (as it would on a robot) while the server
runs in this process.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from controller.inference import INFERENCE_SERVICE_NAME, MODEL_NAME
from controller.proto import controller_pb2 as mu_pb
from controller.proto import grpc_service_pb2 as pb
from controller.proto import grpc_service_pb2_grpc as pb_grpc
from tests.controller.conftest import OBS_DIM

# find_spec, not importorskip: importing tritonclient.grpc here clashes with the server's protos.
needs_tritonclient = pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="needs the dev extra (tritonclient)"
)

TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

target, model, obs = sys.argv[1], sys.argv[2], np.asarray(json.loads(sys.argv[3]), np.float32)
client = tc.InferenceServerClient(url=target)
out = {"live": client.is_server_live(), "ready": client.is_server_ready(),
       "model_ready": client.is_model_ready(model),
       "server": client.get_server_metadata(as_json=True),
       "metadata": client.get_model_metadata(model, as_json=True)}
inp = tc.InferInput("obs", list(obs.shape), "FP32")
inp.set_data_from_numpy(obs)
result = client.infer(model, [inp], outputs=[tc.InferRequestedOutput("action")],
                      request_id="r7", client_timeout=10)
out["actions"] = result.as_numpy("action").tolist()
out["version"] = result.get_response().model_version
out["id"] = result.get_response().id
bad = tc.InferInput("obs", [1, obs.shape[1] - 1], "FP32")
bad.set_data_from_numpy(obs[:1, :-1])
try:
    client.infer(model, [bad], client_timeout=10)
except InferenceServerException as e:
    out["error"] = [e.status(), e.message()]
print(json.dumps(out))
"""


def _observations(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, (n, OBS_DIM)).astype(np.float32)


def _act(stub, obs: np.ndarray) -> np.ndarray:
    return np.asarray([stub.Act(mu_pb.ActRequest(obs=o.tolist()), timeout=5).action for o in obs])


@needs_tritonclient
def test_tritonclient_gets_the_actions_act_gives(connected) -> None:
    obs = _observations(4)
    done = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, connected.server.target, MODEL_NAME,
         json.dumps(obs.tolist())],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["live"] and out["ready"] and out["model_ready"]
    assert out["server"]["name"] == "mu"
    assert out["server"]["version"] == importlib.metadata.version("mu-control")  # the installed
    meta = out["metadata"]
    assert meta["name"] == MODEL_NAME and meta["versions"] == ["1"]
    assert meta["inputs"][0]["name"] == "obs" and meta["inputs"][0]["shape"] == ["-1", "26"]
    assert meta["outputs"][0]["name"] == "action"
    np.testing.assert_array_equal(np.asarray(out["actions"], np.float32), _act(connected.stub, obs))
    assert out["version"] == "1" and out["id"] == "r7"
    code, message = out["error"]
    assert code == "StatusCode.INVALID_ARGUMENT" and "[batch, 26]" in message


@pytest.fixture
def oip(connected) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(connected.channel)


def _request(obs: np.ndarray, *, raw: bool, **fields) -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="obs", datatype="FP32", shape=obs.shape)
    request = pb.ModelInferRequest(model_name=MODEL_NAME, inputs=[tensor], **fields)
    if raw:
        request.raw_input_contents.append(obs.astype("<f4").tobytes())
    else:
        request.inputs[0].contents.fp32_contents.extend(obs.ravel().tolist())
    return request


@pytest.mark.parametrize("raw", [False, True], ids=["fp32_contents", "raw"])
@pytest.mark.parametrize("batch", [1, 3])
def test_model_infer_matches_act(connected, oip, raw: bool, batch: int) -> None:
    obs = _observations(batch, seed=batch)
    reply = oip.ModelInfer(_request(obs, raw=raw, id="x"), timeout=5)
    (output,) = reply.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("action", "FP32", [batch, 6])
    if raw:
        actions = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(batch, 6)
    else:
        actions = np.asarray(output.contents.fp32_contents, np.float32).reshape(batch, 6)
    np.testing.assert_array_equal(actions, _act(connected.stub, obs))
    assert (reply.model_name, reply.model_version, reply.id) == (MODEL_NAME, "1", "x")


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda r: r.inputs[0].contents.fp32_contents.__setitem__(3, float("nan")),
         grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite values at indices [3]"),
        (lambda r: r.inputs[0].contents.fp32_contents.pop(),
         grpc.StatusCode.INVALID_ARGUMENT, "has 25 fp32_contents values"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"),
         grpc.StatusCode.INVALID_ARGUMENT, "must be FP32"),
        (lambda r: setattr(r.inputs[0], "name", "observation"),
         grpc.StatusCode.INVALID_ARGUMENT, "one input 'obs'"),
        (lambda r: r.outputs.add(name="q"),
         grpc.StatusCode.INVALID_ARGUMENT, "one output 'action'"),
        (lambda r: r.raw_input_contents.append(b"\0" * 8),
         grpc.StatusCode.INVALID_ARGUMENT, "holds 8 bytes"),
        (lambda r: setattr(r, "model_name", "other"),
         grpc.StatusCode.NOT_FOUND, "serves 'mu-policy'"),
        (lambda r: setattr(r, "model_version", "2"),
         grpc.StatusCode.NOT_FOUND, "current version is 1"),
    ],
    ids=["nan", "short", "fp64", "input-name", "output-name", "raw-length", "model", "version"],
)  # fmt: skip
def test_model_infer_refuses_like_act(oip, mutate, code, needle) -> None:
    request = _request(_observations(1), raw=False)
    mutate(request)
    with pytest.raises(grpc.RpcError) as err:
        oip.ModelInfer(request, timeout=5)
    assert err.value.code() == code
    assert needle in err.value.details()


def test_nan_action_never_leaves_the_server(server_factory, nan_policy: Path) -> None:
    server = server_factory(nan_policy)
    with grpc.insecure_channel(server.target) as channel:
        obs = np.zeros((1, OBS_DIM), np.float32)
        obs[0, 0] = 1000.0  # the test policy outputs NaN for obs[0] > 100
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request(obs, raw=True), timeout=5)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "NaN action" in err.value.details()


def test_version_follows_hot_swap(connected, oip, make_policy) -> None:
    connected.stub.LoadPolicy(
        mu_pb.LoadPolicyRequest(path=str(make_policy("v2.onnx", seed=1))), timeout=10
    )
    assert not oip.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version="1"), timeout=5).ready
    assert oip.ModelReady(pb.ModelReadyRequest(name=MODEL_NAME, version="2"), timeout=5).ready
    meta = oip.ModelMetadata(pb.ModelMetadataRequest(name=MODEL_NAME), timeout=5)
    assert list(meta.versions) == ["2"]
    obs = _observations(1)
    reply = oip.ModelInfer(_request(obs, raw=True), timeout=5)
    assert reply.model_version == "2"
    actions = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(1, 6)
    np.testing.assert_array_equal(actions, _act(connected.stub, obs))


def test_health_and_metrics_know_the_service(connected, oip) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(connected.channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE_NAME), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    oip.ModelInfer(_request(_observations(1), raw=False), timeout=5)
    registry = connected.server.server.metrics.registry
    count = registry.get_sample_value(
        "mu_rpc_handler_seconds_count", {"method": "ModelInfer", "code": "OK"}
    )
    assert count == 1
