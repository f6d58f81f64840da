"""Admin token and TLS refusals."""

from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.robot.client import PolicyClient


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
