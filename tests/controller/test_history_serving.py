"""A policy with history served on both lanes: ActStream and the local lane build the same
inputs as the training env (`training.history.HistoryObs`) for the same episodes, the history
holding the action sent after the slew limit; stateless calls refuse a base-size observation."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from controller.pipeline import Pipeline
from controller.policy import load_policy
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.proto import grpc_service_pb2 as inference_pb
from controller.proto import grpc_service_pb2_grpc as inference_grpc
from controller.robot.client import ActRefused, PolicyClient
from controller.robot.local import LocalClient
from controller.robot.loop import add_loop_arguments, loop_from_args
from controller.safety import SlewLimiter
from controller.transitions import Outcome, Transitions
from training.config import TrainConfig
from training.envs import make_env
from training.history import HistoryObs
from training.trainer import train

ENV = "InvertedPendulumBulletEnv-v0"
MAX_DELTA = 0.1  # bites on some ticks (12 of 28 here), not on others: the inputs show there
EPISODE_CAP = 40


@pytest.fixture(scope="module")
def history_policy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = TrainConfig(env_id=ENV, steps=400, learning_starts=200, batch_size=32,
                      actor_hidden=[16], critic_hidden=[16], eval_every=400, eval_episodes=1,
                      history_obs=1, history_actions=2)  # fmt: skip
    return train(cfg, tmp_path_factory.mktemp("history") / "run", progress=False)


def _episodes(policy: Path, max_delta: float | None, act, report=None) -> list[tuple]:
    """Two episodes of the env with `act(obs, first) -> action`; per tick, the action and what
    the policy gives on the env's own history input (HistoryObs), clamped and slew-limited. The
    env steps with the lane's action: the two agree only while the lane's history holds the
    action sent (after the slew limit) and starts afresh with each episode."""
    session = ort.InferenceSession(str(policy), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    low = np.asarray(json.loads(meta["mu.action_low"]), np.float32)
    high = np.asarray(json.loads(meta["mu.action_high"]), np.float32)
    env = HistoryObs(make_env(ENV, seed=7), obs=1, actions=2)
    base_dim = env.history.obs_dim
    slew = SlewLimiter(max_delta)
    out = []
    for episode in range(2):
        x, _ = env.reset(seed=7 + episode)
        for t in range(EPISODE_CAP):
            raw = np.clip(session.run(["action"], {"obs": x[None]})[0][0], low, high)
            want = np.asarray(slew.limit(raw.tolist(), low, high), np.float32)
            got = act(x[:base_dim], t == 0)
            out.append((got, want))
            x, reward, terminated, truncated, _ = env.step(got)
            truncated = truncated or t == EPISODE_CAP - 1
            if report is not None:
                report(reward, x[:base_dim], terminated, truncated)
            if terminated or truncated:
                break
    env.close()
    return out


def _check(pairs, max_delta: float | None) -> None:
    got, want = np.stack([g for g, _ in pairs]), np.stack([w for _, w in pairs])
    np.testing.assert_allclose(got, want, atol=1e-5)
    if max_delta is not None:
        steps = np.abs(np.diff(got, axis=0))
        assert (steps > max_delta - 1e-6).sum() >= 3, "the slew limit hardly bit"
        assert (steps < max_delta - 1e-3).sum() >= 3, "the slew limit hid the policy's output"


# Without a slew limit every action shows its input, the first of an episode included.
@pytest.mark.parametrize("max_delta", [MAX_DELTA, None])
def test_actstream_builds_the_training_history(
    server_factory, history_policy: Path, max_delta: float | None
) -> None:
    server = server_factory(history_policy, max_delta=max_delta)
    with PolicyClient(server.target, deadline_s=10) as client:
        # each episode says where it starts (episode_start)
        act = lambda obs, first: client.act(obs, episode_start=first)  # noqa: E731
        _check(_episodes(history_policy, max_delta, act), max_delta)
        assert client.misses == 0


@pytest.mark.parametrize("max_delta", [MAX_DELTA, None])
def test_local_lane_builds_the_training_history(
    server_factory, history_policy: Path, max_delta: float | None
) -> None:
    server = server_factory(history_policy, max_delta=max_delta)
    with LocalClient(server.target) as robot:
        # a report of an episode's end makes the next act() start the next one
        def report(reward, next_obs, terminated, truncated):
            robot.report(reward, next_obs, terminated=terminated, truncated=truncated)

        _check(
            _episodes(history_policy, max_delta, lambda obs, _: robot.act(obs), report), max_delta
        )
        with pytest.raises(ActRefused, match="observation has 10 values; the policy expects 5"):
            robot.act(np.zeros(10))


def test_stateless_calls_refuse_one_observation(server_factory, history_policy: Path) -> None:
    """Act, ActBatch and ModelInfer cannot keep a history: one observation (5 values) is
    refused with a message that says what to do; the whole input (12 values) is served."""
    server = server_factory(history_policy)
    with grpc.insecure_channel(server.target) as channel:
        stub, oip = (
            pb_grpc.ControllerStub(channel),
            inference_grpc.GRPCInferenceServiceStub(channel),
        )
        tensor = inference_pb.ModelInferRequest.InferInputTensor
        calls = {
            "Act": lambda n: stub.Act(pb.ActRequest(obs=[0.1] * n), timeout=30),
            "ActBatch": lambda n: stub.ActBatch(
                pb.ActBatchRequest(obs=[0.1] * 2 * n, batch_size=2), timeout=30
            ),
            "ModelInfer": lambda n: oip.ModelInfer(
                inference_pb.ModelInferRequest(
                    model_name="mu-policy",
                    inputs=[
                        tensor(
                            name="obs",
                            datatype="FP32",
                            shape=[1, n],
                            contents=inference_pb.InferTensorContents(fp32_contents=[0.1] * n),
                        )
                    ],
                ),
                timeout=30,
            ),  # fmt: skip
        }
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call(5)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
            message = refused.value.details()
            for words in ("ActStream", "local lane", "whole input of 12 values"):
                assert words in message, (name, message)
            call(12)  # the whole input: served


class _Kept:
    """A transitions sink that keeps everything (where the learner's queue would be)."""

    def __init__(self) -> None:
        self.kept: list = []

    def put(self, t) -> bool:
        self.kept.append(t)
        return True

    def reject(self) -> None:
        raise AssertionError("a transition was rejected")

    def episode(self, version: int, episode_return: float) -> None:
        pass


def test_experience_of_a_history_policy_holds_its_inputs(history_policy: Path) -> None:
    """Fine-tuning learns on what the actor reads: s_t and s_{t+1} are whole inputs."""
    policy = load_policy(history_policy.read_bytes(), source="history", version=1)
    sink = _Kept()
    pipe = Pipeline(Transitions(sink, policy.obs_dim, policy.act_dim))
    obs = np.random.default_rng(0).normal(0, 0.1, (4, 5)).astype(np.float32)
    inputs = []
    for t in range(3):
        inputs.append(pipe.input(policy, obs[t]))
        pipe.output(policy, 1, policy.act_values(inputs[-1]), None, None)
        pipe.close(Outcome(1.0, obs[t + 1], False, False, applied=[0.5] if t == 1 else None))
    inputs.append(pipe.input(policy, obs[3]))
    assert len(sink.kept) == 3
    for t, kept in enumerate(sink.kept):
        np.testing.assert_array_equal(kept.obs, inputs[t])
        np.testing.assert_array_equal(kept.next_obs, inputs[t + 1])
    assert inputs[2][10] == inputs[3][11] == 0.5  # the applied action reported at t=1


def _loop(target: str, env_id: str, lane: str, out: Path, *stop: str) -> dict:
    """`mu loop` on `lane`, with a deadline far past the period: a fallback is a refusal, not a
    slow machine."""
    parser = argparse.ArgumentParser()
    add_loop_arguments(parser)
    argv = ["--env", env_id, "--target", target, "--rate", "50", "--deadline-ms", "2000",
            "--json", str(out), *stop, *(["--local"] if lane == "local" else [])]  # fmt: skip
    assert loop_from_args(parser.parse_args(argv)) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("lane", ["grpc", "local"])
def test_mu_loop_drives_a_history_policy(server_factory, history_policy: Path, lane, tmp_path):
    """`mu loop` checks the env's observation against the policy's one observation (not its
    whole input) and runs on either lane."""
    server = server_factory(history_policy)
    summary = _loop(server.target, ENV, lane, tmp_path / "loop.json", "--ticks", "60")
    assert summary["ticks"] == 60 and summary["misses"]["fallbacks"] == 0


@pytest.mark.parametrize("lane", ["grpc", "local"])
def test_the_bundled_adaptive_policy_runs_on_both_lanes(server_factory, lane, tmp_path) -> None:
    path = Path(__file__).resolve().parents[2] / "policies" / "panda_reach_adaptive" / "policy.onnx"
    policy = load_policy(path.read_bytes(), source=str(path), version=1)
    assert policy.history == {"obs": 2, "actions": 2, "obs_dim": 12}
    server = server_factory(path)
    summary = _loop(
        server.target, "PandaReachDense-v3", lane, tmp_path / "l.json", "--episodes", "1"
    )
    assert summary["episodes"] == 1 and summary["misses"]["fallbacks"] == 0
