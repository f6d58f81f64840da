"""The naive baseline: a sync unary gRPC server (default ThreadPoolExecutor) calling a torch MLP.

What a first attempt usually looks like: `grpc.server(ThreadPoolExecutor())`, torch with its
default threads, a tensor per request. Run as a process so torch stays out of the serving
process: `python -m benchmarks.naive --listen 127.0.0.1:0 --obs-dim 12 --act-dim 3`; it logs
`serving naive-torch version 0 on ADDRESS`.
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from controller.config import DEFAULT_MAX_MESSAGE_BYTES
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class NaiveService(pb_grpc.ControllerServicer):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(obs_dim, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, act_dim),
            torch.nn.Tanh(),
        ).eval()

    def Act(self, request: pb.ActRequest, context: grpc.ServicerContext) -> pb.ActResponse:
        with torch.no_grad():
            action = self.model(torch.tensor([list(request.obs)], dtype=torch.float32))[0]
        return pb.ActResponse(action=action.tolist(), seq=request.seq, policy_version=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--obs-dim", type=int, required=True)
    parser.add_argument("--act-dim", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    size = DEFAULT_MAX_MESSAGE_BYTES
    server = grpc.server(
        ThreadPoolExecutor(),
        options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
    )
    pb_grpc.add_ControllerServicer_to_server(NaiveService(args.obs_dim, args.act_dim), server)
    host, _, _ = args.listen.rpartition(":")
    port = server.add_insecure_port(args.listen)
    server.start()
    log.info("serving naive-torch version 0 on %s:%d", host, port)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
