"""One action pipeline (controller/pipeline.py): ActStream on a real server and the local lane
give the same actions and report the same transitions for the same episode."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from controller.finetune.config import FinetuneConfig
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.robot.local import LocalClient

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "policies" / "panda_reach" / "policy.onnx"
AGENT = REPO / "policies" / "panda_reach" / "agent.pt"
WAIT_S = 60  # a bound for a broken build, not a measurement
STEPS = 12
MAX_DELTA = 0.02


def _capture(running) -> tuple[list[np.ndarray], list[tuple[int, float]]]:
    """The rows the server hands to its learner, and the episode returns it judges by."""
    finetuner = running.server.finetuner
    rows: list[np.ndarray] = []
    episodes: list[tuple[int, float]] = []
    put, judge = finetuner.sink._put, finetuner._episode
    finetuner.sink._put = lambda chunk: rows.extend(chunk.copy()) or put(chunk)
    finetuner._episode = lambda version, r: episodes.append((version, r)) or judge(version, r)
    return rows, episodes


def test_actstream_and_local_lane_run_one_pipeline(server_factory, tmp_path: Path) -> None:
    """Exploration with the same seed and a slew limit that bites: same actions, same rows for
    the learner, same episode return for the rollback monitor."""
    cfg = FinetuneConfig(checkpoint=AGENT, versions_dir=tmp_path / "v", explore_std=0.2,
                         chunk_size=1, seed=3, learner_idle_priority=False)  # fmt: skip
    server = server_factory(POLICY, finetune=cfg, max_delta=MAX_DELTA)
    rows, episodes = _capture(server)
    rng = np.random.default_rng(1)
    obs = rng.normal(0, 0.5, (STEPS + 1, 12)).astype(np.float32)
    rewards = rng.normal(-1, 0.3, STEPS).astype(np.float32)

    with LocalClient(server.target, seed=3) as robot:
        assert robot.policy.explore_std == pytest.approx(0.2)
        local = []
        for t in range(STEPS):
            local.append(robot.act(obs[t]))
            assert robot.report(rewards[t], obs[t + 1], truncated=t == STEPS - 1)
    for _ in range(WAIT_S * 100):  # the report thread sent them all on close
        if len(rows) == STEPS:
            break
        threading.Event().wait(0.01)
    local_rows = rows[:STEPS]

    requests = [pb.ActRequest(obs=obs[0], seq=0)]
    for t in range(1, STEPS + 1):
        last = t == STEPS
        requests.append(pb.ActRequest(obs=obs[t], seq=t, reward=rewards[t - 1], truncated=last,
                                      final_obs=obs[t] if last else []))  # fmt: skip
    with grpc.insecure_channel(server.target) as channel:
        replies = list(pb_grpc.ControllerStub(channel).ActStream(iter(requests), timeout=WAIT_S))
    served = np.array([r.action for r in replies[:STEPS]], np.float32)
    assert all(r.explored for r in replies)

    np.testing.assert_array_equal(np.stack(local), served)
    steps = np.abs(np.diff(served, axis=0))
    assert steps.max() <= MAX_DELTA + 1e-6 and (steps > MAX_DELTA - 1e-6).any()  # it bites
    assert len(rows) == 2 * STEPS
    np.testing.assert_array_equal(np.stack(local_rows), np.stack(rows[STEPS:]))
    # the local lane's return travels as a float32 (Transition.episode_return)
    assert [v for v, _ in episodes] == [1, 1]
    assert [r for _, r in episodes] == pytest.approx([float(rewards.sum())] * 2, rel=1e-6)
