"""Experience assembly per stream, promotion gates and the rollback monitor (no torch)."""

from __future__ import annotations

import numpy as np
import pytest

from controller.contract import row_width, split_rows
from controller.explore import Explorer
from controller.finetune.experience import Counters, LearnerSink, TransitionSink
from controller.finetune.gates import check_candidate
from controller.finetune.monitor import RollbackMonitor
from controller.policy import load_policy, read_policy_file
from controller.proto import controller_pb2 as pb
from controller.service import request_outcome
from controller.transitions import Transitions

LOW, HIGH = np.array([-1.0, 0.0], np.float32), np.array([1.0, 2.0], np.float32)


def make_stream(chunk_size: int = 1, full: bool = False):
    chunks: list[np.ndarray] = []
    episodes: list[tuple[int, float]] = []
    counters = Counters()
    sink = TransitionSink(
        row_width(3, 2), chunk_size, lambda c: not full and chunks.append(c) is None, counters
    )
    learner = LearnerSink(sink, lambda v, r: episodes.append((v, r)), row_width(3, 2))
    return Transitions(learner, 3, 2), chunks, episodes, counters


def step(stream: Transitions, obs, action, version=1, **report) -> None:
    """One ActStream request as the server takes it (controller.service)."""
    request = pb.ActRequest(obs=obs, **report)
    if request.HasField("reward"):
        stream.close(request_outcome(request))
    stream.served(request.obs, np.asarray(action, np.float32), version, LOW, HIGH)


def test_reward_on_request_t_plus_1_closes_the_step_served_for_request_t() -> None:
    stream, chunks, episodes, counters = make_stream()
    step(stream, [0, 0, 0], [1.0, 1.0])
    step(stream, [1, 1, 1], [-1.0, 0.0], reward=0.5)
    step(stream, [2, 2, 2], [0.0, 2.0], reward=0.25, applied_action=[0.5, 1.5])
    step(stream, [9, 9, 9], [0.0, 1.0], reward=1.0, terminated=True, final_obs=[3, 3, 3])
    cols = split_rows(np.concatenate(chunks), 3, 2)
    np.testing.assert_array_equal(cols["obs"], [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    # in [-1, 1] units ([1, 1] in bounds [-1, 1] x [0, 2] is [1, 0]); the second step's action
    # is the one the robot reported applying instead of the served [-1, 0]
    np.testing.assert_allclose(cols["action"], [[1, 0], [0.5, 0.5], [0, 1]])
    np.testing.assert_allclose(cols["reward"], [0.5, 0.25, 1.0])
    np.testing.assert_array_equal(cols["next_obs"], [[1, 1, 1], [2, 2, 2], [3, 3, 3]])
    assert cols["terminated"].tolist() == [False, False, True]
    assert episodes == [(1, 1.75)] and counters.rejected == 0


def test_bad_reports_are_rejected_and_mixed_version_episodes_judge_nothing() -> None:
    stream, chunks, episodes, counters = make_stream()
    step(stream, [0, 0, 0], [0, 1], reward=1.0)  # a reward with nothing before it
    step(stream, [1, 1, 1], [0, 1], version=2, reward=1.0)  # the swap happened mid-episode
    step(stream, [5, 5, 5], [0, 1], reward=1.0, truncated=True)  # truncated needs final_obs
    step(stream, [6, 6, 6], [0, 1], reward=1.0, applied_action=[0.0])  # wrong length
    assert counters.rejected == 3 and counters.received == 1
    assert episodes == []
    step(stream, [7, 7, 7], [0, 1], reward=2.0, terminated=True)
    assert episodes == [(1, 3.0)]


def test_full_queue_drops_and_counts_instead_of_waiting() -> None:
    stream, chunks, _, counters = make_stream(chunk_size=2, full=True)
    for i in range(5):
        step(stream, [i, i, i], [0, 1], reward=1.0)
    assert chunks == [] and counters.received == 4 and counters.dropped == 4


def test_exploration_is_bounded_and_clamped() -> None:
    explorer = Explorer(std=1.0, clip=0.3, act_dim=2, seed=0)
    action = np.array([0.95, 1.0], np.float32)
    out = np.array([explorer.perturb(action, LOW, HIGH) for _ in range(200)])
    assert (out >= LOW).all() and (out <= HIGH).all()
    assert (np.abs(out - action) <= 0.3 * (HIGH - LOW) / 2 + 1e-6).all()
    assert out.std(0).min() > 0


def test_gates_refuse_a_far_away_or_non_finite_candidate(make_policy, nan_policy) -> None:
    def load(path):
        return load_policy(read_policy_file(path), source=str(path), version=0)

    current = load(make_policy("a.onnx", seed=0))
    states = np.random.default_rng(0).normal(0, 1, (64, 26)).astype(np.float32)
    same = load(make_policy("a2.onnx", seed=0))
    far = load(make_policy("b.onnx", seed=1))
    gate = dict(max_change=0.2, mean_change=0.05, min_states=32)
    assert check_candidate(same, current, states, **gate).passed
    refused = check_candidate(far, current, states, **gate)
    assert not refused.passed and "action change" in refused.reason
    hot = states.copy()
    hot[:, 0] = 200.0  # the NaN policy's trigger
    bad = check_candidate(load(nan_policy), current, hot, **gate)
    assert not bad.passed and "non-finite" in bad.reason
    few = check_candidate(same, current, states[:8], **gate)
    assert not few.passed and "recent states" in few.reason


@pytest.mark.parametrize(("new_return", "rollback"), [(-1.0, False), (-1.5, True)])
def test_monitor_rolls_back_only_on_a_clear_regression(new_return: float, rollback: bool) -> None:
    monitor = RollbackMonitor(window=3, margin=0.2, margin_abs=0.0)
    for _ in range(3):
        assert monitor.episode(1, -1.0) is None
    assert monitor.ready_to_promote(1)
    monitor.promoted(2, 1)
    assert not monitor.ready_to_promote(2)
    verdicts = [monitor.episode(2, new_return) for _ in range(3)]
    assert verdicts[:2] == [None, None]
    assert verdicts[2] is not None and verdicts[2].rollback is rollback
