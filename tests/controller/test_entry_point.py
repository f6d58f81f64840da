"""The `mu` entry point: logging follows `mu serve --log-level`; the robot side's bad input is
one line (exit 2), anything else keeps its traceback."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from controller.cli import main
from controller.robot.client import PolicyClient

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("level", ["INFO", "WARNING"])
def test_serve_log_level_decides_what_is_logged(level: str, policy_path: Path, tmp_path) -> None:
    sock = tmp_path / "mu.sock"
    command = [sys.executable, "-m", "controller.cli", "serve", "--policy", str(policy_path),
               "--listen", f"unix:{sock}", "--log-level", level]  # fmt: skip
    server = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        # ready by answering, not by its readiness line: WARNING hides that line
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        with PolicyClient(f"unix:{sock}", deadline_s=5) as client:
            assert client.act([0.0] * 26).shape == (6,)
    finally:
        server.send_signal(signal.SIGINT)
        _, log = server.communicate(timeout=30)
    assert server.returncode == 0, log
    if level == "INFO":
        assert " INFO controller.server: serving " in log, log
    else:
        assert " INFO " not in log, log


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--rate", "0"], "--rate must be positive"),
        (["--rate", "100", "--ticks", "-1"], "--ticks must be positive"),
        (["--rate", "100", "--token-file", "/nonexistent/token"], "cannot read --token-file"),
    ],
)
def test_loop_bad_input_is_one_line(argv: list[str], says: str, capsys) -> None:
    code = main(["loop", "--env", "PandaReachDense-v3", "--target", "127.0.0.1:1", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"mu loop: {says}") and err.count("\n") == 1, err


def _bug(*args, **kwargs):
    raise ValueError("bug")


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_a_bug_keeps_its_traceback_while_bad_input_is_one_line(
    command: str, policy_path: Path, tmp_path, monkeypatch, capsys, caplog
) -> None:
    """Only UsageError is one line: a ValueError from a bug (here raised where the command does
    its work) propagates, traceback and all, on every command, `mu serve` included."""
    missing = str(tmp_path / "missing.onnx")
    if command == "eval":
        argv, bad = ["eval", str(policy_path)], ["eval", missing]
        monkeypatch.setattr("training.evaluate.evaluate_onnx", _bug)
    else:
        argv, bad = ["serve", "--policy", str(policy_path)], ["serve", "--policy", missing]
        monkeypatch.setattr("controller.server.serve", _bug)
    with pytest.raises(ValueError, match="^bug$"):
        main(argv)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(bad) == 2
    if command == "eval":
        err = capsys.readouterr().err
        assert err.startswith("mu eval: no policy file at") and err.count("\n") == 1, err
    else:
        assert f"cannot serve: policy {missing} is not a file" in caplog.text
