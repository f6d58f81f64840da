"""`mu bench`: at the robot's rate, with its policy, on this machine: which lane holds.

Serves the policy with `mu serve` in its own process on loopback, as on a robot computer, and
runs at `--rate`, one after the other for `--seconds` each: the floor (the same loop with no
policy and no server: the deadline misses this machine causes alone), the gRPC floor (the same
ActStream loop against a bare gRPC echo, controller/echo.py: what the transport costs alone),
the gRPC lane (ActStream round trips, client deadline one period) and the local lane
(WatchPolicy: the shipped policy evaluated in this process). Observations are synthetic, no
simulator: only the lanes are timed.

A lane holds when its deadline misses exceed the floor's by at most 0.1% of its ticks and its
p99 action time (round trip, or policy in this process) is below the period.

The lanes' pieces (`floor`, `grpc_lane`, `local_client`, `local_lane`, `machine`) are also what
the full serving benchmark (benchmarks/latency.py, `make bench`) runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from controller.errors import UsageError
from controller.harness import POLICY, ServerProcess, serve_command
from controller.policy import load_policy, read_policy_file
from controller.robot.client import Client, PolicyClient
from controller.robot.engine import LoopResult, run_loop
from controller.robot.local import LocalClient
from controller.robot.plants import SyntheticPlant
from controller.robot.report import summarize

# Untimed calls before each lane's loop: the stream opens, the policy's caches fill.
WARM_TICKS = 500
# A lane holds with at most this fraction of its ticks missed beyond the floor's (and its p99
# action time below the period).
MISS_MARGIN = 0.001


def machine() -> dict[str, Any]:
    """Cores, CPU model and load average: what a figure measured here depends on."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "load_avg_1m_start": os.getloadavg()[0]}


class _NoPolicy:
    """The floor's client: act() returns a constant, so the loop costs what run_loop costs with
    no policy at all. Its misses are the machine's (late wake-ups, stalls), not a lane's."""

    local = False
    misses = 0
    version = 0

    def __init__(self, act_dim: int) -> None:
        self._action = np.zeros(act_dim, np.float32)

    def act(self, obs: np.ndarray, *, episode_start: bool = False) -> np.ndarray:
        return self._action


def floor(obs_dim: int, act_dim: int, rate_hz: float, seconds: float, rt: dict) -> LoopResult:
    """The lanes' loop with no policy and no server (lane "no policy")."""
    result = run_loop(_NoPolicy(act_dim), SyntheticPlant(obs_dim), rate_hz, seconds=seconds, **rt)
    result.lane = "no policy"
    return result


def grpc_lane(
    target: str,
    obs_dim: int,
    rate_hz: float,
    seconds: float,
    rt: dict,
    *,
    warmup: int = WARM_TICKS,
    deadline_s: float | None = None,
) -> LoopResult:
    """ActStream at `rate_hz` for `seconds`; the client holds its last action after
    `deadline_s` (default: one period, as a real loop would)."""
    with PolicyClient(target, deadline_s=5.0, stream=True) as client:
        plant = SyntheticPlant(obs_dim)
        _warm(client, plant, warmup)
        client.deadline_s = deadline_s or 1.0 / rate_hz
        return run_loop(client, plant, rate_hz, seconds=seconds, **rt)


def echo_command(act_dim: int) -> list[str]:
    """The bare gRPC echo (controller/echo.py) in its own process: the gRPC lane's floor."""
    return [sys.executable, "-m", "controller.echo", "--listen", "127.0.0.1:0",
            "--act-dim", str(act_dim), "--bare"]  # fmt: skip


def local_client(target: str, obs_dim: int) -> tuple[LocalClient, SyntheticPlant]:
    """A local-lane client with the shipped policy, warmed up, and its plant."""
    client = LocalClient(target, call_deadline_s=30.0)
    plant = SyntheticPlant(obs_dim)
    _warm(client, plant, WARM_TICKS)
    return client, plant


def local_lane(target: str, obs_dim: int, rate_hz: float, seconds: float, rt: dict) -> LoopResult:
    """The local lane at `rate_hz` for `seconds` (its round trip is the policy's cost here)."""
    client, plant = local_client(target, obs_dim)
    try:
        return run_loop(client, plant, rate_hz, seconds=seconds, **rt)
    finally:
        client.close()


def _warm(client: Client, plant: SyntheticPlant, ticks: int) -> None:
    obs = plant.reset()
    for _ in range(ticks):
        obs = plant.step(client.act(obs))[0]


def verdict(lane: dict[str, Any], base: dict[str, Any]) -> tuple[bool, str]:
    """Whether a lane's summary holds its rate against the floor's (`base`), and why."""
    period_us = 1e6 / lane["rate_hz"]
    action = lane["round_trip_us"]["p99"]
    misses, floor_misses = _miss_fraction(lane), _miss_fraction(base)
    holds = misses - floor_misses <= MISS_MARGIN and action < period_us
    return holds, (
        f"{'holds' if holds else 'misses'} {lane['rate_hz']:g} Hz: {misses:.3%} of deadlines "
        f"missed ({lane['misses']['total']}/{lane['ticks']}), the floor {floor_misses:.3%}; "
        f"p99 action {action:.0f} µs, period {period_us:.0f} µs"
    )


def _miss_fraction(summary: dict[str, Any]) -> float:
    return summary["misses"]["total"] / max(summary["ticks"], 1)


def run_lanes(
    policy: Path, rate_hz: float, seconds: float, rt: dict, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """The floor and both lanes at `rate_hz`; their summaries and each lane's verdict."""
    # PolicyLoadError (a UsageError): a file that is not a servable policy
    probe = load_policy(read_policy_file(policy), source=str(policy), version=1)
    obs_dim, act_dim = probe.obs_dim, probe.act_dim
    out: dict[str, Any] = {
        "machine": machine(),
        "policy": {
            "file": str(policy),
            "env_id": probe.env_id,
            "obs_dim": obs_dim,
            "act_dim": act_dim,
        },
        "rate_hz": rate_hz,
        "seconds": seconds,
    }
    log(f"floor: {rate_hz:g} Hz for {seconds:g} s with no policy ...")
    lanes = {"floor": floor(obs_dim, act_dim, rate_hz, seconds, rt)}
    echo = ServerProcess(echo_command(act_dim))
    try:
        log(f"gRPC floor: {rate_hz:g} Hz for {seconds:g} s against a bare echo server ...")
        lanes["echo"] = grpc_lane(echo.address, obs_dim, rate_hz, seconds, rt)
        lanes["echo"].lane = "bare echo"
    finally:
        echo.stop()
    server = ServerProcess(serve_command(policy, "127.0.0.1:0"))
    try:
        log(f"gRPC lane: {rate_hz:g} Hz for {seconds:g} s ...")
        lanes["grpc"] = grpc_lane(server.address, obs_dim, rate_hz, seconds, rt)
        log(f"local lane: {rate_hz:g} Hz for {seconds:g} s ...")
        lanes["local"] = local_lane(server.address, obs_dim, rate_hz, seconds, rt)
    finally:
        server.stop()
    out["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    out["summaries"] = {name: summarize(result) for name, result in lanes.items()}
    for s in out["summaries"].values():
        s.pop("returns")  # no episodes on a synthetic plant
    base = out["summaries"]["floor"]
    out["verdicts"] = {}
    for name in ("grpc", "local"):
        holds, why = verdict(out["summaries"][name], base)
        out["verdicts"][name] = {"holds": holds, "why": why}
    return out


LANE_NAMES = {
    "floor": "floor (no policy)",
    "echo": "gRPC floor (echo)",
    "grpc": "gRPC lane",
    "local": "local lane",
}


def format_lanes(r: dict[str, Any]) -> str:
    m, p = r["machine"], r["policy"]
    lines = [
        f"mu bench: {p['file']} ({p['env_id']}, obs {p['obs_dim']}, act {p['act_dim']}) at "
        f"{r['rate_hz']:g} Hz, period {1e6 / r['rate_hz']:.0f} µs, {r['seconds']:g} s per lane",
        f"machine: {m['cores']} cores, {m['cpu']}; load average {m['load_avg_1m_start']:.2f} at "
        f"start, {m['load_avg_1m_end']:.2f} at end",
        "",
        f"{'':18} {'action µs p50 / p99 / p99.9':>28} {'wake-up µs p99':>15}  deadline misses",
    ]
    for name, s in r["summaries"].items():
        a, w, miss = s["round_trip_us"], s["wakeup_delay_us"], s["misses"]
        action = "-" if name == "floor" else f"{a['p50']:.0f} / {a['p99']:.0f} / {a['p99.9']:.0f}"
        fallbacks = f", {miss['fallbacks']} fallbacks" if name in ("echo", "grpc") else ""
        lines.append(
            f"{LANE_NAMES[name]:18} {action:>28} {w['p99']:15.0f}  {miss['total']} of "
            f"{s['ticks']} ({_miss_fraction(s):.3%}){fallbacks}"
        )
    lines.append(
        "action: the ActStream round trip on the gRPC lane and its floor (a bare gRPC echo: the "
        "same server settings, no decoding, no inference), the policy in this process on the "
        "local lane"
    )
    if "echo" in r["summaries"]:
        grpc_rt, echo_rt = (r["summaries"][k]["round_trip_us"] for k in ("grpc", "echo"))
        lines.append(
            "gRPC lane against its floor: "
            + ", ".join(
                f"{p} {grpc_rt[p]:.0f} µs = {grpc_rt[p] / echo_rt[p]:.2f}x the echo's "
                f"{echo_rt[p]:.0f}"
                for p in ("p50", "p99")
            )  # fmt: skip
        )
    base = r["summaries"]["floor"]
    if _miss_fraction(base) > MISS_MARGIN:
        lines.append(
            f"note: this machine alone misses {base['misses']['total']} of {base['ticks']} ticks "
            f"at {r['rate_hz']:g} Hz, more than {MISS_MARGIN:.1%}; pin the loop (--cpu, "
            "--rt-priority) or stop other work before trusting a verdict"
        )
    lines += [
        "",
        f"verdict (holds: misses at most {MISS_MARGIN:.1%} of ticks above the floor's and "
        "p99 action below the period):",
    ]
    for name, v in r["verdicts"].items():
        lines.append(f"  {LANE_NAMES[name]}: {v['why']}")
    return "\n".join(lines)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mu bench` flags."""
    parser.description = (
        "Both lanes at the robot's rate beside the machine's floor (the same loop with no "
        f"policy), and a verdict per lane: it holds when its misses exceed the floor's by at most "
        f"{MISS_MARGIN:.1%} of ticks and its p99 action time is below the period."
    )
    parser.add_argument("--rate", type=float, required=True, help="the robot's control rate, Hz")
    parser.add_argument(
        "--policy", type=Path, default=POLICY, help="ONNX policy (default: the bundled Panda one)"
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="how long each lane runs (default 10)"
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the loops' thread to CPU N")
    parser.add_argument(
        "--rt-priority", type=int, default=None, help="SCHED_FIFO priority for the loops"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def bench_from_args(args: argparse.Namespace) -> int:
    """`mu bench`: prints both lanes against the floor and a verdict per lane."""
    for flag in ("rate", "seconds"):
        value = getattr(args, flag)
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{flag} must be positive, got {value:g}")
    if not args.policy.is_file():
        raise UsageError(f"no policy at {args.policy}; pass --policy FILE.onnx")
    rt = {"cpu": args.cpu, "rt_priority": args.rt_priority}
    r = run_lanes(args.policy, args.rate, args.seconds, rt, log=lambda m: print(m, file=sys.stderr))
    print(format_lanes(r))
    if args.json is not None:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
