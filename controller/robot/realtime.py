"""Real-time hygiene for a Python control loop (what `mu loop` does; use it in your own loops).

    with realtime(cpu=1, rt_priority=80) as applied, quiet_gc():
        ... warm up, then tick on absolute deadlines (sleep_until) ...
        gc.collect() between episodes, never inside a tick

- `quiet_gc()`: collect once, `gc.freeze()` what warm-up left (imports, sessions), then no
  automatic collection; `collect_young()` runs in a tick's slack, `gc.collect()` between episodes.
- `realtime(cpu, rt_priority)`: for the calling thread only (background threads keep their
  scheduling): pin to one CPU and move the process's other threads off it (the policy watcher,
  the transition reporter, gRPC's pollers: a thread woken on the loop's CPU would hold the GIL
  while the loop preempts it), SCHED_FIFO at a priority (needs root or CAP_SYS_NICE, or an
  rtprio limit: `ulimit -r`; refused gives a warning and normal scheduling), a 1 ns timer slack
  (Linux rounds sleeps up by 50 µs otherwise), and a 100 µs GIL switch interval, so a background
  thread hands the GIL back within 100 µs instead of 5 ms. Everything is restored on exit.
  Start background threads before entering: a thread started inside inherits the loop's CPU
  and priority.
- `sleep_until(deadline_ns, clock, spin_ns)`: an absolute deadline on a monotonic clock; a late tick
  does not push the next one back. With `spin_ns`, it sleeps until `spin_ns` before the deadline
  and spins the rest: a sleeping vCPU wakes 50-100 µs late on a VM, a spinning one does not.
  Spin only on a CPU of the loop's own (`--cpu`), and a fraction of the period: SCHED_FIFO
  threads that never sleep are throttled by the kernel (sched_rt_runtime_us: 50 ms a second).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from controller.errors import UsageError

log = logging.getLogger(__name__)

PR_SET_TIMERSLACK, PR_GET_TIMERSLACK = 29, 30
SWITCH_INTERVAL_S = 1e-4
# Spin before a deadline when the loop owns its CPU: at most this, and a quarter of the period.
SPIN_NS = 200_000
# Young objects allowed before collect_young() collects them in a tick's slack.
YOUNG_LIMIT = 5000


def _prctl() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


@contextmanager
def realtime(cpu: int | None = None, rt_priority: int | None = None) -> Iterator[dict[str, Any]]:
    """Apply the settings to the calling thread; yields what was applied (for the report).
    UsageError for a CPU this process may not run on or a priority out of range."""
    applied: dict[str, Any] = {"cpu": None, "rt_priority": None, "timer_slack_ns": None}
    tid = 0  # 0 = the calling thread for sched_* and prctl on Linux
    old_affinity = old_policy = old_param = old_slack = None
    moved: dict[int, set[int]] = {}
    old_switch = sys.getswitchinterval()
    prctl = _prctl()
    try:
        if cpu is not None:
            if not hasattr(os, "sched_setaffinity"):
                raise UsageError("--cpu needs Linux (sched_setaffinity)")
            available = os.sched_getaffinity(tid)
            if cpu not in available:
                raise UsageError(f"--cpu {cpu}: this process may run on CPUs {sorted(available)}")
            old_affinity = available
            os.sched_setaffinity(tid, {cpu})
            applied["cpu"] = cpu
            moved = _move_other_threads(cpu)
            applied["threads_moved"] = len(moved)
        if rt_priority is not None:
            if not hasattr(os, "SCHED_FIFO"):
                raise UsageError("--rt-priority needs Linux (SCHED_FIFO)")
            low, high = (os.sched_get_priority_min(os.SCHED_FIFO),
                         os.sched_get_priority_max(os.SCHED_FIFO))  # fmt: skip
            if not low <= rt_priority <= high:
                raise UsageError(f"--rt-priority must be in [{low}, {high}], got {rt_priority}")
            old_policy, old_param = os.sched_getscheduler(tid), os.sched_getparam(tid)
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(rt_priority))
                applied["rt_priority"] = rt_priority
            except PermissionError:
                old_policy = None
                log.warning(
                    "SCHED_FIFO priority %d refused: run as root, grant CAP_SYS_NICE "
                    "(setcap cap_sys_nice+ep on the interpreter) or raise the rtprio limit "
                    "(ulimit -r, /etc/security/limits.conf); running with normal scheduling",
                    rt_priority,
                )
        if prctl is not None:
            old_slack = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0)
            if prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0:
                applied["timer_slack_ns"] = 1
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        applied["switch_interval_s"] = SWITCH_INTERVAL_S
        yield applied
    finally:
        sys.setswitchinterval(old_switch)
        if prctl is not None and old_slack is not None and old_slack > 0:
            prctl(PR_SET_TIMERSLACK, old_slack, 0, 0, 0)
        if old_policy is not None and old_param is not None:
            os.sched_setscheduler(tid, old_policy, old_param)
        if old_affinity is not None:
            os.sched_setaffinity(tid, old_affinity)
            for other, affinity in moved.items():
                try:
                    os.sched_setaffinity(other, affinity)
                except OSError:  # the thread has ended
                    pass


def _move_other_threads(cpu: int) -> dict[int, set[int]]:
    """Take `cpu` out of the affinity of every other thread of this process (threads they start
    inherit it); returns their previous affinities. Threads that may run only on `cpu` stay."""
    me, moved = threading.get_native_id(), {}
    for name in os.listdir("/proc/self/task"):
        other = int(name)
        try:
            affinity = os.sched_getaffinity(other)
            if other != me and cpu in affinity and len(affinity) > 1:
                os.sched_setaffinity(other, affinity - {cpu})
                moved[other] = affinity
        except OSError:  # ended since the listing
            continue
    return moved


@contextmanager
def quiet_gc() -> Iterator[None]:
    """No automatic garbage collection inside; what exists on entry is frozen (never scanned)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        gc.collect()  # the cycles the loop left, now that no tick is waiting


def collect_young() -> bool:
    """Collect the youngest generation when it has grown past YOUNG_LIMIT; call it in a tick's
    slack. Returns whether it collected."""
    if gc.get_count()[0] < YOUNG_LIMIT:
        return False
    gc.collect(0)
    return True


def spin_for(period_ns: int, cpu: int | None) -> int:
    """How long `sleep_until` should spin before a deadline: 0 unless the loop owns a CPU."""
    return 0 if cpu is None else min(SPIN_NS, period_ns // 4)


def sleep_until(deadline_ns: int, clock: Any = time.perf_counter_ns, spin_ns: int = 0) -> None:
    """Sleep until `deadline_ns` on `clock` (monotonic), the last `spin_ns` spinning; returns at
    once when it has passed."""
    remaining = deadline_ns - spin_ns - clock()
    if remaining > 0:
        time.sleep(remaining / 1e9)
    while clock() < deadline_ns:
        pass
