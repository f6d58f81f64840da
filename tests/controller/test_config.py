"""ServeConfig validation: the refusals happen on construction."""

from pathlib import Path

import pytest

from controller.config import ServeConfig, is_local, parse_listen


def test_listen_forms() -> None:
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:50051") == ("::1", 50051)
    assert parse_listen("unix:/tmp/mu.sock") == ("/tmp/mu.sock", None)
    assert is_local("unix:/tmp/mu.sock") and is_local("localhost:1") and is_local("[::1]:1")
    assert not is_local("0.0.0.0:50051")
    for bad in ("50051", "host:port", "unix:", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_beyond_loopback_needs_a_token(policy_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="admin token"):
        ServeConfig(policy=policy_path, listen="0.0.0.0:0")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config = ServeConfig(policy=policy_path, listen="0.0.0.0:0", admin_token_file=token)
    assert config.read_admin_token() == "s3cret"


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"max_delta": 0.0}, "max_delta"),
        ({"max_delta": float("nan")}, "max_delta"),
        ({"watch_interval_s": 0}, "watch_interval_s"),
        ({"metrics_port": 70000}, "metrics_port"),
        ({"max_message_bytes": 10}, "max_message_bytes"),
        ({"listen": "nowhere"}, "HOST:PORT"),
        ({"tls_cert": "CERT"}, "go together"),
        ({"tls_client_ca": "CERT"}, "needs tls_cert"),
        ({"admin_token_file": "/nonexistent/token"}, "not a readable file"),
    ],
)
def test_bad_fields_are_refused(policy_path: Path, fields: dict, match: str) -> None:
    fields = {k: (policy_path if v == "CERT" else v) for k, v in fields.items()}
    with pytest.raises(ValueError, match=match):
        ServeConfig(policy=policy_path, **fields)


def test_missing_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a file"):
        ServeConfig(policy=tmp_path / "none.onnx")


def test_empty_token_file_is_refused(policy_path: Path, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        ServeConfig(policy=policy_path, admin_token_file=token).read_admin_token()
