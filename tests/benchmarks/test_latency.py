"""The `mu bench` machinery end to end with tiny durations: every part runs and reports.

No latency thresholds (targets are for the benchmark itself, never for tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.latency import BenchConfig, run_bench
from tests.controller.conftest import write_policy


@pytest.fixture
def tiny(tmp_path: Path) -> BenchConfig:
    return BenchConfig(
        policy=write_policy(tmp_path / "policy.onnx"),
        requests=40,
        warmup=10,
        loop_seconds=0.3,
        clients=(1, 2),
        sweep_seconds=0.5,
        sweep_warmup_s=1.0,  # every robot connects before its window, on a loaded machine too
        swap_interval_s=0.1,
        swap_seconds=0.3,
        out_dir=tmp_path / "out",
        naive=False,
        local_seconds=0.3,
        fast_seconds=0.2,
        kill_seconds=3.0,
    )


def test_bench_runs_every_part(tiny: BenchConfig, tmp_path: Path) -> None:
    r = run_bench(tiny, log=lambda msg: None)
    lat = r["latency_us"]
    for name in ("in-process onnxruntime", "echo unary", "ours unary", "bare echo stream",
                 "echo stream", "ours stream"):  # fmt: skip
        assert lat[name]["n"] == 40 and 0 < lat[name]["p50"] <= lat[name]["max"]
    assert r["loop"]["ticks"] > 0 and r["loop"]["rate_hz"] == 1000
    assert r["swap"]["swaps"] >= 1 and r["swap"]["failed_swaps"] == []
    local = r["local"]
    assert local["loop"]["lane"] == "local" and local["loop"]["ticks"] > 0
    assert local["fast"]["rate_hz"] == 5000 and local["fast"]["ticks"] > 0
    for key in ("loop_floor", "fast_floor"):  # the same loops with no policy, in the same run
        assert local[key]["lane"] == "no policy" and local[key]["ticks"] > 0
    assert local["swap"]["swaps"] >= 1 and local["swap"]["failed_swaps"] == []
    assert local["kill"]["ticks"] > 0 and local["kill"]["restart_took_ms"] > 0
    assert [row["clients"] for row in r["sweep"]["micro-batched"]] == [1, 2]
    assert all(row["throughput_rps"] > 0 for row in r["sweep"]["per-request"])
    assert 0 < r["rss_mb"]["ours"] and r["machine"]["cores"] >= 1
    text = report.table(r)
    assert "p50/floor" in text and "targets (docs/targets.md)" in text and "echo stream" in text
    assert "the machine's floor" in text
    assert len(report.targets(r)) >= 6
    png = tmp_path / "bench.png"  # matplotlib is in the dev extra: the plot always runs
    report.plot(r, png)
    assert png.stat().st_size > 0
    r.pop("latency_ns")
    json.dumps(r)  # everything left is JSON


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no policy"):
        BenchConfig(policy=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="requests"):
        BenchConfig(policy=write_policy(tmp_path / "p.onnx"), requests=0)
