"""Load generators for the serving benchmark (latency.py), each in its own process (a client
process would share its GIL and distort both sides).

LoadPool keeps N spawned robot processes that run lock-step ActStream calls on command;
`swap_policies` is the admin that hot-swaps the policy at a fixed interval.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import numpy as np

from controller.robot.client import PolicyClient


@dataclass
class Burst:
    """One command to a robot: warm up until start_at, measure until end_at (time.monotonic)."""

    target: str
    obs_dim: int
    start_at: float
    end_at: float


def _robot(conn: Connection, seed: int) -> None:
    conn.send("ready")  # imports done: the pool can start timing bursts
    while True:
        burst: Burst | None = conn.recv()
        if burst is None:
            return
        rows = np.random.default_rng(seed).normal(0, 1, (64, burst.obs_dim)).tolist()
        latencies: list[int] = []
        with PolicyClient(burst.target, deadline_s=1.0, stream=True) as client:
            i = 0
            while time.monotonic() < burst.start_at:  # warm-up: connect, fill caches
                client.act(rows[i % 64])
                i += 1
            clock = time.perf_counter_ns
            while time.monotonic() < burst.end_at:
                t0 = clock()
                client.act(rows[i % 64])
                latencies.append(clock() - t0)
                i += 1
            conn.send((np.asarray(latencies, np.int64), client.misses))


class LoadPool:
    """`size` robot processes, started once (spawn: no gRPC state is forked)."""

    def __init__(self, size: int) -> None:
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_robot, args=(child, i), name=f"mu-robot-{i}", daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for conn in self._conns:
            conn.recv()

    def run(
        self, target: str, obs_dim: int, clients: int, seconds: float, warmup_s: float
    ) -> tuple[np.ndarray, int, float]:
        """`clients` robots at once -> (latencies ns, fallbacks, measured seconds)."""
        start = time.monotonic() + warmup_s
        burst = Burst(target, obs_dim, start, start + seconds)
        for conn in self._conns[:clients]:
            conn.send(burst)
        results = [conn.recv() for conn in self._conns[:clients]]
        latencies = np.concatenate([r[0] for r in results])
        return latencies, sum(r[1] for r in results), seconds

    def close(self) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(10)


def _swapper(
    target: str, policies: list[str], interval_s: float, seconds: float, out: mp.Queue
) -> None:
    swaps, failed, returned = 0, [], []
    with PolicyClient(target, call_deadline_s=5.0) as admin:
        end = time.monotonic() + seconds
        next_at = time.monotonic()
        while next_at < end:
            try:
                info = admin.load_policy(policies[swaps % len(policies)])
                # CLOCK_MONOTONIC: comparable with the loop process's perf_counter_ns on Linux
                returned.append((info.version, time.perf_counter_ns()))
                swaps += 1
            except grpc.RpcError as e:
                failed.append(f"{e.code().name}: {e.details()}")
            next_at += interval_s
            time.sleep(max(next_at - time.monotonic(), 0.0))
    out.put((swaps, failed, returned))


class Swapper:
    """A process that calls LoadPolicy every interval_s for `seconds`, cycling through
    `policy` (one path or several)."""

    def __init__(
        self, target: str, policy: Path | list[Path], interval_s: float, seconds: float
    ) -> None:
        ctx = mp.get_context("spawn")
        self._out: mp.Queue = ctx.Queue()
        policies = [str(p) for p in (policy if isinstance(policy, list) else [policy])]
        self._proc = ctx.Process(
            target=_swapper,
            args=(target, policies, interval_s, seconds, self._out),
            name="mu-swapper",
            daemon=True,
        )
        self._proc.start()
        #: (version, perf_counter_ns when LoadPolicy returned) per successful swap.
        self.returned: list[tuple[int, int]] = []

    def result(self, timeout: float) -> tuple[int, list[str]]:
        """(successful swaps, errors of the failed ones)."""
        swaps, failed, self.returned = self._out.get(timeout=timeout)
        self._proc.join(10)
        return swaps, failed
