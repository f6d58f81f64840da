"""The loop engine: drive a plant at a fixed rate from a client's actions and record each tick.

Each tick: get the action (gRPC lane: a round trip over ActStream; local lane: the policy the
service shipped, evaluated in this process), apply it to the plant, then sleep to the next tick
boundary, an absolute deadline on a monotonic clock. A tick that overruns is not caught up with a
burst: the loop skips to the next boundary, as ros2_control does. The plant's step is timed apart
from the action's, so a simulator too slow for the rate is reported as such (report.py) instead
of as a service miss.

Real-time hygiene (controller/robot/realtime.py): no garbage collection inside ticks (what
warm-up left is frozen; young objects are collected in a tick's slack, everything between
episodes), `cpu` pins the loop's thread, `rt_priority` runs it SCHED_FIFO where permitted.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from controller.robot.client import Client
from controller.robot.realtime import collect_young, quiet_gc, realtime, sleep_until, spin_for


class Plant(Protocol):
    """What the loop drives: the robot (here simulated)."""

    def reset(self) -> np.ndarray: ...

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, float | None]:
        """Apply one action -> (next observation, reward, episode over, success or None)."""
        ...


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
    #: "grpc" (ActStream round trips), "local" (the shipped policy, in this process) or
    #: "no policy" (controller/bench.py's floor).
    lane: str = "grpc"
    #: Local lane: transitions reported, and dropped because the queue was full.
    reported: int = 0
    dropped: int = 0


_COLUMNS = ("tick_ns", "rtt_ns", "sim_ns", "wake_ns", "version")


def run_loop(
    client: Client,
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
            action = client.act(obs, episode_start=length == 0)
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
