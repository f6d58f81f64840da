"""Stable-Baselines3 import: a model trained briefly in a real env becomes a mu policy file whose
actions, served over gRPC, are SB3's `predict(normalized obs, deterministic=True)`."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import gymnasium as gym
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from stable_baselines3 import SAC, TD3
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from controller.cli import main
from controller.config import ServeConfig
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.server import start_in_thread
from training.envs import make_env
from training.sb3_import import SB3ImportConfig, import_sb3, reference_actions, sb3_algo

PENDULUM = "InvertedPendulumBulletEnv-v0"
REACH = "PandaReachDense-v3"
TOL = 1e-5


def _train(model_cls, policy: str, env_fn, steps: int, out: Path) -> tuple[Path, Path]:
    venv = VecNormalize(DummyVecEnv([env_fn]), norm_reward=False)
    model = model_cls(
        policy, venv, learning_starts=steps // 3, policy_kwargs={"net_arch": [32, 32]},
        seed=0, device="cpu",
    )  # fmt: skip
    model.learn(steps)
    model.save(out / "model.zip")
    venv.save(out / "vecnormalize.pkl")
    return out / "model.zip", out / "vecnormalize.pkl"


@pytest.fixture(scope="module")
def td3_pendulum(tmp_path_factory) -> tuple[Path, Path]:
    return _train(
        TD3, "MlpPolicy", lambda: make_env(PENDULUM, 0), 300, tmp_path_factory.mktemp("td3")
    )


def _loaded(model_zip: Path, stats: Path, env) -> tuple[TD3, VecNormalize]:
    vec = VecNormalize.load(str(stats), DummyVecEnv([lambda: env]))
    vec.training = False
    return TD3.load(model_zip, device="cpu"), vec


def test_td3_import_served_matches_predict(td3_pendulum, tmp_path: Path, caplog) -> None:
    model_zip, stats = td3_pendulum
    cfg = SB3ImportConfig(model=model_zip, env_id=PENDULUM, vecnormalize=stats, parity_samples=200)
    with caplog.at_level(logging.WARNING, logger="training.sb3_import"):
        path = import_sb3(cfg, tmp_path / "policy.onnx")
    assert "pickled Stable-Baselines3 model" in caplog.text
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["mu.algo"] == "td3" and props["mu.env_id"] == PENDULUM
    assert props["mu.train_steps"] == "300"
    assert (tmp_path / "policy.config.json").is_file()

    env = make_env(PENDULUM, 1)
    model, vec = _loaded(model_zip, stats, env)
    server = start_in_thread(ServeConfig(policy=path, listen="127.0.0.1:0"))
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.ControllerStub(channel)
            obs, _ = env.reset(seed=1)
            for _ in range(50):
                want, _ = model.predict(vec.normalize_obs(obs), deterministic=True)
                got = stub.Act(pb.ActRequest(obs=obs.tolist()), timeout=5).action
                np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
                obs, _, terminated, truncated, _ = env.step(np.asarray(got, np.float32))
                if terminated or truncated:
                    obs, _ = env.reset()
    finally:
        server.stop()
        env.close()


def test_sac_dict_observations_import(tmp_path: Path) -> None:
    """SAC (deterministic: tanh of the mean) with MultiInputPolicy on panda-gym's Dict
    observations, every key normalized: the flat layout matches SB3's CombinedExtractor."""
    model_zip, stats = _train(SAC, "MultiInputPolicy", lambda: gym.make(REACH), 90, tmp_path)
    assert sb3_algo(model_zip) == "sac"
    cfg = SB3ImportConfig(model=model_zip, env_id=REACH, vecnormalize=stats, parity_samples=50)
    path = import_sb3(cfg, tmp_path / "reach.onnx")
    env = make_env(REACH, 3)
    obs = np.asarray([env.reset(seed=s)[0] for s in range(8)], np.float32)
    env.close()
    vec = VecNormalize.load(str(stats), DummyVecEnv([lambda: gym.make(REACH)]))
    want = reference_actions(SAC.load(model_zip, device="cpu"), vec, obs, env.layout)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["action"], {"obs": obs})[0], want, rtol=0, atol=TOL)


def test_cli_from_sb3(td3_pendulum, tmp_path: Path) -> None:
    model_zip, stats = td3_pendulum
    out = tmp_path / "cli.onnx"
    argv = ["export", "--from-sb3", str(model_zip), "--vecnormalize", str(stats),
            "--env", PENDULUM, "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert out.is_file()
    with pytest.raises(SystemExit, match="--from-sb3"):
        main(["export", "--out", str(tmp_path / "x.onnx")])


def test_wrong_env_is_refused(td3_pendulum, tmp_path: Path) -> None:
    model_zip, stats = td3_pendulum
    cfg = SB3ImportConfig(model=model_zip, env_id="InvertedDoublePendulumBulletEnv-v0")
    with pytest.raises(ValueError, match="the model observes 5 values"):
        import_sb3(cfg, tmp_path / "no.onnx")
    assert not (tmp_path / "no.onnx").exists()
