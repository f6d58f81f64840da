"""The serving benchmark (benchmarks/latency.py), the local lane: the robot loop evaluates the
policy the server ships (WatchPolicy).

Measured in the bench process (the robot), against servers in their own processes:
- the loop at 1 kHz and at 5 kHz (synthetic observations, controller/bench.py's `local_lane`):
  per-tick policy cost and misses; and the same loops with no policy and no server
  (controller/bench.py's `floor`): the misses of the machine alone;
- hot swaps every 100 ms under the 1 kHz loop, alternating two files with different sha256:
  failed ticks, and the time from LoadPolicy returning (in the admin's process) to the first
  tick that used the new version (CLOCK_MONOTONIC in both processes);
- SIGKILL of the server under the 1 kHz loop, then a restart serving another file on the same
  socket: ticks missed, and the time until the restarted server's policy is applied;
- `soak`: both lanes driven for a long time: resident memory at start and end, misses per minute.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.load import Swapper
from controller.bench import WARM_TICKS, local_client
from controller.harness import ServerProcess, serve_command
from controller.robot.client import PolicyClient
from controller.robot.engine import LoopResult, run_loop
from controller.robot.plants import SyntheticPlant
from controller.robot.report import summarize


def variant_policy(policy: Path, out: Path) -> Path:
    """The same network in a file with another sha256: a second ModelProto.doc_string field
    (field 6) appended; protobuf keeps the last occurrence, so the model is unchanged."""
    doc = b"mu bench: the same policy, another sha256"
    out.write_bytes(policy.read_bytes() + bytes([0x32, len(doc)]) + doc)
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def summary(result: LoopResult) -> dict[str, Any]:
    s = summarize(result)
    s.pop("returns")
    n = max(s["ticks"], 1)
    s["miss_fraction"] = s["misses"]["total"] / n
    return s


def hot_swap(
    target: str,
    obs_dim: int,
    policies: list[Path],
    rate_hz: float,
    interval_s: float,
    seconds: float,
    rt: dict[str, Any],
) -> dict[str, Any]:
    """LoadPolicy every interval_s (alternating `policies`) under the local loop."""
    client, plant = local_client(target, obs_dim)
    try:
        swapper = Swapper(target, policies, interval_s, seconds)
        result = run_loop(client, plant, rate_hz, seconds=seconds + 1.0, **rt)
        swaps, failed = swapper.result(timeout=seconds + 30)
    finally:
        client.close()
    ticks_at = result.start_ns + np.asarray(result.tick_ns)
    versions = np.asarray(result.version)
    delays_ms, unused = [], []
    for version, returned_ns in swapper.returned:
        used = np.flatnonzero(versions == version)
        if not len(used):
            unused.append(version)
            continue
        delays_ms.append((ticks_at[used[0]] - returned_ns) / 1e6)
    d = np.asarray(delays_ms) if delays_ms else np.zeros(1)
    return {
        "swaps": swaps,
        "failed_swaps": failed,
        "failed_ticks": result.fallbacks,
        "versions_never_used": unused,
        "in_use_after_ms": {
            "p50": float(np.percentile(d, 50)),
            "max": float(d.max()),
            "min": float(d.min()),
        },
        "loop": summary(result),
    }


def _keeper(conn: Connection, first: str, second: str, listen: str, kill_after_s: float) -> None:
    """In its own process: serve `first`, SIGKILL it on cue, restart serving `second`."""
    server = ServerProcess(serve_command(Path(first), listen))
    conn.send(server.address)
    conn.recv()  # go
    time.sleep(kill_after_s)
    killed_at = time.perf_counter_ns()
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait()
    restarted = ServerProcess(serve_command(Path(second), listen))
    conn.send((killed_at, time.perf_counter_ns()))
    conn.recv()  # stop
    restarted.stop()
    conn.send("stopped")


def kill_restart(
    policy: Path,
    other: Path,
    obs_dim: int,
    rate_hz: float,
    seconds: float,
    kill_after_s: float,
    rt: dict[str, Any],
) -> dict[str, Any]:
    """The server SIGKILLed under the local loop and restarted with `other` on the same socket."""
    import hashlib

    want = hashlib.sha256(other.read_bytes()).hexdigest()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="mu-bench-") as tmp:
        parent, child = ctx.Pipe()
        listen = f"unix:{tmp}/mu.sock"
        keeper = ctx.Process(
            target=_keeper, args=(child, str(policy), str(other), listen, kill_after_s),
            name="mu-keeper", daemon=True,
        )  # fmt: skip
        keeper.start()
        address = parent.recv()
        client, plant = local_client(address, obs_dim)
        try:
            parent.send("go")
            result = run_loop(client, plant, rate_hz, seconds=seconds, **rt)
            killed_at, ready_at = parent.recv()
            applied = [t for t, _, sha in client.watcher.history if sha == want]
            reconnects = client.watcher.reconnects
        finally:
            client.close()
            parent.send("stop")
            parent.recv()
            keeper.join(10)
    s = summary(result)
    # Which misses fell between the kill and the restarted server's file being applied (the
    # rest are the loop's background rate on this machine).
    period = 1e9 / rate_hz
    work = np.asarray(result.wake_ns) + np.asarray(result.rtt_ns) + np.asarray(result.sim_ns)
    at = result.start_ns + np.asarray(result.tick_ns)
    outage_end = applied[0] if applied else result.end_ns
    during = (at >= killed_at) & (at <= outage_end)
    return {
        "ticks": s["ticks"],
        "missed_ticks": s["misses"]["total"],
        "outage_ticks": int(during.sum()),
        "missed_during_outage": int((during & (work > period)).sum()),
        "failed_ticks": result.fallbacks,
        "restart_took_ms": (ready_at - killed_at) / 1e6,
        "applied": bool(applied),
        "applied_after_restart_ms": (applied[0] - ready_at) / 1e6 if applied else None,
        "applied_after_kill_ms": (applied[0] - killed_at) / 1e6 if applied else None,
        "reconnects": reconnects,
        "loop": s,
    }


def _grpc_soak(
    conn: Connection, target: str, obs_dim: int, rate_hz: float, seconds: float, segment_s: float
) -> None:
    """In its own process: the gRPC lane (ActStream) for `seconds`, in segments, after one
    warm-up segment."""
    with PolicyClient(target, deadline_s=1.0) as client:
        plant = SyntheticPlant(obs_dim)
        for _ in range(WARM_TICKS):
            client.act(plant.reset())
        client.deadline_s = 1.0 / rate_hz
        summarize(run_loop(client, plant, rate_hz, seconds=segment_s))  # warm-up, as a segment
        conn.send(rss_mb(os.getpid()))
        segments = []
        end = time.monotonic() + seconds
        while time.monotonic() < end - 1.0:
            s = summarize(run_loop(client, plant, rate_hz, seconds=min(segment_s, seconds)))
            segments.append({"ticks": s["ticks"], "misses": s["misses"]["total"],
                             "rss_mb": rss_mb(os.getpid())})  # fmt: skip
        conn.send((segments, rss_mb(os.getpid())))


def soak(
    policy: Path,
    obs_dim: int,
    seconds: float,
    rt: dict[str, Any],
    local_rate_hz: float = 1000.0,
    grpc_rate_hz: float = 500.0,
    segment_s: float = 60.0,
    log: Any = print,
) -> dict[str, Any]:
    """Both lanes against one server for `seconds` after one warm-up segment: memory at start
    (after the warm-up) and end, misses per segment (per minute with the default segment).
    `rt` applies to the local loop only (the gRPC loop runs in its own process with normal
    scheduling)."""
    server = ServerProcess(serve_command(policy, "127.0.0.1:0"))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    remote = ctx.Process(
        target=_grpc_soak, args=(child, server.address, obs_dim, grpc_rate_hz, seconds, segment_s),
        name="mu-soak-grpc", daemon=True,
    )  # fmt: skip
    try:
        remote.start()
        client, plant = local_client(server.address, obs_dim)
        # Warm-up: one segment of each lane, run and summarized exactly as the measured ones,
        # before the start figures: the allocator's heap grows once to what a segment needs.
        log(f"soak: {segment_s:g} s warm-up of both lanes ...")
        summarize(run_loop(client, plant, local_rate_hz, seconds=segment_s, **rt))
        grpc_start = parent.recv()
        start = {"server": rss_mb(server.process.pid), "local loop": rss_mb(os.getpid()),
                 "grpc loop": grpc_start}  # fmt: skip
        local_segments = []
        end = time.monotonic() + seconds
        while time.monotonic() < end - 1.0:
            seg = min(segment_s, seconds)
            s = summarize(run_loop(client, plant, local_rate_hz, seconds=seg, **rt))
            local_segments.append(
                {"ticks": s["ticks"], "misses": s["misses"]["total"],
                 "late_wakeup": s["misses"]["late_wakeup"], "policy": s["misses"]["service"],
                 "rss_mb": rss_mb(os.getpid()), "server_rss_mb": rss_mb(server.process.pid)}
            )  # fmt: skip
            log(
                f"soak: {len(local_segments) * segment_s:.0f} s, local misses "
                f"{s['misses']['total']}/{s['ticks']}, server RSS "
                f"{rss_mb(server.process.pid):.1f} MB"
            )
        grpc_segments, grpc_end = parent.recv()
        end_rss = {"server": rss_mb(server.process.pid), "local loop": rss_mb(os.getpid()),
                   "grpc loop": grpc_end}  # fmt: skip
        client.close()
    finally:
        remote.join(30)
        server.stop()
    return {
        "seconds": seconds,
        "segment_s": segment_s,
        "rates_hz": {"local": local_rate_hz, "grpc": grpc_rate_hz},
        "rss_mb_start": start,
        "rss_mb_end": end_rss,
        "growth_mb": {k: end_rss[k] - start[k] for k in start},
        # From the end of the first segment (every allocation pattern seen once) to the end.
        "growth_after_first_segment_mb": {
            "server": end_rss["server"] - local_segments[0]["server_rss_mb"],
            "local loop": end_rss["local loop"] - local_segments[0]["rss_mb"],
            "grpc loop": grpc_end - grpc_segments[0]["rss_mb"],
        },
        "misses_per_segment": {"local": local_segments, "grpc": grpc_segments},
    }
