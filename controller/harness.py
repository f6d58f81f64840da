"""A server in a subprocess, for the demo, `mu bench` and the benchmarks: start `mu serve` (or a
baseline server that logs the same readiness line), wait until it is ready, stop it.

Needs no gRPC: the server is a process and its readiness line is on its stderr.
"""

from __future__ import annotations

import logging
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: The bundled Panda policy of a checkout: what the demo and the benchmarks serve by default.
POLICY = Path(__file__).resolve().parents[1] / "policies" / "panda_reach" / "policy.onnx"
READY = re.compile(r"serving (?P<policy>.+) version (?P<version>\d+) on (?P<address>\S+)")


def parse_ready(line: str) -> str | None:
    """The address from the server's readiness line, or None for any other line."""
    match = READY.search(line)
    return match.group("address") if match else None


def serve_command(policy: Path, listen: str) -> list[str]:
    """`mu serve` for this interpreter (works before the `mu` script is on PATH)."""
    return [sys.executable, "-m", "controller.cli", "serve", "--policy", str(policy),
            "--listen", listen]  # fmt: skip


class ServerProcess:
    """A server in a subprocess that logs the readiness line; its log goes to ours once up."""

    def __init__(self, command: list[str], timeout_s: float = 60.0) -> None:
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        # What the messages call it: "mu serve", or the module of a benchmark's baseline server.
        module = command[command.index("-m") + 1] if "-m" in command else command[0]
        self.name = "mu serve" if module == "controller.cli" else module
        # One thread reads stderr from the start: lines go to a queue until the server is ready,
        # then to our log. The pipe must keep draining, or a full pipe would block the server.
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="mu-serve-log", daemon=True)
        self._reader.start()
        try:
            self.address = self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if self._ready.is_set():
                log.debug("server: %s", line.rstrip())
            else:
                self._lines.put(line)
        self._lines.put(None)

    def _wait_ready(self, timeout_s: float) -> str:
        seen: list[str] = []
        end = time.monotonic() + timeout_s
        while True:
            try:
                line = self._lines.get(timeout=max(end - time.monotonic(), 0))
            except queue.Empty:
                raise TimeoutError(
                    f"{self.name} not ready after {timeout_s:.0f} s:\n" + "".join(seen)
                ) from None
            if line is None:  # the server exited before it was ready
                code = self.process.wait()
                raise RuntimeError(f"{self.name} exited with code {code}:\n" + "".join(seen))
            seen.append(line)
            address = parse_ready(line)
            if address is not None:
                self._ready.set()
                return address

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGINT, then wait; SIGKILL only if it does not stop in time. Returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
        return self.process.returncode
