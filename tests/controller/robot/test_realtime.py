"""Real-time hygiene (controller/robot/realtime.py) on this machine's real scheduler."""

from __future__ import annotations

import os
import threading
import time

import pytest

from controller.robot.realtime import realtime, sleep_until, spin_for

needs_two_cpus = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs this process may use",
)


@needs_two_cpus
def test_the_loops_cpu_is_its_own_while_inside() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    loop_cpu = cpus[-1]
    started, stop = threading.Event(), threading.Event()
    native: list[int] = []

    def background() -> None:  # the watcher's stand-in: started before the loop
        native.append(threading.get_native_id())
        started.set()
        stop.wait(30)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    started.wait(5)
    try:
        with realtime(cpu=loop_cpu) as applied:
            assert os.sched_getaffinity(0) == {loop_cpu}
            assert loop_cpu not in os.sched_getaffinity(native[0])
            assert applied["cpu"] == loop_cpu and applied["threads_moved"] >= 1
        assert os.sched_getaffinity(0) == set(cpus)
        assert os.sched_getaffinity(native[0]) == set(cpus)  # restored on exit
    finally:
        stop.set()
        thread.join(5)


def test_sleep_until_never_returns_before_the_deadline() -> None:
    clock = time.perf_counter_ns
    for spin in (0, 200_000):
        for _ in range(50):
            deadline = clock() + 300_000
            sleep_until(deadline, clock, spin)
            assert clock() >= deadline


def test_spin_only_on_an_owned_cpu_and_for_part_of_the_period() -> None:
    assert spin_for(1_000_000, None) == 0
    assert 0 < spin_for(1_000_000, 1) <= 250_000
    assert spin_for(200_000, 1) == 50_000  # 5 kHz: a quarter of the period, never all of it
