"""`make demo`: serve the bundled adaptive Panda policy (policies/panda_reach_adaptive: its input
holds the last observations and applied actions, which each lane builds) in a subprocess and
drive the simulated arm with it through both lanes.

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
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from controller.harness import POLICY, ServerProcess, serve_command
from controller.robot.client import Client, PolicyClient
from controller.robot.engine import LoopResult, run_loop
from controller.robot.local import LocalClient
from controller.robot.loop import WARM_TICKS, check_policy
from controller.robot.plants import SimPlant
from controller.robot.report import summarize

ENV_ID = "PandaReachDense-v3"
DEMO_POLICY = POLICY.parents[1] / "panda_reach_adaptive" / "policy.onnx"
RATES_HZ = (1000, 500, 250, 100, 50)


def measure_step_us(plant: SimPlant, client: Client, n: int = 300) -> tuple[float, float]:
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
        with LocalClient(address) as client:
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
    parser.add_argument("--policy", type=Path, default=DEMO_POLICY)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the loop runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_demo(args.policy, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
