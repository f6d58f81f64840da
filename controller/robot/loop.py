"""`mu loop`: a simulated robot gets its actions from the control service at a fixed rate and
reports timing.

Each tick: get the action (gRPC lane: a round trip over ActStream; local lane, `--local`: the
policy the service shipped, evaluated in this process), apply it to the plant (PyBullet, or a
synthetic plant for benchmarks), then sleep to the next tick boundary, an absolute deadline on a
monotonic clock. A tick that overruns is not caught up with a burst: the loop skips to the next
boundary, as ros2_control does. Simulator time is measured apart from the action's, so a
simulator too slow for the rate is reported as such instead of as a service miss.

Real-time hygiene (controller/robot/realtime.py): no garbage collection inside ticks (what
warm-up left is frozen; young objects are collected in a tick's slack, everything between
episodes), `--cpu N` pins the loop's thread, `--rt-priority P` runs it SCHED_FIFO where
permitted.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import numpy as np

from controller.robot.client import PolicyClient
from controller.robot.realtime import collect_young, quiet_gc, realtime, sleep_until, spin_for

log = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99, 99.9)
# Local lane: untimed calls before the loop (the policy's first calls fill the caches).
WARM_TICKS = 200


class Plant(Protocol):
    """What the loop drives: the robot (here simulated)."""

    def reset(self) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        """Apply one action -> (next observation, reward, episode over, success or None)."""
        ...


class SimPlant:
    """A Gymnasium env (training.envs.make_env: flat float32 observations, pybullet silenced)."""

    def __init__(self, env_id: str, seed: int = 0) -> None:
        from training.envs import is_success, make_env  # gymnasium + pybullet, no torch

        self.env = make_env(env_id, seed)
        self._is_success = is_success
        self._seed = seed
        self.obs_dim = int(self.env.observation_space.shape[0])
        #: Whether the last step ended the episode by a time limit (not a real termination).
        self.truncated = False

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self._seed)
        self._seed += 1
        return obs

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.truncated = bool(truncated) and not terminated
        return obs, float(reward), bool(terminated or truncated), self._is_success(info)

    def close(self) -> None:
        self.env.close()


class SyntheticPlant:
    """Random observations, no physics: isolates the service's timing (benchmarks)."""

    def __init__(self, obs_dim: int, seed: int = 0) -> None:
        self._obs = np.random.default_rng(seed).normal(0, 1, (64, obs_dim)).astype(np.float32)
        self._i = 0

    def reset(self) -> np.ndarray:
        return self._obs[0]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        self._i += 1
        return self._obs[self._i % len(self._obs)], 0.0, False, None


@dataclass
class LoopResult:
    """Per-tick timings (ns) and per-episode outcomes of one run."""

    rate_hz: float
    start_ns: int = 0
    end_ns: int = 0
    # Per tick (numpy int64, filled without allocating inside the loop):
    tick_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # from start_ns
    rtt_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # act()
    sim_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # plant.step
    wake_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # late start
    version: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # policy version
    skipped_ticks: int = 0
    fallbacks: int = 0  # act() answered by the client's fallback (deadline passed, server error)
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    #: Real-time settings that took effect (controller.robot.realtime.realtime).
    realtime: dict[str, Any] = field(default_factory=dict)
    #: "grpc" (ActStream round trips) or "local" (the shipped policy, in this process).
    lane: str = "grpc"
    #: Local lane: transitions reported, and dropped because the queue was full.
    reported: int = 0
    dropped: int = 0


_COLUMNS = ("tick_ns", "rtt_ns", "sim_ns", "wake_ns", "version")


def run_loop(
    client: PolicyClient,
    plant: Plant,
    rate_hz: float,
    *,
    episodes: int | None = None,
    seconds: float | None = None,
    ticks: int | None = None,
    cpu: int | None = None,
    rt_priority: int | None = None,
) -> LoopResult:
    """Drive `plant` at `rate_hz` until any of episodes / seconds / ticks is reached.

    `cpu` / `rt_priority` apply to this thread for the loop's duration (controller.robot.realtime).
    On the local lane, when the server fine-tunes, each step is reported (client.report).
    """
    if episodes is None and seconds is None and ticks is None:
        raise ValueError("give at least one of episodes, seconds, ticks")
    period = round(1e9 / rate_hz)
    spin = spin_for(period, cpu)
    end_by = None if seconds is None else round(seconds * 1e9)
    if ticks is not None:
        capacity = ticks
    elif seconds is not None:
        capacity = math.ceil(seconds * rate_hz) + 2
    else:
        capacity = 1 << 16
    # fill() writes every page now: np.zeros of a large block maps zero pages lazily, and the
    # page faults would land inside ticks.
    columns = np.empty((len(_COLUMNS), capacity), np.int64)
    columns.fill(0)
    clock = time.perf_counter_ns  # monotonic, ns resolution
    result = LoopResult(rate_hz, lane="local" if client.local else "grpc")
    report = client.report if client.local else None
    warm = client.warm if client.local and spin else None
    truncated_of = getattr(plant, "truncated", None) is not None
    obs = plant.reset()
    ret, length, n = 0.0, 0, 0
    misses_before = client.misses
    with realtime(cpu, rt_priority) as applied, quiet_gc():
        result.realtime = applied
        start = next_tick = clock()
        result.start_ns = start
        while True:
            t0 = clock()
            action = client.act(obs)
            t1 = clock()
            next_obs, reward, done, success = plant.step(action)
            t2 = clock()
            if n == capacity:  # episodes-bounded runs only: grow outside the common path
                columns = np.concatenate([columns, np.full_like(columns, 0)], axis=1)
                capacity *= 2
            columns[0, n] = t0 - start
            columns[1, n] = t1 - t0
            columns[2, n] = t2 - t1
            columns[3, n] = t0 - next_tick
            columns[4, n] = client.version
            n += 1
            if report is not None:
                truncated = done and truncated_of and plant.truncated  # type: ignore[attr-defined]
                if report(reward, next_obs, terminated=done and not truncated, truncated=truncated):
                    result.reported += 1
            obs = next_obs
            ret += reward
            length += 1
            if done:
                result.returns.append(ret)
                result.lengths.append(length)
                if success is not None:
                    result.successes.append(success)
                ret, length = 0.0, 0
                obs = plant.reset()
                gc.collect()  # between episodes, never inside a tick
            if (
                (episodes is not None and len(result.returns) >= episodes)
                or (ticks is not None and n >= ticks)
                or (end_by is not None and t2 - start >= end_by)
            ):
                break
            next_tick += period
            now = clock()
            if now > next_tick:  # overran: skip to the next boundary instead of bursting
                behind = (now - next_tick) // period + 1
                result.skipped_ticks += behind
                next_tick += behind * period
            elif next_tick - now > period // 2:
                collect_young()  # in the slack, when at least half a period is left
            if warm is not None:  # spinning on a CPU of its own: warm the caches, then spin
                sleep_until(next_tick - spin, clock)
                warm(obs)
            sleep_until(next_tick, clock, spin)
        result.end_ns = clock()
    for i, name in enumerate(_COLUMNS):  # views of the one block: no second allocation
        setattr(result, name, columns[i, :n])
    result.fallbacks = client.misses - misses_before
    if client.local:
        result.dropped = client.transitions_dropped
    return result


def _percentiles(values_ns: list[int]) -> dict[str, float]:
    a = np.asarray(values_ns, np.float64) / 1e3
    out = {f"p{p:g}": float(np.percentile(a, p)) for p in PERCENTILES}
    out.update(mean=float(a.mean()), max=float(a.max()))
    return out


def summarize(result: LoopResult) -> dict[str, Any]:
    """The report: rate, latency percentiles (µs), misses by cause, episodes."""
    period = 1e9 / result.rate_hz
    rtt = np.asarray(result.rtt_ns, np.float64)
    sim = np.asarray(result.sim_ns, np.float64)
    sim_typical = float(np.median(sim))
    wake = np.asarray(result.wake_ns, np.float64)
    late = rtt > period  # the reply alone took longer than a tick
    overran = wake + rtt + sim > period  # the tick's work ended after the next boundary
    # Whose fault: the simulator's when its step alone used the whole period (no budget left for
    # the round trip); the service's when the round trip took more than the simulator left of
    # the period; otherwise the tick started late (the OS woke the loop up late).
    simulator = overran & (sim >= period)
    service = overran & ~simulator & (rtt > period - sim)
    wakeup = overran & ~simulator & ~service
    elapsed = (result.end_ns - result.start_ns) / 1e9
    n = len(rtt)
    versions = np.unique(np.asarray(result.version))
    return {
        "lane": result.lane,
        "rate_hz": result.rate_hz,
        "ticks": n,
        "seconds": elapsed,
        "achieved_rate_hz": n / elapsed if elapsed > 0 else 0.0,
        "skipped_ticks": result.skipped_ticks,
        "round_trip_us": _percentiles(result.rtt_ns),
        "sim_step_us": _percentiles(result.sim_ns),
        "wakeup_delay_us": _percentiles(result.wake_ns),
        "sim_keeps_rate": sim_typical < period,
        "misses": {
            "total": int(overran.sum()),
            "service": int(service.sum()),
            "simulator": int(simulator.sum()),
            "late_wakeup": int(wakeup.sum()),
            "late_replies": int(late.sum()),
            "fallbacks": result.fallbacks,
            "service_fraction": float(service.sum() / n) if n else 0.0,
        },
        "episodes": len(result.returns),
        "mean_return": float(np.mean(result.returns)) if result.returns else None,
        "returns": result.returns,
        "success_rate": float(np.mean(result.successes)) if result.successes else None,
        "versions": [int(v) for v in versions[:20]],
        "realtime": result.realtime,
        "transitions": {"reported": result.reported, "dropped": result.dropped},
    }


def format_summary(s: dict[str, Any]) -> str:
    rt, sim, m = s["round_trip_us"], s["sim_step_us"], s["misses"]
    wake = s["wakeup_delay_us"]
    lines = [
        f"rate: {s['achieved_rate_hz']:.1f} Hz achieved of {s['rate_hz']:g} Hz "
        f"({s['ticks']} ticks in {s['seconds']:.2f} s, {s['skipped_ticks']} skipped)",
        ("policy in-process µs: " if s.get("lane") == "local" else "round trip µs: ")
        + "  ".join(f"{k} {rt[k]:.0f}" for k in ("p50", "p90", "p99", "p99.9", "max")),
        f"simulator step µs: p50 {sim['p50']:.0f}  p99 {sim['p99']:.0f}  max {sim['max']:.0f}",
        f"wake-up delay µs: p50 {wake['p50']:.0f}  p99 {wake['p99']:.0f}  max {wake['max']:.0f}",
        f"deadline misses: {m['total']} ({m['service']} service, {m['simulator']} simulator, "
        f"{m['late_wakeup']} late wake-up); late replies {m['late_replies']}, "
        f"fallbacks {m['fallbacks']}",
    ]
    if not s["sim_keeps_rate"]:
        lines.append(
            f"note: the simulator alone takes {sim['p50']:.0f} µs per step (p50), more than the "
            f"{1e6 / s['rate_hz']:.0f} µs period: this rate is out of the simulator's reach; "
            "those misses are the simulator's, not the service's"
        )
    rt_applied = {k: v for k, v in s.get("realtime", {}).items() if v is not None}
    if rt_applied.get("cpu") is not None or rt_applied.get("rt_priority") is not None:
        lines.append(
            "real time: "
            + ", ".join(f"{k} {rt_applied[k]}" for k in ("cpu", "rt_priority") if k in rt_applied)
        )
    reported = s.get("transitions", {})
    if reported.get("reported") or reported.get("dropped"):
        lines.append(
            f"transitions reported {reported['reported']}, dropped (queue full) "
            f"{reported['dropped']}"
        )
    if s["episodes"]:
        success = "n/a" if s["success_rate"] is None else f"{s['success_rate']:.0%}"
        lines.append(
            f"episodes: {s['episodes']}, mean return {s['mean_return']:.2f}, success {success}"
        )
    return "\n".join(lines)


def write_plot(result: LoopResult, path: Path) -> None:
    """Round-trip latency over time and its histogram. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = np.asarray(result.tick_ns) / 1e9
    rtt = np.asarray(result.rtt_ns) / 1e3
    period_us = 1e6 / result.rate_hz
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.plot(t, rtt, ".", ms=1.5)
    ax1.axhline(period_us, color="r", lw=0.8, label="period")
    ax1.set(xlabel="time (s)", ylabel="round trip (µs)", yscale="log", title="latency over time")
    ax1.legend()
    ax2.hist(rtt, bins=np.geomspace(max(rtt.min(), 1.0), rtt.max() * 1.01, 80))
    ax2.axvline(period_us, color="r", lw=0.8)
    ax2.set(xlabel="round trip (µs)", ylabel="ticks", xscale="log", yscale="log", title="histogram")
    fig.suptitle(f"mu loop at {result.rate_hz:g} Hz: {len(rtt)} ticks")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def check_policy(client: PolicyClient, env_id: str, obs_dim: int) -> None:
    """The served policy must be for this env (GetPolicy, or the shipped policy on the local
    lane); ValueError otherwise."""
    info = client.policy.policy if client.local else client.get_policy()
    if info.env_id != env_id:
        raise ValueError(
            f"the server at {client.target} serves a policy for {info.env_id!r}, "
            f"not {env_id!r}; serve a policy trained on {env_id} or pass --env {info.env_id}"
        )
    if info.obs_dim != obs_dim:
        raise ValueError(
            f"{env_id} gives {obs_dim} observation values; the served policy expects {info.obs_dim}"
        )


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mu loop` flags."""
    parser.add_argument("--env", required=True, help="Gymnasium id the policy was trained on")
    parser.add_argument("--target", required=True, help="server address, HOST:PORT or unix:PATH")
    parser.add_argument("--rate", type=float, required=True, help="control rate in Hz")
    parser.add_argument("--episodes", type=int, default=None, help="stop after N episodes")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--ticks", type=int, default=None, help="stop after N ticks")
    parser.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="per-step client deadline; after it the last action is held (default: the period)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="local lane: the server ships the policy (WatchPolicy), this process evaluates it",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="admin token for WatchPolicy/ReportTransitions (--local; when the server has one)",
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the loop's thread to CPU N")
    parser.add_argument(
        "--rt-priority",
        type=int,
        default=None,
        help="run the loop's thread SCHED_FIFO at this priority (1-99) where permitted",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of latency (matplotlib)")


def run_sim_loop(
    env_id: str,
    target: str,
    rate_hz: float,
    *,
    episodes: int | None = None,
    seconds: float | None = None,
    ticks: int | None = None,
    deadline_s: float | None = None,
    seed: int = 0,
    local: bool = False,
    token: str | None = None,
    cpu: int | None = None,
    rt_priority: int | None = None,
) -> LoopResult:
    """Connect, check the policy against the env, warm the stream up, run the loop."""
    if rate_hz <= 0 or not math.isfinite(rate_hz):
        raise ValueError(f"rate must be a positive number of Hz, got {rate_hz}")
    if episodes is None and seconds is None and ticks is None:
        episodes = 5
    plant = SimPlant(env_id, seed)
    try:
        deadline = deadline_s if deadline_s is not None else 1.0 / rate_hz
        with PolicyClient(
            target, deadline_s=deadline, stream=True, local=local, token=token, seed=seed
        ) as client:
            check_policy(client, env_id, plant.obs_dim)
            warm = plant.reset()
            client.deadline_s = 5.0  # the first call opens the stream: not a control tick
            for _ in range(WARM_TICKS if local else 1):
                client.act(warm)
            client.deadline_s = deadline
            return run_loop(
                client, plant, rate_hz, episodes=episodes, seconds=seconds, ticks=ticks,
                cpu=cpu, rt_priority=rt_priority,
            )  # fmt: skip
    finally:
        plant.close()


def loop_from_args(args: argparse.Namespace) -> int:
    """`mu loop`: prints the summary; returns the exit code. Raises ValueError for a policy
    that does not fit the env (or bad flags)."""
    try:
        result = run_sim_loop(
            args.env,
            args.target,
            args.rate,
            episodes=args.episodes,
            seconds=args.seconds,
            ticks=args.ticks,
            deadline_s=None if args.deadline_ms is None else args.deadline_ms / 1e3,
            seed=args.seed,
            local=args.local,
            token=None if args.token_file is None else args.token_file.read_text().strip(),
            cpu=args.cpu,
            rt_priority=args.rt_priority,
        )
    except (TimeoutError, PermissionError) as e:  # --local: no policy arrived, or refused
        print(f"mu loop: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:  # GetPolicy before the loop: the server is not there
        print(f"mu loop: no answer from {args.target}: {e.code().name}", file=sys.stderr)
        return 1
    summary = summarize(result)
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        try:
            write_plot(result, args.plot)
        except ImportError:
            print(
                "--plot needs matplotlib, which is not installed: pip install matplotlib",
                file=sys.stderr,
            )
            return 1
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.robot.loop", description=__doc__)
    add_loop_arguments(parser)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return loop_from_args(parser.parse_args(argv))
    except ValueError as e:
        print(f"mu loop: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
