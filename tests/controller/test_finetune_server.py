"""Fine-tuning inside the real server: exploration flag, automatic rollback on a planted
regression, admin RPC rules, and kill -9 in the middle of a promotion."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.finetune.config import FinetuneConfig
from controller.finetune.manager import resume_policy
from controller.finetune.versions import PAUSE_POINTER_ENV, Pointer, read_pointer, write_pointer
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "panda_reach" / "policy.onnx"
AGENT = REPO / "policies" / "panda_reach" / "agent.pt"
ROBUST = REPO / "policies" / "panda_reach_robust" / "policy.onnx"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
# Small and quick: a candidate every 2 actor updates, judged on 2-3 episodes; the learner at
# normal priority (test-only), so a busy machine cannot starve it past the deadlines below.
FAST = dict(
    actor_warmup=0,
    candidate_every=2,
    batch_size=32,
    gate_states=32,
    chunk_size=8,
    learner_idle_priority=False,
)
DEADLINE_S = 120


class LockStep:
    """One ActStream driven one request at a time."""

    def __init__(self, stub: pb_grpc.ControllerStub, metadata=None) -> None:
        self._requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
        self._replies = stub.ActStream(
            iter(self._requests.get, None), timeout=DEADLINE_S, metadata=metadata
        )

    def step(self, **fields) -> pb.ActResponse:
        self._requests.put(pb.ActRequest(**fields))
        return next(self._replies)

    def close(self) -> None:
        self._requests.put(None)


def episodes(stream: LockStep, rng: np.random.Generator, reward_of) -> Iterator[pb.ActResponse]:
    """Endless 5-step episodes; `reward_of(version)` is the reward reported for each step."""
    reply = stream.step(obs=rng.normal(0, 0.1, 12).tolist())
    while True:
        for t in range(5):
            obs = rng.normal(0, 0.1, 12).tolist()
            done = t == 4
            reply = stream.step(
                obs=obs,
                reward=reward_of(reply.policy_version),
                truncated=done,
                final_obs=obs if done else [],
            )
            yield reply


def test_finetuning_rpcs_need_finetune_and_the_token(server_factory, policy_path, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    server = server_factory(policy_path, admin_token_file=token)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.PauseFinetuning(pb.FinetuneControlRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e:
            stub.GetFinetuneStatus(
                pb.FinetuneControlRequest(),
                timeout=10,
                metadata=[("authorization", "Bearer s3cret")],
            )
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--finetune" in e.value.details()


def test_only_trusted_callers_report_experience_and_only_finite_returns(
    server_factory, tmp_path
) -> None:
    """With a token, an ActStream without it is served (unexplored) but its rewards reach
    neither the learner nor the rollback monitor; a NaN episode_return is rejected."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    admin = [("authorization", "Bearer s3cret")]
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=tmp_path / "v", explore_std=0.05, **FAST)
    server = server_factory(POLICY, finetune=cfg, admin_token_file=token)
    rng = np.random.default_rng(2)
    control = pb.FinetuneControlRequest()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")]):
            stream = LockStep(stub, metadata)
            replies = list(itertools.islice(episodes(stream, rng, lambda v: 5.0), 10))
            stream.close()
            assert [(len(r.action), r.explored) for r in replies] == [(3, False)] * 10
        status = stub.GetFinetuneStatus(control, timeout=10, metadata=admin)
        assert (status.transitions_received, status.transitions_rejected) == (0, 20)
        assert status.current_episodes == 0

        stream = LockStep(stub, admin)
        replies = list(itertools.islice(episodes(stream, rng, lambda v: -1.0), 10))
        stream.close()
        assert all(r.explored for r in replies)
        status = stub.GetFinetuneStatus(control, timeout=10, metadata=admin)
        assert (status.transitions_received, status.current_episodes) == (10, 2)
        assert status.current_mean_return == pytest.approx(-5.0)

        o, o2 = rng.normal(0, 0.1, (2, 12)).tolist()
        nan_return = pb.Transition(obs=o, action=[0.1, -0.2, 0.3], reward=-1.0, next_obs=o2,
                                   truncated=True, policy_version=1,
                                   episode_return=float("nan"))  # fmt: skip
        reply = stub.ReportTransitions(iter([nan_return]), timeout=DEADLINE_S, metadata=admin)
        assert (reply.accepted, reply.rejected) == (0, 1)
        assert reply.first_error == "transition 1: episode_return is not finite"
        status = stub.GetFinetuneStatus(control, timeout=10, metadata=admin)
        assert status.current_episodes == 2


def test_a_dead_learner_is_logged_shown_and_stops_exploration(
    server_factory, tmp_path, caplog
) -> None:
    """A checkpoint the learner cannot load kills it: the server logs it, GetFinetuneStatus
    and the metrics show it, and ActStream stops exploring."""
    bad = tmp_path / "agent.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = FinetuneConfig(checkpoint=bad, versions_dir=tmp_path / "v", explore_std=0.2, **FAST)
    server = server_factory(POLICY, finetune=cfg, metrics_port=0)
    control = pb.FinetuneControlRequest()
    obs = np.zeros(12).tolist()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        stream = LockStep(stub)
        for _ in range(DEADLINE_S * 10):  # the learner dies once torch has loaded (seconds)
            status = stub.GetFinetuneStatus(control, timeout=10)
            if status.learner_error:
                break
            threading.Event().wait(0.1)
        assert not status.learner_alive
        assert status.learner_error.startswith("UsageError") and "not a mu checkpoint" in (
            status.learner_error
        )
        assert not any(stream.step(obs=obs).explored for _ in range(10))
        stream.close()
    port = server.server.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as page:
        assert "mu_finetune_learner_alive 0.0" in page.read().decode()
    assert f"fine-tuning learner died ({status.learner_error})" in caplog.text


def test_regression_under_a_promoted_version_rolls_back(server_factory, tmp_path) -> None:
    cfg = FinetuneConfig(
        checkpoint=AGENT, versions_dir=tmp_path / "v", explore_std=0.05, rollback_window=3, **FAST
    )
    server = server_factory(POLICY, finetune=cfg)
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        stream = LockStep(stub)
        seen: list[int] = []
        # the planted regression: every version after the first earns three times less
        for reply in episodes(stream, rng, lambda v: -1.0 if v == 1 else -3.0):
            assert reply.explored and len(reply.action) == 3
            if not seen or seen[-1] != reply.policy_version:
                seen.append(reply.policy_version)
            if len(seen) >= 3:
                break
        stream.close()
        status = stub.GetFinetuneStatus(pb.FinetuneControlRequest(), timeout=10)
    assert seen == [1, 2, 1], seen
    assert status.rollbacks == 1 and status.promotions >= 1
    assert status.transitions_received > 0


def _ort_action(obs: list[float]) -> np.ndarray:
    session = ort.InferenceSession(str(POLICY), providers=["CPUExecutionProvider"])
    return session.run(["action"], {"obs": np.asarray([obs], np.float32)})[0][0]


def test_report_transitions_counts_accepted_rejected_and_dropped(server_factory, tmp_path):
    # a queue of one one-row chunk, sent to before the learner (still importing torch) takes
    # anything from it: the first row fits, the rest are dropped and counted
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=tmp_path / "v",
                         **{**FAST, "chunk_size": 1, "queue_chunks": 1})  # fmt: skip
    server = server_factory(POLICY, finetune=cfg)
    rng = np.random.default_rng(3)

    def good() -> pb.Transition:
        o, o2 = rng.normal(0, 0.1, (2, 12)).tolist()
        return pb.Transition(obs=o, action=[0.1, -0.2, 0.3], reward=-1.0, next_obs=o2)

    bad_obs = good()
    del bad_obs.obs[-1]
    bad_reward = good()
    bad_reward.reward = float("nan")
    sent = [good(), good(), good(), bad_obs, good(), good(), good(), bad_reward]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        reply = stub.ReportTransitions(iter(sent), timeout=DEADLINE_S)
        status = stub.GetFinetuneStatus(pb.FinetuneControlRequest(), timeout=10)
    assert (reply.accepted, reply.rejected) == (6, 2)
    assert reply.first_error == "transition 4: obs has 11 values; the policy expects 12"
    assert 1 <= reply.dropped <= 5
    assert (status.transitions_received, status.transitions_rejected) == (6, 2)
    assert status.transitions_dropped == reply.dropped


def test_start_paused_pause_resume_and_where_exploration_applies(server_factory, tmp_path):
    """Exploration perturbs ActStream actions (slew-limited like any other), never Act, and
    stops while paused; the learner starts paused and updates once resumed."""
    delta = 0.05
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=tmp_path / "v", explore_std=0.2,
                         start_paused=True, **FAST)  # fmt: skip
    server = server_factory(POLICY, finetune=cfg, max_delta=delta)
    obs = np.random.default_rng(4).normal(0, 0.1, 12).tolist()
    want = _ort_action(obs)
    control = pb.FinetuneControlRequest()
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        stream = LockStep(stub)

        def stream_actions(n: int, explored: bool) -> np.ndarray:
            replies = [stream.step(obs=obs) for _ in range(n)]
            assert [r.explored for r in replies] == [explored] * n
            actions = np.array([list(r.action) for r in replies])
            assert (np.abs(actions) <= 1.0).all()  # the bounds
            return actions

        def act_is_unexplored() -> None:
            reply = stub.Act(pb.ActRequest(obs=obs), timeout=10)
            assert not reply.explored
            np.testing.assert_allclose(reply.action, want, atol=1e-6)

        assert stub.GetFinetuneStatus(control, timeout=10).paused
        paused = stream_actions(5, explored=False)
        np.testing.assert_allclose(paused, np.tile(want, (5, 1)), atol=1e-6)
        act_is_unexplored()

        assert not stub.ResumeFinetuning(control, timeout=10).paused
        explored = stream_actions(30, explored=True)
        steps = np.abs(np.diff(np.vstack([paused[-1:], explored]), axis=0))
        assert steps.max() <= delta + 1e-6  # the slew limit holds over the noise
        assert np.ptp(explored, axis=0).max() > 0  # and the noise moves the actions
        act_is_unexplored()

        # the learner, started paused, learns once resumed (bounded by the stream deadline)
        rng = np.random.default_rng(5)
        for i, _ in enumerate(episodes(stream, rng, lambda v: -1.0)):
            if i % 25 == 0 and stub.GetFinetuneStatus(control, timeout=10).updates > 0:
                break

        assert stub.PauseFinetuning(control, timeout=10).paused
        stream_actions(5, explored=False)
        act_is_unexplored()
        stream.close()


def test_a_version_is_on_disk_before_it_is_served_and_numbers_are_never_reused(
    server_factory, tmp_path
) -> None:
    """Each swap is in the versions pointer by the time LoadPolicy or RollbackPolicy answers;
    a restart serves the last version served, and numbers on after the highest one given out
    (3, rolled back from), not after the one it resumes (2)."""
    versions = tmp_path / "v"
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=versions, start_paused=True, **FAST)
    files = [shutil.copy(p, tmp_path / f"p{i}.onnx") for i, p in enumerate((ROBUST, POLICY))]
    server = server_factory(POLICY, finetune=cfg)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        for version, path in ((2, files[0]), (3, files[1])):
            assert stub.LoadPolicy(pb.LoadPolicyRequest(path=str(path)), timeout=30).version == (
                version
            )
            assert read_pointer(versions) == Pointer(version, str(path), _sha(path), None, version)
        assert stub.RollbackPolicy(pb.RollbackPolicyRequest(), timeout=30).version == 2
        assert read_pointer(versions) == Pointer(2, str(files[0]), _sha(files[0]), None, 3)
    server.stop()

    again = server_factory(POLICY, finetune=cfg)
    with grpc.insecure_channel(again.target) as channel:
        stub = pb_grpc.ControllerStub(channel)
        info = stub.GetPolicy(pb.GetPolicyRequest(), timeout=10)
        assert (info.version, info.sha256) == (2, _sha(files[0]))
        assert stub.LoadPolicy(pb.LoadPolicyRequest(path=str(files[1])), timeout=30).version == 4


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_restart_refuses_a_pointer_whose_sha256_differs(server_factory, tmp_path) -> None:
    versions = tmp_path / "v"
    versions.mkdir()
    served = versions / "candidate-0001.onnx"
    shutil.copy(POLICY, served)
    sha = hashlib.sha256(served.read_bytes()).hexdigest()
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=versions, **FAST)
    write_pointer(versions, Pointer(2, str(served), sha, None))
    assert resume_policy(cfg)[0].version == 2  # the recorded file: resumed
    write_pointer(versions, Pointer(2, str(served), "0" * 64, None))
    with pytest.raises(ValueError, match="refusing to guess what to serve"):
        server_factory(POLICY, finetune=cfg)


def _read_lines(process: subprocess.Popen, lines: queue.Queue[str]) -> None:
    for line in process.stderr:
        lines.put(line)


def _start(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, queue.Queue[str], str]:
    script = (
        "import argparse, sys\n"
        "from controller.server import add_serve_arguments, serve_from_args\n"
        "p = argparse.ArgumentParser(); add_serve_arguments(p)\n"
        "sys.exit(serve_from_args(p.parse_args(sys.argv[1:])))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=env or ENV, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_read_lines, args=(process, lines), daemon=True).start()
    while True:
        line = lines.get(timeout=DEADLINE_S)
        found = re.search(r"serving \S+ version \d+ on (\S+)", line)
        if found:
            return process, lines, found.group(1)


def _gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` (not our child) has ended, waiting at most `timeout` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout)  # readable once it has exited
        return bool(readable)
    finally:
        os.close(fd)


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for t in tasks for c in (t / "children").read_text().split()]


def test_kill_9_during_a_promotion_resumes_the_last_version_clients_saw(tmp_path: Path) -> None:
    """The server stops between writing version 3's pointer and renaming it (the fault point in
    controller.finetune.versions), before version 3 is served; kill -9 lands there, every
    time. No client saw version 3, and the restart serves version 2, the last one they saw."""
    versions = tmp_path / "versions"
    args = ["--policy", str(POLICY), "--listen", "127.0.0.1:0", "--finetune", str(AGENT),
            "--finetune-dir", str(versions), "--finetune-set", "rollback_window=2",
            *[f"--finetune-set={k}={json.dumps(v)}" for k, v in FAST.items()]]  # fmt: skip
    env = {**ENV, PAUSE_POINTER_ENV: "3"}
    process, lines, address = _start(args, env)
    children: list[int] = []
    try:
        rng = np.random.default_rng(1)
        seen = 0
        with grpc.insecure_channel(address) as channel:
            stream = LockStep(pb_grpc.ControllerStub(channel))
            for reply in episodes(stream, rng, lambda v: -1.0):
                seen = max(seen, reply.policy_version)
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    continue
                if re.search(r"fault injection: pointer of version 3 ", line):
                    children = _children(process.pid)  # the learner among them
                    # the clients go on, and still see version 2 only
                    for reply in itertools.islice(episodes(stream, rng, lambda v: -1.0), 20):
                        seen = max(seen, reply.policy_version)
                    process.send_signal(signal.SIGKILL)  # between write and rename
                    break
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert seen == 2 and children
    for pid in children:
        gone = _gone(pid, timeout=30)
        if not gone:
            os.kill(pid, signal.SIGKILL)  # do not leave it behind for the next tests
        assert gone, "a child outlived the server"
    # the new pointer reached the disk but was never renamed: the old one is intact
    assert json.loads((versions / ".current.json.tmp").read_text())["version"] == 3
    pointer = json.loads((versions / "current.json").read_text())
    assert pointer["version"] == seen
    assert hashlib.sha256(Path(pointer["policy"]).read_bytes()).hexdigest() == pointer["sha256"]

    process, lines, address = _start(args)
    try:
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.ControllerStub(channel).GetPolicy(pb.GetPolicyRequest(), timeout=10)
        assert (info.version, info.sha256) == (pointer["version"], pointer["sha256"])
        assert info.source == pointer["policy"]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
