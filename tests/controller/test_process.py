"""The server as a process: no torch on the serving path, the CLI hook, signals, metrics."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import grpc

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

NO_TORCH = """
import sys
from controller.robot.client import PolicyClient
from controller.config import ServeConfig
from controller.server import start_in_thread

server = start_in_thread(ServeConfig(policy=sys.argv[1], listen="127.0.0.1:0"))
with PolicyClient(server.target, deadline_s=5) as client:
    assert client.act([0.0] * 26).shape == (6,)
server.stop()
print("torch" in sys.modules, "onnx" in sys.modules)
"""

SERVE = """
import argparse, sys
from controller.server import add_serve_arguments, serve_from_args

parser = argparse.ArgumentParser()
add_serve_arguments(parser)
sys.exit(serve_from_args(parser.parse_args(sys.argv[1:])))
"""


def test_serving_imports_no_torch(policy_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(policy_path)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def _read_lines(process: subprocess.Popen, lines: queue.Queue[str | None]) -> None:
    for line in process.stderr:
        lines.put(line)
    lines.put(None)  # the process closed stderr


def test_serve_from_args_logs_readiness_and_stops_on_sigterm(policy_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE, "--policy", str(policy_path), "--listen", "127.0.0.1:0"],
        env=ENV,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(process, lines), daemon=True)
    reader.start()
    try:
        address = None
        # bounded: a server that hangs before its readiness line fails the test, not the suite
        while (line := lines.get(timeout=60)) is not None:
            found = re.search(r"serving (\S+) version 1 on (\S+)", line)
            if found:
                assert found.group(1) == str(policy_path)
                address = found.group(2)
                break
        assert address is not None, "no readiness line"
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ControllerStub(channel)
            assert len(stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=10).action) == 6
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(30)  # it ends at the dead process's end of stderr
        process.stderr.close()


def test_serve_from_args_refuses_a_corrupt_policy(corrupt_policy: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SERVE, "--policy", str(corrupt_policy), "--listen", "127.0.0.1:0"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "not a loadable ONNX model" in done.stderr


def test_metrics_endpoint(server_factory, policy_path: Path) -> None:
    server = server_factory(policy_path, metrics_port=0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for _ in range(3):
            stub.Act(pb.ActRequest(obs=[0.0] * 26), timeout=5)
        try:
            stub.Act(pb.ActRequest(obs=[0.0]), timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert "mu_policy_version 1.0" in text
    assert 'mu_rpc_handler_seconds_count{code="OK",method="Act"} 3.0' in text
    assert 'mu_rpc_handler_seconds_count{code="INVALID_ARGUMENT",method="Act"} 1.0' in text
