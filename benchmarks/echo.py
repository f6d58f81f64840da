"""The transport floor: a mu.v1.Controller server that answers without inference.

Same grpc.aio server, same options (`server_options`) and same proto messages as `mu serve`;
Act and ActStream answer with an action of act_dim values and the request's seq. Run it as a
process: `python -m benchmarks.echo --listen 127.0.0.1:0 --act-dim 3`; it logs the readiness line
`serving echo version 0 on ADDRESS`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path

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


async def serve_echo(listen: str, act_dim: int) -> None:
    # ServeConfig only for its server options; the policy path is never read.
    server = grpc.aio.server(options=server_options(ServeConfig(policy=Path(__file__))))
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
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve_echo(args.listen, args.act_dim))


if __name__ == "__main__":
    main()
