"""The serving benchmark's table (latency against its floors, targets in docs/targets.md), plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# variant -> the floor it is divided by
FLOORS = {
    "in-process onnxruntime": None,
    "echo unary": "echo unary",
    "ours unary": "echo unary",
    "naive torch unary": "echo unary",
    "bare echo stream": "bare echo stream",
    "echo stream": "bare echo stream",
    "ours stream": "bare echo stream",
}


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each serving target (docs/targets.md) this run measures."""
    lat = r["latency_us"]
    ours, echo = lat["ours stream"], lat.get("bare echo stream", lat["echo stream"])
    out = [
        (
            "ActStream p50 <= 1.25x bare echo",
            f"{ours['p50'] / echo['p50']:.2f}x",
            ours["p50"] / echo["p50"] <= 1.25,
        ),
        (
            "ActStream p99 <= 1.35x bare echo",
            f"{ours['p99'] / echo['p99']:.2f}x",
            ours["p99"] / echo["p99"] <= 1.35,
        ),
    ]
    if "naive torch unary" in lat:
        gain = lat["naive torch unary"]["p99"] / ours["p99"]
        out.append(("p99 >= 2x better than naive torch", f"{gain:.2f}x", gain >= 2))
    loop = r["loop"]
    frac = loop["misses"]["total"] / max(loop["ticks"], 1)
    out.append(
        (
            f"{loop['rate_hz']:g} Hz loop misses <= 0.1%",
            f"{frac:.2%} ({loop['misses']['total']}/{loop['ticks']})",
            frac <= 0.001,
        )
    )
    top = r["sweep"]["micro-batched"][-1]
    base = r["sweep"]["per-request"][-1]
    gain = top["throughput_rps"] / base["throughput_rps"]
    out.append(
        (
            f"{top['clients']} clients >= 2x per-request throughput",
            f"{gain:.2f}x",
            gain >= 2,
        )
    )
    out.append(
        (f"{top['clients']} clients p99 <= 5 ms", f"{top['p99'] / 1e3:.2f} ms", top["p99"] <= 5e3)
    )
    swap = r["swap"]
    failed = swap["failed_requests"] + len(swap["failed_swaps"])
    out.append(
        ("hot swap: zero failed requests", f"{failed} failed, {swap['swaps']} swaps", failed == 0)
    )
    rss = r["rss_mb"]["ours after load"]
    out.append(("serving RSS < 150 MB", f"{rss:.0f} MB", rss < 150))
    if "local" in r:
        out += local_targets(r["local"])
    return out


def local_targets(local: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The local-lane targets (docs/targets.md)."""
    loop, fast, swap, kill = local["loop"], local["fast"], local["swap"], local["kill"]
    cost = loop["round_trip_us"]["p99.9"]
    out = [("local: per-tick policy cost p99.9 <= 150 µs", f"{cost:.0f} µs", cost <= 150)]
    floors = local["loop_floor"], local["fast_floor"]
    for s, floor, limit in ((loop, floors[0], 0.0001), (fast, floors[1], 0.001)):
        m = s["misses"]["total"]
        out.append(
            (
                f"local: {s['rate_hz']:g} Hz for {s['seconds']:.0f} s misses <= {limit:.2%}",
                f"{s['miss_fraction']:.3%} ({m}/{s['ticks']}); with no policy "
                f"{floor['miss_fraction']:.3%}",
                s["miss_fraction"] <= limit,
            )
        )
    late = swap["in_use_after_ms"]["max"]
    ok = (
        swap["failed_ticks"] == 0
        and not swap["failed_swaps"]
        and not swap["versions_never_used"]
        and late <= 100
    )
    out.append(
        (
            "local: hot swaps, 0 failed ticks, each version in use within 100 ms",
            f"{swap['swaps']} swaps, {swap['failed_ticks']} failed ticks, "
            f"{len(swap['versions_never_used'])} never used, in use after <= {late:.1f} ms",
            ok,
        )
    )
    out.append(
        (
            "local: server SIGKILLed under the loop costs 0 ticks",
            f"{kill.get('missed_during_outage', 'n/a')} missed of "
            f"{kill.get('outage_ticks', 'n/a')} between the kill and the new policy "
            f"(the machine alone misses {floors[0]['miss_fraction']:.2%} of ticks; "
            f"{kill['missed_ticks']} of {kill['ticks']} in the whole run), "
            f"{kill['failed_ticks']} failed; "
            + (
                f"restarted server's policy applied {kill['applied_after_restart_ms']:.0f} ms "
                "after it was ready"
                if kill["applied"]
                else "restarted server's policy NOT applied"
            ),
            kill.get("missed_during_outage", kill["missed_ticks"]) == 0
            and kill["failed_ticks"] == 0
            and kill["applied"],
        )
    )
    return out


def local_lines(local: dict[str, Any]) -> list[str]:
    lines = ["", "local lane (policy evaluated in the loop's process; µs):"]
    for key in ("loop_floor", "loop", "fast_floor", "fast"):
        s = local[key]
        c, w, m = s["round_trip_us"], s["wakeup_delay_us"], s["misses"]
        policy = (
            "no policy (the machine's floor)"
            if key.endswith("floor")
            else f"policy p50 {c['p50']:.0f} p99 {c['p99']:.0f} p99.9 {c['p99.9']:.0f} "
            f"max {c['max']:.0f}"
        )
        lines.append(
            f"  {s['rate_hz']:g} Hz, {s['seconds']:.1f} s: {s['ticks']} ticks, achieved "
            f"{s['achieved_rate_hz']:.0f} Hz; {policy}; wake-up p99 {w['p99']:.0f} "
            f"p99.9 {w['p99.9']:.0f}; misses {m['total']} ({m['service']} policy, "
            f"{m['late_wakeup']} late wake-up)"
        )
    swap = local["swap"]
    d = swap["in_use_after_ms"]
    lines.append(
        f"  hot swap: {swap['swaps']} swaps, {swap['failed_ticks']} failed ticks, new version "
        f"in use {d['p50']:.1f} ms (p50) / {d['max']:.1f} ms (max) after LoadPolicy returned; "
        f"misses {swap['loop']['misses']['total']}"
    )
    kill = local["kill"]
    applied = (
        f"applied {kill['applied_after_restart_ms']:.0f} ms after the restarted server was "
        f"ready ({kill['applied_after_kill_ms']:.0f} ms after the kill)"
        if kill["applied"]
        else "NOT applied"
    )
    lines.append(
        f"  SIGKILL: {kill['ticks']} ticks, {kill['missed_ticks']} missed "
        f"({kill.get('missed_during_outage', 'n/a')} of {kill.get('outage_ticks', 'n/a')} between "
        f"the kill and the new policy), {kill['failed_ticks']} failed; restart took "
        f"{kill['restart_took_ms']:.0f} ms; the new policy {applied}"
    )
    rt = local["loop"].get("realtime", {})
    lines.append(
        f"  real time: cpu {rt.get('cpu')}, SCHED_FIFO priority {rt.get('rt_priority')}, "
        f"timer slack {rt.get('timer_slack_ns')} ns"
    )
    return lines


def soak_table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"soak: {r['seconds']:.0f} s, local lane {r['rates_hz']['local']:g} Hz and gRPC lane "
        f"{r['rates_hz']['grpc']:g} Hz against one server; {m['cores']} cores, load average "
        f"{m['load_avg_1m_start']:.2f} at start, {m['load_avg_1m_end']:.2f} at end",
        f"{'process':12} {'RSS start MB':>13} {'RSS end MB':>11} {'growth MB':>10}",
    ]
    for k, start in r["rss_mb_start"].items():
        lines.append(f"{k:12} {start:13.1f} {r['rss_mb_end'][k]:11.1f} {r['growth_mb'][k]:10.1f}")
    per = r["segment_s"]
    for lane, segments in r["misses_per_segment"].items():
        misses = [s["misses"] for s in segments]
        ticks = sum(s["ticks"] for s in segments)
        lines.append(f"{lane} misses per {per:g} s: {misses} ({sum(misses)}/{ticks} ticks)")
    after = r.get("growth_after_first_segment_mb", {})
    if after:
        lines.append(
            f"growth after the first {per:g} s: "
            + ", ".join(f"{k} {v:+.1f} MB" for k, v in after.items())
        )
    grown = max(r["growth_mb"].values())
    lines.append(
        f"  [{'met' if grown <= 5 else 'MISSED'}] no process grows by more than 5 MB "
        f"(start to end): largest growth {grown:.1f} MB"
    )
    return "\n".join(lines)


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cores']} cores, {m['cpu']}; load average "
        f"{m['load_avg_1m_start']:.2f} at start, {m.get('load_avg_1m_end', float('nan')):.2f} "
        "at end",
        "",
        f"{'variant':24} {'p50 µs':>8} {'p90 µs':>8} {'p99 µs':>8} {'p99.9 µs':>9} "
        f"{'p50/floor':>10} {'p99/floor':>10}",
    ]
    lat = r["latency_us"]
    for name, floor in FLOORS.items():
        if name not in lat:
            continue
        s = lat[name]
        if floor is None:
            ratio = "(compute floor)"
        else:
            f = lat[floor]
            ratio = f"{s['p50'] / f['p50']:>10.2f} {s['p99'] / f['p99']:>10.2f}"
        lines.append(
            f"{name:24} {s['p50']:8.0f} {s['p90']:8.0f} {s['p99']:8.0f} {s['p99.9']:9.0f} {ratio}"
        )
    lines += ["", *[f"note: {n}" for n in r["notes"]]]
    loop = r["loop"]
    rt = loop["round_trip_us"]
    lines.append(
        f"loop {loop['rate_hz']:g} Hz, {loop['seconds']:.1f} s: {loop['ticks']} ticks, "
        f"misses {loop['misses']['total']} (late replies {loop['misses']['late_replies']}), "
        f"round trip p50 {rt['p50']:.0f} p99 {rt['p99']:.0f} p99.9 {rt['p99.9']:.0f} µs, "
        f"achieved {loop['achieved_rate_hz']:.0f} Hz"
    )
    swap = r["swap"]
    srt = swap["loop"]["round_trip_us"]
    lines.append(
        f"hot swap every {r['config']['swap_interval_s'] * 1e3:g} ms: {swap['swaps']} swaps, "
        f"{len(swap['failed_swaps'])} failed swaps, {swap['failed_requests']} failed requests, "
        f"round trip p99 {srt['p99']:.0f} µs, misses {swap['loop']['misses']['total']}"
    )
    if "local" in r:
        lines += local_lines(r["local"])
    rss = r["rss_mb"]
    lines.append("resident memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    lines += ["", f"{'clients':>7} {'batched rps':>12} {'p99 µs':>8} {'per-request rps':>16} "
              f"{'p99 µs':>8} {'gain':>6}"]  # fmt: skip
    for ours, base in zip(r["sweep"]["micro-batched"], r["sweep"]["per-request"], strict=True):
        lines.append(
            f"{ours['clients']:7d} {ours['throughput_rps']:12.0f} {ours['p99']:8.0f} "
            f"{base['throughput_rps']:16.0f} {base['p99']:8.0f} "
            f"{ours['throughput_rps'] / base['throughput_rps']:6.2f}"
        )
    lines += ["", "targets (docs/targets.md):"]
    for what, measured, met in targets(r):
        lines.append(f"  [{'met' if met else 'MISSED'}] {what}: {measured}")
    lines.append(f"bench took {r['seconds']:.0f} s")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Latency CDFs and throughput against clients. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, ns in r["latency_ns"].items():
        us = np.sort(np.asarray(ns, np.float64) / 1e3)
        ax1.plot(us, np.arange(1, len(us) + 1) / len(us), label=name)
    ax1.set(xscale="log", xlabel="round trip (µs)", ylabel="fraction of requests", title="CDF")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    for name, rows in r["sweep"].items():
        clients = [row["clients"] for row in rows]
        ax2.plot(clients, [row["throughput_rps"] for row in rows], "o-", label=name)
    ax2.set(xscale="log", xlabel="clients", ylabel="requests / s", title="throughput")
    ax2.set_xticks(clients, [str(c) for c in clients])
    ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)
    m = r["machine"]
    fig.suptitle(f"serving latency on {m['cores']} cores ({m['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
