"""A loop's report: latency percentiles, deadline misses by cause, episodes; as text and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from controller.robot.engine import LoopResult

PERCENTILES = (50, 90, 99, 99.9)


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
