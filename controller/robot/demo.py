"""`make demo`: serve the bundled Panda policy in a subprocess and drive the simulated arm with
it through both lanes.

Starts `mu serve` on a Unix socket, waits for its readiness line, measures how long one simulator
step and one round trip take, picks the highest control rate whose tick fits both at p99, then
runs the arm at that rate for a few seconds over the gRPC lane (ActStream: the server evaluates
the policy) and as long over the local lane (WatchPolicy: the server ships the policy, this
process evaluates it), prints both summaries side by side and stops the server with SIGINT.
Needs no torch.
"""

from __future__ import annotations

import argparse
import logging
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from controller.robot.client import PolicyClient
from controller.robot.loop import (
    WARM_TICKS,
    LoopResult,
    SimPlant,
    check_policy,
    run_loop,
    summarize,
)

log = logging.getLogger(__name__)

POLICY = Path(__file__).resolve().parents[2] / "policies" / "panda_reach" / "policy.onnx"
ENV_ID = "PandaReachDense-v3"
RATES_HZ = (1000, 500, 250, 100, 50)
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


def measure_step_us(plant: SimPlant, client: PolicyClient, n: int = 300) -> tuple[float, float]:
    """p99 of one simulator step and of one round trip, in µs (policy actions, back to back,
    after a warm-up of n // 3 steps)."""
    sim, rtt = [], []
    obs = plant.reset()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        action = client.act(obs)
        t1 = time.perf_counter_ns()
        obs, _, done, _ = plant.step(action)
        sim.append(time.perf_counter_ns() - t1)
        rtt.append(t1 - t0)
        if done:
            obs = plant.reset()
    warm = n // 3
    return float(np.percentile(sim[warm:], 99)) / 1e3, float(np.percentile(rtt[warm:], 99)) / 1e3


def pick_rate(sim_us: float, rtt_us: float) -> float:
    """The highest rate whose period holds one simulator step plus one round trip."""
    return next((r for r in RATES_HZ if 1e6 / r >= sim_us + rtt_us), RATES_HZ[-1])


def drive(address: str, seconds: float) -> dict[str, LoopResult]:
    """Check the served policy, pick the rate, run the simulated Panda through both lanes at it
    (one after the other, so they do not compete for the CPU)."""
    plant = SimPlant(ENV_ID, seed=0)
    results: dict[str, LoopResult] = {}
    try:
        with PolicyClient(address, deadline_s=5.0, stream=True) as client:
            check_policy(client, ENV_ID, plant.obs_dim)
            sim_us, rtt_us = measure_step_us(plant, client)
            rate = pick_rate(sim_us, rtt_us)
            print(
                f"simulator step p99 {sim_us:.0f} µs + round trip p99 {rtt_us:.0f} µs "
                f"-> {rate:g} Hz; {seconds:g} s on each lane",
                flush=True,
            )
            client.deadline_s = 1.0 / rate
            results["gRPC lane (ActStream)"] = run_loop(client, plant, rate, seconds=seconds)
        with PolicyClient(address, local=True) as client:
            check_policy(client, ENV_ID, plant.obs_dim)
            warm = plant.reset()
            for _ in range(WARM_TICKS):
                client.act(warm)
            results["local lane (WatchPolicy)"] = run_loop(client, plant, rate, seconds=seconds)
    finally:
        plant.close()
    return results


def side_by_side(results: dict[str, LoopResult]) -> str:
    """Both lanes' summaries as two columns."""
    summaries = {name: summarize(r) for name, r in results.items()}

    def row(s: dict) -> list[str]:
        a, m = s["round_trip_us"], s["misses"]
        ret = "n/a" if s["mean_return"] is None else f"{s['mean_return']:.3f}"
        success = "n/a" if s["success_rate"] is None else f"{s['success_rate']:.0%}"
        return [
            f"{s['achieved_rate_hz']:.0f} of {s['rate_hz']:g} Hz",
            f"{s['ticks']} in {s['seconds']:.1f} s",
            f"{a['p50']:.0f} / {a['p99']:.0f} / {a['p99.9']:.0f}",
            f"{s['sim_step_us']['p50']:.0f} / {s['sim_step_us']['p99']:.0f}",
            f"{m['total']} ({m['service']} action, {m['simulator']} sim, {m['late_wakeup']} wake)",
            str(m["fallbacks"]),
            f"{s['episodes']}, {ret}, {success}",
        ]

    labels = [
        "rate",
        "ticks",
        "action µs p50 / p99 / p99.9",
        "simulator step µs p50 / p99",
        "deadline misses",
        "fallbacks",
        "episodes, mean return, success",
    ]
    columns = {name: row(s) for name, s in summaries.items()}
    widths = [max(len(name), *(len(v) for v in col)) for name, col in columns.items()]
    lw = max(len(x) for x in labels)
    head = "  ".join(n.ljust(w) for n, w in zip(columns, widths, strict=True))
    lines = [(" " * lw + "  " + head).rstrip()]
    for i, label in enumerate(labels):
        cells = [col[i].ljust(w) for col, w in zip(columns.values(), widths, strict=True)]
        lines.append((label.ljust(lw) + "  " + "  ".join(cells)).rstrip())
    lines.append(
        "action = the ActStream round trip on the gRPC lane; the policy evaluated in this "
        "process on the local lane"
    )
    return "\n".join(lines)


def run_demo(policy: Path, seconds: float) -> int:
    if not policy.is_file():
        print(
            f"no policy at {policy}: train one with `mu train --env {ENV_ID}` and export it there",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="mu-demo-") as tmp:
        print(f"starting mu serve on {policy} ...", flush=True)
        server = ServerProcess(serve_command(policy, f"unix:{tmp}/mu.sock"))
        try:
            print(f"server ready on {server.address}", flush=True)
            results = drive(server.address, seconds)
        finally:
            code = server.stop()
        print(side_by_side(results))
        print(f"server stopped (exit code {code})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.robot.demo", description=__doc__)
    parser.add_argument("--policy", type=Path, default=POLICY)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the loop runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_demo(args.policy, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
