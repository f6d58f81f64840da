"""Admin token and TLS refusals."""

from pathlib import Path

import grpc
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc


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
