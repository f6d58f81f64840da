"""`mu loop` and the demo's pieces against real servers (a Panda-shaped test policy, real
PyBullet). No timing thresholds: only that the counts add up and the outputs are written."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from controller.harness import ServerProcess, parse_ready, serve_command
from controller.robot.client import PolicyClient
from controller.robot.demo import run_demo
from controller.robot.engine import run_loop
from controller.robot.loop import add_loop_arguments, loop_from_args
from controller.robot.plants import SyntheticPlant
from controller.robot.report import summarize

PANDA = "PandaReachDense-v3"


@pytest.fixture
def panda_policy(make_policy) -> Path:
    return make_policy(
        "panda.onnx", env_id=PANDA, obs_dim=12, act_dim=3, low=[-1.0] * 3, high=[1.0] * 3
    )


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_loop_arguments(parser)
    return parser.parse_args(list(argv))


def test_loop_runs_an_episode_and_writes_json_and_plot(
    server_factory, panda_policy: Path, tmp_path: Path, capsys
) -> None:
    server = server_factory(panda_policy)
    out, png = tmp_path / "loop.json", tmp_path / "loop.png"
    args = _args("--env", PANDA, "--target", server.target, "--rate", "500", "--episodes", "1",
                 "--json", str(out), "--plot", str(png))  # fmt: skip
    assert loop_from_args(args) == 0
    s = json.loads(out.read_text())
    assert s["episodes"] == 1 and s["ticks"] == 50  # PandaReach episodes are 50 steps
    assert s["success_rate"] in (0.0, 1.0) and len(s["returns"]) == 1
    m = s["misses"]
    assert m["total"] == m["service"] + m["simulator"] + m["late_wakeup"] <= s["ticks"]
    assert m["late_replies"] <= m["service"] + m["simulator"]  # a late reply overruns its tick
    rt = s["round_trip_us"]
    assert 0 < rt["p50"] <= rt["p90"] <= rt["p99"] <= rt["p99.9"] <= rt["max"]
    assert s["achieved_rate_hz"] > 0 and s["skipped_ticks"] >= 0
    assert png.stat().st_size > 0  # matplotlib is in the sim and dev extras
    assert "round trip µs: p50" in capsys.readouterr().out


def test_loop_refuses_a_policy_for_another_env(server_factory, panda_policy: Path) -> None:
    server = server_factory(panda_policy)
    args = _args("--env", "InvertedPendulumBulletEnv-v0", "--target", server.target,
                 "--rate", "100", "--ticks", "5")  # fmt: skip
    with pytest.raises(ValueError, match="serves a policy for 'PandaReachDense-v3'"):
        loop_from_args(args)


class SlowPlant(SyntheticPlant):
    """A simulator step that takes three periods: every tick overruns because of it."""

    def __init__(self, obs_dim: int, step_s: float) -> None:
        super().__init__(obs_dim)
        self.step_s = step_s

    def step(self, action: np.ndarray):
        time.sleep(self.step_s)
        return super().step(action)


def test_overruns_skip_ticks_and_blame_the_simulator(connected) -> None:
    rate = 200.0
    with PolicyClient(connected.server.target, deadline_s=5) as client:
        result = run_loop(client, SlowPlant(26, 3 / rate), rate, ticks=6)
    s = summarize(result)
    assert s["ticks"] == 6
    assert s["skipped_ticks"] >= 2 * 5  # no burst to catch up: whole periods are skipped
    assert s["misses"]["simulator"] == 6 and s["misses"]["service"] == 0
    assert not s["sim_keeps_rate"]


def test_parse_ready() -> None:
    line = "2026-01-01 INFO controller.server: serving p.onnx version 3 on unix:/tmp/x/mu.sock\n"
    assert parse_ready(line) == "unix:/tmp/x/mu.sock"
    assert parse_ready("serving echo version 0 on 127.0.0.1:41234") == "127.0.0.1:41234"
    assert parse_ready("INFO metrics on http://127.0.0.1:9/metrics") is None


def test_server_process_starts_answers_and_stops_cleanly(policy_path: Path, tmp_path) -> None:
    server = ServerProcess(serve_command(policy_path, f"unix:{tmp_path}/mu.sock"))
    with PolicyClient(server.address, deadline_s=5) as client:
        assert client.act([0.0] * 26).shape == (6,)
    assert server.stop() == 0


def test_server_process_reports_a_failed_start(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with code 2"):
        ServerProcess(serve_command(tmp_path / "missing.onnx", "127.0.0.1:0"))


def test_demo_runs_and_stops_the_server(panda_policy: Path, capsys) -> None:
    assert run_demo(panda_policy, seconds=0.3) == 0
    out = capsys.readouterr().out
    assert "deadline misses" in out and "server stopped (exit code 0)" in out
    assert "gRPC lane (ActStream)" in out and "local lane (WatchPolicy)" in out  # side by side


def test_loop_demo_and_bench_import_no_torch() -> None:
    code = (
        "import sys; import controller.robot.demo, controller.robot.loop, controller.bench; "
        "controller.robot.plants.SimPlant('PandaReachDense-v3').close(); "
        "print('torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
