"""The service's protections, measured (issue 25's "done when" figures). Each subcommand prints
a table and writes JSON to --out:

    python -m benchmarks.hardening keepalive [--keepalive 1 5] [--trials 5]

    python -m benchmarks.hardening memory [--requests 400] [--values 1000000]

memory: a `mu serve` process's resident memory (VmRSS, and its peak VmHWM) before and after
`--requests` refused `Act`s of `--values` values each (4 MB: refused for their length), then
after as many valid `ActBatch`es of the same size.

    python -m benchmarks.hardening promotions [--trials 8]

promotions: a fine-tuning `mu serve` driven by one ActStream until versions get promoted, then
SIGKILLed at a random moment while promotions go on, and restarted on the same versions
directory, `--trials` times: what the restart serves against the last version the client saw.

    python -m benchmarks.hardening streams [--streams 16] [--seconds 10] [--rate 500]

streams: a lock-step ActStream loop at `--rate` Hz against a `mu serve`, alone and then beside
`--streams` streams that send requests as fast as they can and never read a reply; the loop's
round-trip p99 in both phases (same server, same run), and the server's resident memory.

keepalive: a local-lane loop behind a relay that, once cut, drops every byte and closes nothing
(a server that lost power); the time from the cut until the watcher notices, against the
documented bound of 2 × keepalive_s.
"""

from __future__ import annotations

import argparse
import json
import queue
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from controller.harness import POLICY, ServerProcess, serve_command


class Blackhole:
    """A TCP relay to a server that, once `cut`, drops every byte both ways and keeps the
    connections open: a server that vanished without closing anything (power cut, cable)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self.cut = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                near, _ = self._listener.accept()
            except OSError:  # closed
                return
            far = socket.create_connection(self._target)
            self._sockets += [near, far]
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


def keepalive(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from controller.config import ServeConfig
    from controller.robot.local import LocalClient
    from controller.server import start_in_thread

    server = start_in_thread(ServeConfig(policy=POLICY, listen="127.0.0.1:0"))
    rows = []
    try:
        for keepalive_s in args.keepalive:
            for trial in range(args.trials):
                relay = Blackhole(server.target)
                try:
                    with LocalClient(relay.target, keepalive_s=keepalive_s) as robot:
                        robot.act([0.0] * robot.policy.policy.obs_dim)
                        robot.watcher.wait_handled(1, timeout=30)
                        relay.cut.set()
                        cut = time.perf_counter()
                        while not robot.watcher.reconnects and time.perf_counter() - cut < 120:
                            time.sleep(0.005)
                        noticed = time.perf_counter() - cut
                finally:
                    relay.close()
                bound = 2 * keepalive_s + 1
                within = noticed <= bound
                rows.append(
                    {"keepalive_s": keepalive_s, "trial": trial, "noticed_s": noticed,
                     "bound_s": bound, "within": within}
                )  # fmt: skip
                print(
                    f"keepalive {keepalive_s:g} s  trial {trial}: noticed after {noticed:.2f} s "
                    f"(bound {bound:g} s) {'ok' if within else 'LATE'}"
                )
    finally:
        server.stop()
    return {"trials": rows, "all_within": all(r["within"] for r in rows)}


def _rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (resident now) and VmHWM (its peak) of process `pid`, in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import grpc
    import numpy as np

    from controller.proto import controller_pb2 as pb
    from controller.proto import controller_pb2_grpc as pb_grpc

    server = ServerProcess(serve_command(POLICY, "127.0.0.1:0"))
    address, pid = server.address, server.process.pid
    try:
        values = np.random.default_rng(0).normal(0, 1, args.values).astype(np.float32)
        with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)
        ]) as channel:  # fmt: skip
            stub = pb_grpc.ControllerStub(channel)
            obs_dim = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10).obs_dim
            start = _rss_mb(pid)
            refused = pb.ActRequest(obs=values.tolist())
            codes: dict[str, int] = {}
            for _ in range(args.requests):
                try:
                    stub.Act(refused, timeout=60)
                    code = "OK"
                except grpc.RpcError as e:
                    code = e.code().name
                codes[code] = codes.get(code, 0) + 1
            after_refused = _rss_mb(pid)
            batch = args.values // obs_dim
            valid = pb.ActBatchRequest(obs=values[: batch * obs_dim].tolist(), batch_size=batch)
            for _ in range(args.requests):
                stub.ActBatch(valid, timeout=60)
            after_valid = _rss_mb(pid)
    finally:
        server.stop()
    request_mb = 4 * args.values / 1e6
    result = {
        "request_mb": request_mb, "requests": args.requests, "refused_codes": codes,
        "start": start, "after_refused": after_refused, "after_valid": after_valid,
        "refused_growth_mb": after_refused["VmRSS"] - start["VmRSS"],
        "valid_rss_over_request": after_valid["VmRSS"] / request_mb,
    }  # fmt: skip
    print(f"server RSS: start {start['VmRSS']:.0f} MB; after {args.requests} refused "
          f"{request_mb:.0f} MB Acts ({codes}) {after_refused['VmRSS']:.0f} MB (peak "
          f"{after_refused['VmHWM']:.0f}); after {args.requests} valid ActBatches of the same "
          f"size {after_valid['VmRSS']:.0f} MB (peak {after_valid['VmHWM']:.0f})")  # fmt: skip
    return result


def _loop_round_trips(address: str, rate: float, seconds: float) -> list[float]:
    """A lock-step ActStream at `rate` Hz for `seconds`: each request's round trip in seconds."""
    import grpc
    import numpy as np

    from controller.proto import controller_pb2 as pb
    from controller.proto import controller_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.ControllerStub(channel)
        requests: queue.SimpleQueue[pb.ActRequest | None] = queue.SimpleQueue()
        replies = stub.ActStream(iter(requests.get, None), timeout=seconds + 60)
        obs = np.zeros(12).tolist()
        times, period = [], 1.0 / rate
        start = time.perf_counter()
        for i in range(int(seconds * rate)):
            delay = start + i * period - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            t0 = time.perf_counter()
            requests.put(pb.ActRequest(obs=obs, seq=i))
            next(replies)
            times.append(time.perf_counter() - t0)
        requests.put(None)
    return times


def _flood(address: str, streams: int, seconds: float, sent: Any) -> None:
    """`streams` ActStreams that send requests as fast as they can and never read a reply, for
    `seconds` (in its own process: the measured loop must not share a GIL with it)."""
    import grpc
    import numpy as np

    from controller.proto import controller_pb2 as pb
    from controller.proto import controller_pb2_grpc as pb_grpc

    request = pb.ActRequest(obs=np.zeros(12).tolist())
    end = time.monotonic() + seconds

    def requests():
        while time.monotonic() < end:
            with sent.get_lock():
                sent.value += 1
            yield request

    channels = [grpc.insecure_channel(address) for _ in range(streams)]
    stubs = [pb_grpc.ControllerStub(c) for c in channels]
    calls = [stub.ActStream(requests(), timeout=seconds + 60) for stub in stubs]
    time.sleep(seconds)
    for call, channel in zip(calls, channels, strict=True):
        call.cancel()
        channel.close()


def streams(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import multiprocessing

    import numpy as np

    server = ServerProcess(serve_command(POLICY, "127.0.0.1:0"))
    pid = server.process.pid
    try:
        _loop_round_trips(server.address, args.rate, 1.0)  # warm
        alone = _loop_round_trips(server.address, args.rate, args.seconds)
        start = _rss_mb(pid)
        context = multiprocessing.get_context("spawn")
        sent = context.Value("q", 0)
        flood = context.Process(
            target=_flood, args=(server.address, args.streams, args.seconds + 3, sent)
        )
        flood.start()
        time.sleep(2.0)  # the streams are open and flooding
        beside = _loop_round_trips(server.address, args.rate, args.seconds)
        during = _rss_mb(pid)
        flood.join(60)
    finally:
        server.stop()
    p99_alone, p99_beside = (float(np.percentile(t, 99)) * 1e3 for t in (alone, beside))
    result = {
        "rate_hz": args.rate, "streams": args.streams, "seconds": args.seconds,
        "p99_alone_ms": p99_alone, "p99_beside_ms": p99_beside,
        "p99_ratio": p99_beside / p99_alone, "requests_sent_by_write_only_streams": sent.value,
        "server_rss_mb": {"before": start, "during": during},
    }  # fmt: skip
    print(f"{args.rate:g} Hz loop p99: alone {p99_alone:.2f} ms, beside {args.streams} "
          f"write-only streams {p99_beside:.2f} ms (x{p99_beside / p99_alone:.2f}); those "
          f"streams sent {sent.value} requests; server RSS {start['VmRSS']:.0f} -> "
          f"{during['VmRSS']:.0f} MB")  # fmt: skip
    return result


def promotions(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import random
    import signal

    import grpc
    import numpy as np

    from controller.proto import controller_pb2 as pb
    from controller.proto import controller_pb2_grpc as pb_grpc

    agent = POLICY.with_name("agent.pt")
    fast = {"actor_warmup": 0, "candidate_every": 2, "batch_size": 32, "gate_states": 32,
            "chunk_size": 8, "learner_idle_priority": False, "rollback_window": 2}  # fmt: skip
    command = serve_command(POLICY, "127.0.0.1:0") + [
        "--finetune", str(agent), "--finetune-dir", str(work / "versions"),
        *[f"--finetune-set={k}={json.dumps(v)}" for k, v in fast.items()],
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    rows, seen = [], None
    for trial in range(args.trials):
        server = ServerProcess(command)
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ControllerStub(channel)
                restarted = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)
                if seen is not None:
                    rows.append({"trial": trial, "last_seen": seen, "restart_serves":
                                 restarted.version, "ok": restarted.version == seen})  # fmt: skip
                    print(f"restart {trial}: the client last saw version {seen}; the restarted "
                          f"server serves {restarted.version}")  # fmt: skip
                first, kill_at = restarted.version, None
                requests: queue.SimpleQueue[pb.ActRequest | None] = queue.SimpleQueue()
                replies = stub.ActStream(iter(requests.get, None), timeout=300)
                step = 0
                while kill_at is None or time.monotonic() < kill_at:
                    done = step % 5 == 4
                    obs = rng.normal(0, 0.1, 12).tolist()
                    requests.put(pb.ActRequest(obs=obs, reward=-1.0, truncated=done,
                                               final_obs=obs if done else []))  # fmt: skip
                    seen = next(replies).policy_version
                    step += 1
                    if kill_at is None and seen > first:  # promotions are under way
                        kill_at = time.monotonic() + random.uniform(0.0, 3.0)
                server.process.send_signal(signal.SIGKILL)
                server.process.wait(30)
                requests.put(None)
        finally:
            server.stop()
    server = ServerProcess(command)
    try:
        with grpc.insecure_channel(server.address) as channel:
            version = pb_grpc.ControllerStub(channel).GetPolicy(pb.GetPolicyRequest()).version
        rows.append({"trial": args.trials, "last_seen": seen, "restart_serves": version,
                     "ok": version == seen})  # fmt: skip
        print(f"restart {args.trials}: the client last saw version {seen}; the restarted "
              f"server serves {version}")  # fmt: skip
    finally:
        server.stop()
    return {"restarts": rows, "all_ok": all(r["ok"] for r in rows)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hardening"))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("keepalive", help="time for a local-lane loop to notice a vanished server")
    p.add_argument("--keepalive", type=float, nargs="+", default=[1.0, 5.0])
    p.add_argument("--trials", type=int, default=5)
    p = sub.add_parser("memory", help="server memory after refused and valid large requests")
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--values", type=int, default=1_000_000)
    p = sub.add_parser("streams", help="a loop's p99 beside streams that never read")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=500.0)
    p = sub.add_parser("promotions", help="SIGKILL during promotions, then restart")
    p.add_argument("--trials", type=int, default=8)
    args = parser.parse_args(argv)
    run = {"keepalive": keepalive, "memory": memory, "streams": streams,
           "promotions": promotions}[args.what]  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        result = run(args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.what}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
