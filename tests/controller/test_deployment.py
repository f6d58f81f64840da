"""docs/deployment.md: the Envoy example is well-formed and names the right ports and health
check (envoy itself is not run here), and replicas watching one shared policy file all move to a
promoted version (how a fine-tuned version reaches a fleet)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.service import SERVICE_NAME
from tests.controller.conftest import write_policy

yaml = pytest.importorskip("yaml", reason="needs the dev extra (pyyaml)")
ENVOY = Path(__file__).resolve().parents[2] / "docs" / "examples" / "envoy.yaml"


def test_envoy_example_structure() -> None:
    config = yaml.safe_load(ENVOY.read_text())
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == 50051
    (hcm,) = listener["filter_chains"][0]["filters"]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    blocked = {r["match"]["prefix"] for r in routes if "direct_response" in r}
    assert blocked == {f"/{SERVICE_NAME}/LoadPolicy", f"/{SERVICE_NAME}/RollbackPolicy"}
    assert routes[-1]["route"]["cluster"] == "mu_replicas"
    (cluster,) = config["static_resources"]["clusters"]
    assert cluster["name"] == "mu_replicas"
    options = cluster["typed_extension_protocol_options"]
    http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in http["explicit_http_config"]  # gRPC needs HTTP/2 upstream
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]
    assert ports == [50061, 50062, 50063]
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME


def _version(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return pb_grpc.ControllerStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=5).version


def test_replicas_follow_the_promoted_file(server_factory, tmp_path: Path) -> None:
    shared = write_policy(tmp_path / "promoted.onnx", seed=0)
    replicas = [server_factory(shared, watch=True, watch_interval_s=0.05) for _ in range(2)]
    assert [_version(r.target) for r in replicas] == [1, 1]
    # The operator promotes: write next to the file, then rename over it (atomic).
    write_policy(tmp_path / "next.onnx", seed=1)
    os.replace(tmp_path / "next.onnx", shared)
    deadline = time.monotonic() + 20
    while [_version(r.target) for r in replicas] != [2, 2]:
        assert time.monotonic() < deadline, "replicas did not load the promoted policy"
        time.sleep(0.05)
