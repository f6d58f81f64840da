"""DDPG end to end: a short run on real PyBullet learns to balance the pendulum measurably
better than the untrained actor it started from, and exports a policy that shows it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from training.config import TrainConfig
from training.envs import EVAL_SEED_OFFSET, action_bounds, make_env, run_episodes, to_env_units
from training.td3 import Agent
from training.trainer import train

ENV = "InvertedPendulumBulletEnv-v0"
EPISODES = 5


def test_a_short_ddpg_run_learns_to_balance(tmp_path: Path) -> None:
    cfg = TrainConfig(
        env_id=ENV,
        algo="ddpg",
        steps=4000,
        learning_starts=500,
        batch_size=64,
        actor_hidden=[64, 64],
        critic_hidden=[64, 64],
        eval_every=2000,
        eval_episodes=3,
        checkpoint_every=10**6,
    )
    train(cfg, tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["algo"], saved["n_critics"], saved["target_noise"], saved["policy_delay"]) == (
        "ddpg", 1, 0.0, 1,
    )  # fmt: skip

    env = make_env(ENV, 0)
    low, high = action_bounds(env)
    torch.manual_seed(0)
    untrained = Agent.create(cfg, env.observation_space.shape[0], env.action_space.shape[0])

    def untrained_act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            a = untrained.act(torch.as_tensor(obs).unsqueeze(0))[0].numpy()
        return to_env_units(a, low, high)

    session = ort.InferenceSession(
        str(tmp_path / "policy.onnx"), providers=["CPUExecutionProvider"]
    )

    def trained_act(obs: np.ndarray) -> np.ndarray:
        return session.run(["action"], {"obs": obs[np.newaxis].astype(np.float32)})[0][0]

    before = np.mean(run_episodes(env, untrained_act, EPISODES, EVAL_SEED_OFFSET)[0])
    after = np.mean(run_episodes(env, trained_act, EPISODES, EVAL_SEED_OFFSET)[0])
    env.close()
    # an untrained actor drops the pole within ~20-30 steps; 4000 steps of DDPG hold it for
    # 150-300 on seeds 0-2
    assert after >= 100 and after >= 4 * before, (before, after)
