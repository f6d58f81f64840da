"""The service's protections, measured (issue 25's "done when" figures). Each subcommand prints
a table and writes JSON to --out:

    python -m benchmarks.hardening keepalive [--keepalive 1 5] [--trials 5]

keepalive: a local-lane loop behind a relay that, once cut, drops every byte and closes nothing
(a server that lost power); the time from the cut until the watcher notices, against the
documented bound of 2 × keepalive_s.
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


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


def _test_policy(directory: Path) -> Path:
    from tests.controller.conftest import write_policy

    return write_policy(directory / "policy.onnx")


def keepalive(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from controller.config import ServeConfig
    from controller.robot.client import PolicyClient
    from controller.server import start_in_thread

    server = start_in_thread(ServeConfig(policy=_test_policy(work), listen="127.0.0.1:0"))
    rows = []
    try:
        for keepalive_s in args.keepalive:
            for trial in range(args.trials):
                relay = Blackhole(server.target)
                try:
                    with PolicyClient(relay.target, local=True, keepalive_s=keepalive_s) as robot:
                        robot.act([0.0] * 26)
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hardening"))
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("keepalive", help="time for a local-lane loop to notice a vanished server")
    p.add_argument("--keepalive", type=float, nargs="+", default=[1.0, 5.0])
    p.add_argument("--trials", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = {"keepalive": keepalive}[args.what](args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.what}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
