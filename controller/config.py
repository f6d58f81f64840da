"""ServeConfig: everything `mu serve` needs, validated on construction."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from controller.errors import UsageError
from controller.finetune.config import FinetuneConfig

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def parse_shifts(items: list[str]) -> dict[str, float]:
    """`KNOB=VALUE` flags of `mu eval --shift` onto {knob: value}. Raises UsageError."""
    out: dict[str, float] = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            raise UsageError(f"--shift {item!r}: expected KNOB=NUMBER, e.g. friction=0.5") from None
    return out


def parse_listen(listen: str) -> tuple[str, int | None]:
    """'HOST:PORT' -> (host, port); 'unix:PATH' -> (path, None). Raises UsageError."""
    if listen.startswith("unix:"):
        path = listen.removeprefix("unix:").removeprefix("//")
        if not path:
            raise UsageError(f"listen {listen!r}: unix: needs a socket path")
        return path, None
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"listen {listen!r} is not HOST:PORT (port 0-65535) or unix:PATH")
    return host.removeprefix("[").removesuffix("]"), int(port)


def is_local(listen: str) -> bool:
    """True for a Unix socket or a loopback address: reachable only from this machine."""
    host, port = parse_listen(listen)
    return port is None or host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass
class ServeConfig:
    """How to serve one policy file over gRPC."""

    #: The ONNX policy file served at start (contract 1), version 1.
    policy: Path
    #: Where to listen: "HOST:PORT" (port 0 picks a free port) or "unix:PATH".
    listen: str = DEFAULT_LISTEN
    #: Reload the policy when its file is replaced (polls mtime, inode and size).
    watch: bool = False
    #: Seconds between two polls of the policy file when `watch` is on.
    watch_interval_s: float = 1.0
    #: Slew limit on ActStream: per step and action dimension, in action units. None = off.
    max_delta: float | None = None
    #: While several ActStreams are open, run the requests that arrive together as one
    #: onnxruntime call (a lone stream is always answered inline, with no added wait).
    batching: bool = True
    #: File holding the bearer token for admin RPCs. Required unless listening on loopback/UDS.
    admin_token_file: Path | None = None
    #: PEM server certificate chain; with `tls_key`, the server speaks TLS only.
    tls_cert: Path | None = None
    #: PEM private key of `tls_cert`.
    tls_key: Path | None = None
    #: PEM CA bundle; when set, clients must present a certificate signed by it (mutual TLS).
    tls_client_ca: Path | None = None
    #: Port for Prometheus metrics over HTTP (0 = any free port); None = no metrics endpoint.
    metrics_port: int | None = None
    #: Largest message accepted or sent, in bytes; larger requests get RESOURCE_EXHAUSTED.
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Seconds that in-flight RPCs get to finish on shutdown.
    shutdown_grace_s: float = 2.0
    #: Seconds between the server's keepalive pings on each connection: a client that goes
    #: silent is disconnected within twice this (its WatchPolicy loop then shows disconnected).
    client_keepalive_s: float = 10.0
    #: Online fine-tuning (`--finetune CHECKPOINT`); None = off, and no torch is ever imported.
    finetune: FinetuneConfig | None = None

    def __post_init__(self) -> None:
        self.policy = Path(self.policy)
        for name in ("admin_token_file", "tls_cert", "tls_key", "tls_client_ca"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, Path(value))
                if not getattr(self, name).is_file():
                    raise UsageError(f"{name} {value} is not a readable file")
        if not self.policy.is_file():
            raise UsageError(f"policy {self.policy} is not a file")
        parse_listen(self.listen)
        if not is_local(self.listen) and self.admin_token_file is None:
            raise UsageError(
                f"listening on {self.listen} (beyond loopback) needs an admin token file "
                "(--admin-token-file) so that nobody else can swap the policy"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UsageError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.max_delta is not None and not (
            math.isfinite(self.max_delta) and self.max_delta > 0
        ):
            raise UsageError(f"max_delta must be a positive number, got {self.max_delta}")
        if not (math.isfinite(self.watch_interval_s) and self.watch_interval_s > 0):
            raise UsageError(f"watch_interval_s must be positive, got {self.watch_interval_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise UsageError(f"metrics_port must be 0-65535, got {self.metrics_port}")
        if self.max_message_bytes < 1024:
            raise UsageError(
                f"max_message_bytes must be at least 1024, got {self.max_message_bytes}"
            )
        if not (math.isfinite(self.client_keepalive_s) and self.client_keepalive_s >= 1):
            raise UsageError(
                f"client_keepalive_s must be at least 1 s, got {self.client_keepalive_s}"
            )
        if self.shutdown_grace_s < 0:
            raise UsageError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")

    def read_admin_token(self) -> str | None:
        """The token from `admin_token_file` (surrounding whitespace stripped), or None."""
        if self.admin_token_file is None:
            return None
        try:
            mode = self.admin_token_file.stat().st_mode
            token = self.admin_token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or e
            raise UsageError(f"cannot read admin_token_file {self.admin_token_file}: {why}") from e
        if mode & 0o077:
            log.warning(
                "admin token file %s can be read by other users (mode %o); chmod 600 it",
                self.admin_token_file,
                mode & 0o777,
            )
        if not token:
            raise UsageError(f"admin_token_file {self.admin_token_file} is empty")
        return token
