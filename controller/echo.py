"""The transport floors: mu.v1.Controller servers that answer without inference (`mu bench`
measures the gRPC lane against the bare one; `make bench` against both).

Same grpc.aio server and options (`server_options`) as `mu serve`. The echo servicer decodes
each request and encodes a reply of act_dim values with the request's seq (the proto work
included). `--bare` is the floor docs/targets.md measures against: a generic handler with no
deserializer and no serializer, bytes in, pre-serialized bytes out; the only work per message is
finding where the request's seq field starts and appending those bytes to the pre-serialized
reply, so the same lock-step client can match replies by seq. Run it as a process:
`python -m controller.echo --listen 127.0.0.1:0 --act-dim 3 [--bare]`; it logs the readiness
line `serving echo version 0 on ADDRESS`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from controller.config import ServeConfig, parse_listen
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.server import server_options

log = logging.getLogger(__name__)


class EchoService(pb_grpc.ControllerServicer):
    def __init__(self, act_dim: int) -> None:
        self._action = [0.0] * act_dim

    async def Act(
        self, request: pb.ActRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActResponse:
        return pb.ActResponse(action=self._action, seq=request.seq, policy_version=1)

    async def ActStream(
        self, request_iterator: AsyncIterator[pb.ActRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ActResponse]:
        async for request in request_iterator:
            yield pb.ActResponse(action=self._action, seq=request.seq, policy_version=1)


def seq_field(raw: bytes) -> bytes:
    """The bytes of an ActRequest after its `obs` field (field 1, first on the wire as the
    client serializes it): field 2, `seq`, verbatim."""
    if not raw or raw[0] != 0x0A:  # no obs field
        return raw
    i, length, shift = 1, 0, 0
    while True:  # the length varint
        byte = raw[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            break
        shift += 7
    return raw[i + length :]


def bare_handler(act_dim: int) -> grpc.GenericRpcHandler:
    """ActStream and Act on raw bytes: no proto decoding or encoding per message."""
    reply = pb.ActResponse(action=[0.0] * act_dim, policy_version=1).SerializeToString()

    async def act_stream(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for raw in requests:
            yield reply + seq_field(raw)

    async def act(raw: bytes, context: Any) -> bytes:
        return reply + seq_field(raw)

    return grpc.method_handlers_generic_handler(
        "mu.v1.Controller",
        {
            "ActStream": grpc.stream_stream_rpc_method_handler(act_stream),
            "Act": grpc.unary_unary_rpc_method_handler(act),
        },
    )


async def serve_echo(listen: str, act_dim: int, bare: bool = False) -> None:
    # ServeConfig only for its server options; the policy path is never read.
    server = grpc.aio.server(options=server_options(ServeConfig(policy=Path(__file__))))
    if bare:
        server.add_generic_rpc_handlers((bare_handler(act_dim),))
    else:
        pb_grpc.add_ControllerServicer_to_server(EchoService(act_dim), server)
    host, port = parse_listen(listen)
    bound = server.add_insecure_port(listen)
    await server.start()
    address = listen if port is None else f"{host}:{bound}"
    log.info("serving echo version 0 on %s", address)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.stop(0.5)))
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--act-dim", type=int, required=True)
    parser.add_argument("--bare", action="store_true", help="bytes in, pre-serialized bytes out")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve_echo(args.listen, args.act_dim, args.bare))


if __name__ == "__main__":
    main()
