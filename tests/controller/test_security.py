"""Admin token and TLS refusals."""

import logging
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.proto import grpc_service_pb2 as inference_pb
from controller.proto import grpc_service_pb2_grpc as inference_grpc
from controller.robot.client import PolicyClient
from tests.controller.conftest import policy_model


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin.token"
    path.write_text("let-me-in\n")
    return path


def test_admin_rpcs_need_the_token(server_factory, policy_path: Path, token_file: Path) -> None:
    server = server_factory(policy_path, admin_token_file=token_file)
    load = pb.LoadPolicyRequest(path=str(policy_path))
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for call, request in (
            (stub.LoadPolicy, load),
            (stub.RollbackPolicy, pb.RollbackPolicyRequest()),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as refused:
                call(request, timeout=5, metadata=(("authorization", "Bearer wrong"),))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=5).version == 1
        good = (("authorization", "Bearer let-me-in"),)
        assert stub.LoadPolicy(load, timeout=30, metadata=good).version == 2
        # Control RPCs never need the token.
        assert stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=5).policy_version == 2


def _tls_channel(target: str, certs, *, with_client_cert: bool) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.read_bytes(),
        private_key=certs.client_key.read_bytes() if with_client_cert else None,
        certificate_chain=certs.client_cert.read_bytes() if with_client_cert else None,
    )
    return grpc.secure_channel(target, credentials)


def test_tls_serves_and_refuses_plaintext(server_factory, policy_path: Path, certs) -> None:
    server = server_factory(policy_path, tls_cert=certs.server_cert, tls_key=certs.server_key)
    with _tls_channel(server.target, certs, with_client_cert=False) as channel:
        reply = pb_grpc.ControllerStub(channel).Act(pb.ActRequest(obs=[0.0] * 26), timeout=10)
        assert len(reply.action) == 6
    with grpc.insecure_channel(server.target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ControllerStub(channel).Act(pb.ActRequest(obs=[0.0] * 26), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_client_without_certificate(
    server_factory, policy_path: Path, certs
) -> None:
    server = server_factory(
        policy_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )
    with _tls_channel(server.target, certs, with_client_cert=True) as channel:
        reply = pb_grpc.ControllerStub(channel).Act(pb.ActRequest(obs=[0.0] * 26), timeout=10)
        assert len(reply.action) == 6
    with _tls_channel(server.target, certs, with_client_cert=False) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.ControllerStub(channel).Act(pb.ActRequest(obs=[0.0] * 26), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def mtls_server(server_factory, policy_path: Path, certs):
    return server_factory(
        policy_path,
        tls_cert=certs.server_cert,
        tls_key=certs.server_key,
        tls_client_ca=certs.ca,
    )


@pytest.mark.parametrize("as_bytes", [False, True])
def test_client_tls_with_client_certificate_and_server_name(
    mtls_server, policy_path: Path, certs, as_bytes: bool
) -> None:
    """PolicyClient's TLS options: CA, client certificate and key (paths or PEM bytes), and a
    server_name the certificate holds (localhost) other than the host dialled (127.0.0.1)."""
    pem = (lambda p: p.read_bytes()) if as_bytes else (lambda p: p)
    want = ort.InferenceSession(str(policy_path), providers=["CPUExecutionProvider"]).run(
        ["action"], {"obs": np.zeros((1, 26), np.float32)}
    )[0][0]
    with PolicyClient(
        mtls_server.target,
        deadline_s=10,
        root_certificates=pem(certs.ca),
        client_cert=pem(certs.client_cert),
        client_key=pem(certs.client_key),
        server_name="localhost",
    ) as client:
        assert client.get_policy().obs_dim == 26
        np.testing.assert_allclose(client.act([0.0] * 26), want, atol=1e-6)  # the stream path
        assert client.misses == 0


@pytest.mark.parametrize(
    "refused",
    ["no client certificate", "server name not in the certificate", "plaintext"],
)
def test_client_tls_refusals(mtls_server, certs, refused: str) -> None:
    options = {
        "root_certificates": certs.ca,
        "client_cert": certs.client_cert,
        "client_key": certs.client_key,
    }
    if refused == "no client certificate":
        del options["client_cert"], options["client_key"]
    elif refused == "server name not in the certificate":
        options["server_name"] = "robot.example"
    else:
        options = {}
    with PolicyClient(mtls_server.target, deadline_s=5, **options) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.get_policy()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_cert_needs_its_key(certs) -> None:
    with pytest.raises(ValueError, match="client_cert and client_key go together"):
        PolicyClient("unix:unused.sock", root_certificates=certs.ca, client_cert=certs.client_cert)


def test_a_token_file_others_can_read_gets_a_warning(
    server_factory, policy_path: Path, tmp_path: Path, caplog
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="controller.config"):
        server_factory(policy_path, admin_token_file=token)
    assert "can be read by other users" not in caplog.text
    token.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="controller.config"):
        server_factory(policy_path, admin_token_file=token)
    assert f"admin token file {token} can be read by other users (mode 644)" in caplog.text


def _non_utf8_metadata() -> bytes:
    data = policy_model(0, metadata={"mu.algo": "ZZZZ"}).SerializeToString()
    return data.replace(b"ZZZZ", b"\xff\xfe\xfd\xfc")


def test_no_input_gets_unknown_and_no_message_echoes_a_whole_input(connected) -> None:
    """A NUL byte in a path, metadata that is not UTF-8 and a train_steps of 1e999 answered
    UNKNOWN (the last one also broke GetPolicy); a 1 MB path or model name was echoed whole."""
    stub = connected.stub
    for request, code in (
        (pb.LoadPolicyRequest(path="policy\0.onnx"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.LoadPolicyRequest(onnx=_non_utf8_metadata()), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.LoadPolicyRequest(path="p" * 1_000_000), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            stub.LoadPolicy(request, timeout=30)
        assert refused.value.code() == code, refused.value.details()
        assert len(refused.value.details()) < 1000
    huge = policy_model(0, metadata={"mu.train_steps": "1e999"}).SerializeToString()
    assert stub.LoadPolicy(pb.LoadPolicyRequest(onnx=huge), timeout=30).train_steps == 0
    assert stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).version == 2

    infer = inference_grpc.GRPCInferenceServiceStub(connected.channel)
    with pytest.raises(grpc.RpcError) as refused:
        infer.ModelInfer(inference_pb.ModelInferRequest(model_name="m" * 1_000_000), timeout=10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(refused.value.details()) < 1000
