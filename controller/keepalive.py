"""gRPC keepalive settings, shared by the server and the local lane's channel."""

from __future__ import annotations


def keepalive_options(seconds: float) -> list[tuple[str, int]]:
    """gRPC channel arguments for a connection that must notice a silent peer (power cut,
    cable pulled): a ping every `seconds`, also on idle streams, and the connection closed when
    one goes unanswered as long, so a dead peer is seen within 2 × `seconds`. gRPC times a
    ping out by `grpc.http2.ping_timeout_ms` (60 s by default), not by the keepalive timeout
    alone, so both are set."""
    ms = round(seconds * 1000)
    return [
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        ("grpc.http2.ping_timeout_ms", ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # an idle stream is what it is for
    ]
