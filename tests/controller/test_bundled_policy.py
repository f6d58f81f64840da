"""`mu serve` on the committed Panda policy answers a client that has no copy of our .proto."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

from controller.harness import ServerProcess

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "panda_reach" / "policy.onnx"

# Runs in its own interpreter: grpc, reflection and protobuf only, nothing of mu.
GENERIC_CLIENT = """
import json, sys
import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as r, reflection_pb2_grpc as rg

target, service, obs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
channel = grpc.insecure_channel(target)
stub = rg.ServerReflectionStub(channel)
listing = next(stub.ServerReflectionInfo(
    iter([r.ServerReflectionRequest(list_services="")]), timeout=10))
names = [s.name for s in listing.list_services_response.service]
reply = next(stub.ServerReflectionInfo(
    iter([r.ServerReflectionRequest(file_containing_symbol=service)]), timeout=10))
pool = descriptor_pool.DescriptorPool()
pending = {}
for raw in reply.file_descriptor_response.file_descriptor_proto:
    proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
    pending[proto.name] = proto
while pending:
    for name, proto in list(pending.items()):
        if all(dep not in pending for dep in proto.dependency):
            pool.Add(proto)
            del pending[name]
methods = pool.FindServiceByName(service).methods_by_name
def call(method, payload):
    req = message_factory.GetMessageClass(methods[method].input_type)
    res = message_factory.GetMessageClass(methods[method].output_type)
    rpc = channel.unary_unary(f"/{service}/{method}", request_serializer=req.SerializeToString,
                              response_deserializer=res.FromString)
    return json_format.MessageToDict(rpc(req(**payload), timeout=10))
print(json.dumps({"services": names, "policy": call("GetPolicy", {}),
                  "act": call("Act", {"obs": obs, "seq": 42})}))
"""


def test_mu_serve_bundled_panda_policy_answers_a_reflection_client(tmp_path):
    sess = ort.InferenceSession(str(POLICY))
    obs = np.random.default_rng(0).normal(0, 0.2, 12).astype(np.float32)
    want = sess.run(["action"], {"obs": obs[None]})[0][0]
    command = [sys.executable, "-m", "controller.cli", "serve", "--policy", str(POLICY)]
    server = ServerProcess([*command, "--listen", f"unix:{tmp_path}/mu.sock"])
    try:
        done = subprocess.run(
            [sys.executable, "-c", GENERIC_CLIENT, server.address, "mu.v1.Controller",
             json.dumps(obs.tolist())],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        assert server.stop() == 0
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "mu.v1.Controller" in out["services"]
    assert out["policy"]["envId"] == "PandaReachDense-v3"
    # 64-bit integers are strings in protobuf's JSON mapping
    assert int(out["act"]["seq"]) == 42 and int(out["act"]["policyVersion"]) == 1
    np.testing.assert_allclose(out["act"]["action"], want, atol=1e-6)
