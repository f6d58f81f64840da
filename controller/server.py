"""Build, start and stop the control server; the `mu serve` arguments and entry point.

`create_server(config)` only builds and binds (returns the bound port); `serve(config)` runs it
until a signal; `start_in_thread(config)` runs it on a private event loop for tests, benchmarks
and embedding. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from controller.config import (
    DEFAULT_LISTEN,
    DEFAULT_MAX_MESSAGE_BYTES,
    ServeConfig,
    is_local,
    parse_listen,
)
from controller.decoding import DecodeGuard
from controller.errors import UsageError
from controller.finetune.config import FinetuneConfig
from controller.finetune.manager import Finetuner, resume_policy
from controller.inference import INFERENCE_SERVICE_NAME, InferenceService
from controller.keepalive import keepalive_options
from controller.metrics import Metrics
from controller.policy import Policy
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.proto import grpc_service_pb2_grpc as inference_grpc
from controller.service import SERVICE_NAME, ControllerService
from controller.store import PolicyStore
from training.fields import parse_sets

log = logging.getLogger(__name__)

#: Longest wait of the serving loop for a GIL that another Python thread holds (see serve()).
GIL_SWITCH_S = 1e-4
T = TypeVar("T")


class BindError(RuntimeError):
    """gRPC cannot listen on the address (in use, no permission, no such directory)."""


def server_options(config: ServeConfig) -> list[tuple[str, Any]]:
    """gRPC channel arguments of the control server (use the same for a baseline echo server)."""
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # A second server on the same port must fail to bind, not silently share the traffic.
        ("grpc.so_reuseport", 0),
        # Each stream's receive window stays at HTTP/2's 64 KiB: with bandwidth-delay probing it
        # grows to megabytes, which a stream the server has stopped reading (an ActStream that
        # does not read its replies: controller.service) fills with requests nobody will read,
        # while its client keeps writing. Uploads then move 64 KiB per round trip.
        ("grpc.http2.bdp_probe", 0),
        # Local-lane loops ping their idle WatchPolicy stream (controller.robot.local) to notice
        # a vanished server; gRPC's default refuses pings more often than every 5 minutes.
        ("grpc.http2.min_ping_interval_without_data_ms", 500),
        # The server pings every connection too: one that stays silent (a client that lost
        # power or its cable) is closed, so its WatchPolicy stream ends and its loop shows
        # disconnected.
        *keepalive_options(config.client_keepalive_s),
    ]


def _read_pem(name: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {name} {path}: {e.strerror or e}") from e


def _server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = _read_pem("tls_client_ca", config.tls_client_ca) if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_pem("tls_key", config.tls_key), _read_pem("tls_cert", config.tls_cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class ControllerServer:
    """The gRPC server plus what lives beside it: policy store, health, metrics, file watcher."""

    def __init__(
        self,
        config: ServeConfig,
        grpc_server: grpc.aio.Server,
        store: PolicyStore,
        metrics: Metrics,
        health_servicer: health.aio.HealthServicer,
        address: str,
        finetuner: Finetuner | None = None,
    ) -> None:
        self.config = config
        self.finetuner = finetuner
        self.grpc_server = grpc_server
        self.store = store
        self.metrics = metrics
        self.address = address
        self.metrics_port: int | None = None
        #: The Controller servicer (set by create_server; tests read its batcher's counters).
        self.service: ControllerService | None = None
        self._health = health_servicer
        self._watch_task: asyncio.Task[None] | None = None
        self._stop_metrics: Callable[[], None] | None = None
        self._stopped = False

    async def start(self) -> None:
        await self.grpc_server.start()
        if self.finetuner is not None:
            self.finetuner.start()
        for name in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.watch:
            self._watch_task = asyncio.create_task(
                self.store.watch(self.config.policy, self.config.watch_interval_s)
            )
        if self.config.metrics_port is not None:
            host, port = parse_listen(self.config.listen)
            addr = host if port is not None else "127.0.0.1"
            try:
                self.metrics_port, self._stop_metrics = self.metrics.serve_http(
                    self.config.metrics_port, addr
                )
            except OSError as e:  # the port is taken, or needs privileges
                raise UsageError(
                    f"cannot serve metrics on {addr}:{self.config.metrics_port}: {e.strerror or e}"
                ) from e
        log.info(
            "serving %s version %d on %s",
            self.config.policy,
            self.store.current.version,
            self.address,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish for `grace` seconds, release all."""
        if self._stopped:
            return
        self._stopped = True
        await self._health.enter_graceful_shutdown()
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.grpc_server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self.finetuner is not None:
            await self.finetuner.stop()
        if self._stop_metrics is not None:
            self._stop_metrics()
        self.store.close()
        log.info("stopped serving on %s", self.address)

    async def wait_for_termination(self) -> None:
        await self.grpc_server.wait_for_termination()


async def create_server(config: ServeConfig) -> tuple[ControllerServer, int]:
    """Load and validate the policy, build the server and bind it; call inside the event loop.

    Returns the server (not yet started) and the bound TCP port (0 for a Unix socket).
    Raises UsageError for bad input (PolicyLoadError for a bad policy file; an unreadable
    token or TLS file), BindError (a RuntimeError) when the address cannot be bound.
    """
    metrics = Metrics()
    finetuner: Finetuner | None = None

    def on_swap(policy: Policy) -> None:
        metrics.set_version(policy.version)
        if finetuner is not None:
            finetuner.on_swap(policy)

    resumed = None if config.finetune is None else resume_policy(config.finetune)
    if resumed is None:
        store = PolicyStore.from_file(config.policy, on_swap=on_swap)
    else:  # a restart under fine-tuning serves the last committed version, not --policy
        policy, max_version = resumed
        store = PolicyStore(policy, on_swap=on_swap, next_version=max_version + 1)
        on_swap(policy)
    if config.finetune is not None:
        finetuner = Finetuner(
            config.finetune, store, logging.getLogger().getEffectiveLevel(), metrics
        )
    admin_token = config.read_admin_token()
    server = grpc.aio.server(options=server_options(config))
    service = ControllerService(
        store,
        metrics,
        max_delta=config.max_delta,
        admin_token=admin_token,
        batching=config.batching,
        finetune=finetuner,
    )
    # Undecodable request bytes answer INVALID_ARGUMENT (see controller/decoding.py).
    pb_grpc.add_ControllerServicer_to_server(service, DecodeGuard(server))
    inference_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(store, metrics), DecodeGuard(server)
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, DecodeGuard(server, streams=True))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            (SERVICE_NAME, INFERENCE_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        ),
        DecodeGuard(server, streams=True),
    )
    host, port = parse_listen(config.listen)
    bind = f"unix:{host}" if port is None else f"[{host}]:{port}" if ":" in host else config.listen
    credentials = _server_credentials(config)
    try:
        if credentials is None:
            bound = server.add_insecure_port(bind)
        else:
            bound = server.add_secure_port(bind, credentials)
    except RuntimeError as e:  # grpc's "Failed to bind to address"
        raise BindError(str(e)) from e
    if credentials is None and admin_token is not None and not is_local(config.listen):
        log.warning("admin token travels in clear text on %s; use TLS", config.listen)
    if port is None:
        address, bound = f"unix:{host}", 0
    else:
        address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"
    controller = ControllerServer(
        config, server, store, metrics, health_servicer, address, finetuner
    )
    controller.service = service
    return controller, bound


async def serve(config: ServeConfig, *, handle_signals: bool = True) -> None:
    """Run the server until SIGINT/SIGTERM (or cancellation), then stop gracefully."""
    # A thread running Python (a policy load, the gates, the learner's queue feeder) keeps the
    # GIL for up to the switch interval before the event loop gets it: 5 ms by default, half a
    # tick at 100 Hz. This process is the server's own, so the setting is ours to make.
    sys.setswitchinterval(GIL_SWITCH_S)
    server, _ = await create_server(config)
    await server.start()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop()))
    try:
        await server.wait_for_termination()
    finally:
        await server.stop()


class RunningServer:
    """A server running on its own event loop in a daemon thread (tests, benchmarks, embedding)."""

    def __init__(self, config: ServeConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mu-serve", daemon=True)
        self._thread.start()
        try:
            self.server, self.port = self.call(create_server(config))
            self.call(self.server.start())
        except BaseException:
            self._close_loop()
            raise
        self.target = self.server.address

    @property
    def policy(self) -> Policy:
        return self.server.store.current

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def stop(self, grace: float = 0.5) -> None:
        if self.loop.is_closed():
            return
        self.call(self.server.stop(grace))
        self._close_loop()

    def _close_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


def start_in_thread(config: ServeConfig) -> RunningServer:
    """Start a server in a background thread; returns once it accepts connections."""
    return RunningServer(config)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mu serve` flags (see ServeConfig for what each one means)."""
    parser.add_argument("--policy", type=Path, required=True, help="ONNX policy file to serve")
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help=f"HOST:PORT (port 0 = any free port) or unix:PATH (default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--watch", action="store_true", help="reload the policy when its file is replaced"
    )
    parser.add_argument(
        "--max-delta",
        type=float,
        default=None,
        help="ActStream slew limit per step and action dimension, in action units",
    )
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        help="one onnxruntime call per request even when several streams are open",
    )
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        help="bearer token for LoadPolicy/RollbackPolicy; required beyond loopback",
    )
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM server certificate")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM server private key")
    parser.add_argument(
        "--tls-client-ca",
        type=Path,
        default=None,
        help="PEM CA; clients must present a certificate it signed (mutual TLS)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=DEFAULT_MAX_MESSAGE_BYTES,
        help=f"largest request or reply in bytes (default {DEFAULT_MAX_MESSAGE_BYTES})",
    )
    parser.add_argument(
        "--client-keepalive-s",
        type=float,
        default=10.0,
        help="ping each connection this often; a client silent for as long is disconnected "
        "(default 10)",
    )
    tune = parser.add_argument_group("online fine-tuning (docs/finetuning.md)")
    tune.add_argument(
        "--finetune",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="learn from reported experience, starting from this training checkpoint (agent.pt)",
    )
    tune.add_argument(
        "--finetune-dir",
        type=Path,
        default=None,
        help="versions directory (default: versions/ next to the checkpoint)",
    )
    tune.add_argument(
        "--explore-std",
        type=float,
        default=0.0,
        help="Gaussian exploration on ActStream actions, in [-1, 1] units (default 0: off)",
    )
    tune.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other FinetuneConfig field, e.g. rollback_window=20 (repeatable)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default INFO)",
    )


def finetune_from_args(args: argparse.Namespace) -> FinetuneConfig | None:
    if args.finetune is None:
        if args.finetune_dir or args.explore_std or args.finetune_set:
            raise UsageError("--finetune-dir, --explore-std and --finetune-set need --finetune")
        return None
    extra = parse_sets(
        FinetuneConfig,
        args.finetune_set,
        "--finetune-set",
        exclude=("checkpoint", "versions_dir", "explore_std"),  # they have flags of their own
    )
    return FinetuneConfig(
        checkpoint=args.finetune,
        versions_dir=args.finetune_dir,
        explore_std=args.explore_std,
        **extra,
    )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        policy=args.policy,
        listen=args.listen,
        watch=args.watch,
        max_delta=args.max_delta,
        batching=args.batching,
        admin_token_file=args.admin_token_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        metrics_port=args.metrics_port,
        max_message_bytes=args.max_message_bytes,
        client_keepalive_s=args.client_keepalive_s,
        finetune=finetune_from_args(args),
    )


def serve_from_args(args: argparse.Namespace) -> int:
    """`mu serve`: blocks until SIGINT/SIGTERM; returns the process exit code.

    Logs `serving <policy> version N on <address>` once it accepts requests.
    """
    # for callers other than `mu` (whose main configures logging first, making this a no-op)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = config_from_args(args)
        asyncio.run(serve(config))
    except UsageError as e:  # bad flags, bad policy file (PolicyLoadError), unreadable token
        log.error("cannot serve: %s", e)
        return 2
    except BindError as e:
        log.error("cannot serve on %s: %s", args.listen, e)
        return 1
    return 0
