"""Prometheus metrics for the control service: latency per RPC and status code, policy version.

One histogram observation per request is the whole hot-path cost: the count of each
(method, code) series doubles as the request count by status code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# 50 µs to 100 ms: loopback round trips sit in the low hundreds of microseconds.
BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2.5e-2, 1e-1)


class Metrics:
    """A private registry per server, so several servers in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._latency = Histogram(
            "mu_rpc_handler_seconds",
            "Time spent handling one request (one message on ActStream), by method and status",
            ("method", "code"),
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._version = Gauge(
            "mu_policy_version", "Version of the policy being served", registry=self.registry
        )
        self._local_loops = Gauge(
            "mu_local_loops",
            "Local-lane loops with an open WatchPolicy stream (GetPolicy lists what each runs)",
            registry=self.registry,
        )
        self._ok = {
            method: self._latency.labels(method, grpc.StatusCode.OK.name)
            for method in ("Act", "ActStream", "ActBatch", "ModelInfer")
        }

    def ok(self, method: str, seconds: float) -> None:
        self._ok[method].observe(seconds)

    def error(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self._latency.labels(method, code.name).observe(seconds)

    def set_version(self, version: int) -> None:
        self._version.set(version)

    def set_local_loops(self, n: int) -> None:
        self._local_loops.set(n)

    def serve_http(self, port: int, addr: str) -> tuple[int, Callable[[], None]]:
        """Expose /metrics on `addr:port` in a daemon thread; returns (bound port, stop)."""
        server, thread = start_http_server(port, addr=addr, registry=self.registry)
        bound = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", addr, bound)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        return bound, stop
