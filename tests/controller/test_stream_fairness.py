"""ActStreams that write and never read their replies cannot starve a lock-step stream.

Counts only, no timing: while write-only streams send as fast as they can (one of them on the
lock-step stream's own connection), a lock-step stream makes its round trips; the write-only
streams together must be answered fewer times than it is. Before the server paused them, they
were answered at full speed: 2.4 to 3.2 times as often as the lock-step stream (2-core machine).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import grpc
import pytest

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

STEPS = 1000
WRITE_ONLY = 2


def _answered(server) -> int:
    value = server.server.metrics.registry.get_sample_value(
        "mu_rpc_handler_seconds_count", {"method": "ActStream", "code": "OK"}
    )
    return int(value or 0)


def test_streams_that_never_read_get_less_than_a_lock_step_stream(
    server_factory, policy_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = server_factory(policy_path)
    stop = threading.Event()
    flood_request = pb.ActRequest(obs=[0.0] * 26)

    def flood():
        while not stop.is_set():
            yield flood_request

    channels = [grpc.insecure_channel(server.target) for _ in range(WRITE_ONLY)]
    # the lock-step stream shares the first connection with a write-only one
    calls = [pb_grpc.ControllerStub(c).ActStream(flood(), timeout=300) for c in channels]
    requests: queue.SimpleQueue[pb.ActRequest | None] = queue.SimpleQueue()
    caplog.set_level(logging.WARNING, logger="controller.service")
    try:
        deadline = time.monotonic() + 60
        while _answered(server) < 2 * WRITE_ONLY:  # the write-only streams are under way
            assert time.monotonic() < deadline, "the write-only streams were never answered"
            time.sleep(0.01)
        replies = pb_grpc.ControllerStub(channels[0]).ActStream(
            iter(requests.get, None), timeout=300
        )
        before = _answered(server)
        for seq in range(1, STEPS + 1):
            requests.put(pb.ActRequest(obs=[0.01 * (seq % 7)] * 26, seq=seq))
            reply = next(replies)
            assert reply.seq == seq and not reply.HasField("error")
        write_only = _answered(server) - before - STEPS
        requests.put(None)
    finally:
        stop.set()
        for call, channel in zip(calls, channels, strict=True):
            call.cancel()
            channel.close()
    assert write_only < STEPS, (
        f"{WRITE_ONLY} write-only streams were answered {write_only} times while a lock-step "
        f"stream made {STEPS} round trips"
    )
    # what an operator sees: one warning per paused stream, and the pauses counted
    paused = [r.getMessage() for r in caplog.records if "pausing it" in r.getMessage()]
    assert len(paused) == WRITE_ONLY, paused
    assert "read each reply before sending the next request" in paused[0]
    counted = server.server.metrics.registry.get_sample_value("mu_actstream_paused_total")
    assert counted == server.server.service.paused_streams >= WRITE_ONLY
