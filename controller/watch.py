"""The server side of the local lane: what every WatchPolicy loop runs, from its acknowledgements.

Each PolicyUpdate carries a nonce; the loop answers it with AckPolicy (applied or refused), the
way xDS clients ACK/NACK a version_info. The registry keeps the last state per client_id, so
GetPolicy's `local_loops` (and the `mu_local_loops` gauge) show what runs where.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from dataclasses import dataclass

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from controller.decoding import clipped
from controller.policy import Policy
from controller.proto import controller_pb2 as pb

log = logging.getLogger(__name__)

# Nonces are remembered for this many updates (a late ack of an older one still counts).
MAX_NONCES = 4096
# Loops remembered; beyond this the disconnected ones that acked longest ago are forgotten, and
# while all of them are connected another is refused.
MAX_LOOPS = 1024
# Longest client_id accepted, and the longest refusal reason kept from an ack (characters): 1024
# loops then fit in a GetPolicy reply with room to spare.
MAX_CLIENT_ID = 256
MAX_ACK_ERROR = 1024


@dataclass
class _Loop:
    peer: str
    connected: int = 0  # open WatchPolicy streams under this client_id
    applied_version: int = 0
    applied_sha256: str = ""
    refused_version: int = 0
    refused_error: str = ""
    acked_at: float = 0.0


class LocalLoops:
    """Registry of local-lane loops; all methods run on the server's event loop."""

    def __init__(self) -> None:
        #: Random per server process: clients learn that versions restarted.
        self.server_id = secrets.token_hex(8)
        self._loops: dict[str, _Loop] = {}
        self._nonces: dict[str, tuple[int, str]] = {}
        self._counter = itertools.count(1)

    def opened(
        self, request: pb.WatchPolicyRequest, peer: str
    ) -> tuple[grpc.StatusCode, str] | None:
        """Register a WatchPolicy stream; (code, why) when it is refused."""
        client_id = request.client_id
        if len(client_id) > MAX_CLIENT_ID:
            return grpc.StatusCode.INVALID_ARGUMENT, (
                f"client_id has {len(client_id)} characters; at most {MAX_CLIENT_ID}"
            )
        loop = self._loops.get(client_id)
        if loop is None:
            gone = sorted((v.acked_at, k) for k, v in self._loops.items() if not v.connected)
            for _, forgotten in gone[: len(self._loops) - MAX_LOOPS + 1]:
                del self._loops[forgotten]
            if len(self._loops) >= MAX_LOOPS:
                return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                    f"{MAX_LOOPS} local loops are connected; no room for another"
                )
            loop = self._loops[client_id] = _Loop(peer)
        loop.peer = peer
        loop.connected += 1
        if request.running_version:  # what it kept running while it was away
            loop.applied_version = request.running_version
            loop.applied_sha256 = request.running_sha256[:64]
        log.info(
            "local loop %r watching from %s (runs version %d)",
            client_id,
            peer,
            request.running_version,
        )
        return None

    def closed(self, client_id: str) -> None:
        loop = self._loops.get(client_id)
        if loop is not None:
            loop.connected = max(loop.connected - 1, 0)

    def connected(self) -> int:
        return sum(1 for loop in self._loops.values() if loop.connected)

    def update(
        self,
        policy: Policy,
        *,
        max_delta: float | None,
        explore_std: float,
        explore_clip: float,
        finetune: bool,
    ) -> pb.PolicyUpdate:
        """The message that ships `policy` (and the settings that go with it) to one loop."""
        nonce = f"{self.server_id}-{next(self._counter)}"
        self._nonces[nonce] = (policy.version, policy.sha256)
        if len(self._nonces) > MAX_NONCES:
            del self._nonces[next(iter(self._nonces))]
        return pb.PolicyUpdate(
            nonce=nonce,
            version=policy.version,
            sha256=policy.sha256,
            onnx=policy.onnx,
            action_low=policy.low.tolist(),
            action_high=policy.high.tolist(),
            max_delta=max_delta or 0.0,
            explore_std=explore_std,
            explore_clip=explore_clip,
            finetune=finetune,
            source=policy.source,
            server_id=self.server_id,
        )

    def ack(self, ack: pb.PolicyAck, peer: str) -> str | None:
        """Record an acknowledgement; returns why it is not acceptable, or None."""
        if not ack.client_id:
            return "PolicyAck needs client_id"
        sent = self._nonces.get(ack.nonce)
        if sent is None:
            return f"unknown nonce {clipped(ack.nonce)!r}: not an update this server sent"
        if sent != (ack.version, ack.sha256):
            return (
                f"nonce {ack.nonce!r} was version {sent[0]} (sha256 {sent[1][:12]}), "
                f"not version {ack.version} (sha256 {clipped(ack.sha256, 12)})"
            )
        # Only a loop that opened WatchPolicy is recorded: acks cannot add loops past the cap.
        loop = self._loops.get(ack.client_id)
        if loop is None:
            return f"client_id {clipped(ack.client_id)!r} has no WatchPolicy stream on this server"
        loop.acked_at = time.time()
        if ack.applied:
            loop.applied_version, loop.applied_sha256 = ack.version, ack.sha256
        else:
            error = clipped(ack.error, MAX_ACK_ERROR)
            loop.refused_version, loop.refused_error = ack.version, error
            log.warning("local loop %r refused version %d: %s", ack.client_id, ack.version, error)
        return None

    def snapshot(self) -> list[pb.LocalLoop]:
        out = []
        for client_id, loop in self._loops.items():
            acked_at = Timestamp()
            if loop.acked_at:
                acked_at.FromNanoseconds(int(loop.acked_at * 1e9))
            out.append(
                pb.LocalLoop(
                    client_id=client_id,
                    peer=loop.peer,
                    connected=loop.connected > 0,
                    applied_version=loop.applied_version,
                    applied_sha256=loop.applied_sha256,
                    refused_version=loop.refused_version,
                    refused_error=loop.refused_error,
                    acked_at=acked_at,
                )
            )
        return out
