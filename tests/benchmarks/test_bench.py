"""`mu bench --rate HZ --policy FILE` end to end: a real `mu serve` process, both lanes and the
floor at the robot's rate, a verdict per lane. No timing thresholds: the verdicts' values depend
on the machine; only that each lane gets one, with what it was judged against."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "panda_reach" / "policy.onnx"


def mu_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", "bench", *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_bench_at_the_robots_rate_gives_each_lane_a_verdict(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = mu_bench(
        "--rate", "100", "--policy", str(POLICY), "--seconds", "0.5", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    for lane in ("floor (no policy)", "gRPC floor (echo)", "gRPC lane", "local lane"):
        assert re.search(rf"^{re.escape(lane)} .* of \d+ \(", text, re.M), text  # its row
    for lane in ("gRPC lane", "local lane"):
        assert re.search(
            rf"^  {lane}: (holds|misses) 100 Hz: .* of deadlines missed \(\d+/\d+\), the floor "
            r".*; p99 action \d+ µs, period 10000 µs$",
            text,
            re.M,
        ), text
    r = json.loads(out.read_text())
    assert r["rate_hz"] == 100 and r["policy"]["env_id"] == "PandaReachDense-v3"
    assert re.search(r"^gRPC lane against its floor: p50 \d+ µs = [\d.]+x the echo's \d+, p99 ",
                     text, re.M), text  # fmt: skip
    assert set(r["summaries"]) == {"floor", "echo", "grpc", "local"}
    assert [r["summaries"][k]["lane"] for k in ("floor", "echo", "grpc", "local")] == [
        "no policy", "bare echo", "grpc", "local"
    ]  # fmt: skip
    assert all(s["ticks"] > 0 for s in r["summaries"].values())
    assert {k: type(v["holds"]) for k, v in r["verdicts"].items()} == {"grpc": bool, "local": bool}


def test_bench_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    not_onnx = tmp_path / "policy.onnx"
    not_onnx.write_text("not a model")
    for args, says in (
        (["--rate", "0"], "--rate must be positive"),
        (["--rate", "100", "--policy", str(tmp_path / "missing.onnx")], "no policy at"),
        (["--rate", "100", "--policy", str(not_onnx)], "not a loadable ONNX model"),
    ):
        done = mu_bench(*args)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("mu bench: ") and says in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr  # one line, no traceback
