"""Stable-Baselines3 import: a model trained briefly in a real env becomes a mu policy file whose
actions, served over gRPC, are SB3's `predict(normalized obs, deterministic=True)`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import gymnasium as gym
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from controller.cli import main
from controller.config import ServeConfig
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.server import start_in_thread
from training.envs import make_env
from training.sb3_import import SB3ImportConfig, import_sb3, sb3_algo

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


def onnx_props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(path).metadata_props}


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
    props = onnx_props(path)
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
    # the reference is SB3 itself on the raw Dict observations; the file gets them flattened in
    # the order it declares in mu.obs_layout
    env = gym.make(REACH)
    raw = [env.reset(seed=s)[0] for s in range(8)]
    env.close()
    layout = json.loads(onnx_props(path)["mu.obs_layout"])
    obs = np.asarray([np.concatenate([o[k] for k, _ in layout]) for o in raw], np.float32)
    batch = {k: np.stack([o[k] for o in raw]) for k in raw[0]}
    vec = VecNormalize.load(str(stats), DummyVecEnv([lambda: gym.make(REACH)]))
    vec.training = False
    want, _ = SAC.load(model_zip, device="cpu").predict(
        vec.normalize_obs(batch), deterministic=True
    )
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


def test_ddpg_without_vecnormalize(tmp_path: Path) -> None:
    """DDPG, trained on raw observations: the file takes them as they are."""
    env = make_env(PENDULUM, 0)
    model = DDPG("MlpPolicy", env, learning_starts=100, policy_kwargs={"net_arch": [32, 32]},
                 seed=0, device="cpu")  # fmt: skip
    model.learn(150)
    model.save(tmp_path / "ddpg.zip")
    assert sb3_algo(tmp_path / "ddpg.zip") == "ddpg"
    cfg = SB3ImportConfig(model=tmp_path / "ddpg.zip", env_id=PENDULUM, parity_samples=50)
    path = import_sb3(cfg, tmp_path / "ddpg.onnx")
    assert onnx_props(path)["mu.algo"] == "ddpg"
    obs = np.random.default_rng(2).normal(0, 1, (64, 5)).astype(np.float32)
    want, _ = model.predict(obs, deterministic=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["action"], {"obs": obs})[0], want, rtol=0, atol=TOL)


class ImageEnv(gym.Env):
    """Camera-like observations (36x36 grey pixels, what NatureCNN needs at least)."""

    observation_space = gym.spaces.Box(0, 255, (36, 36, 1), np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


IMAGE_ENV = "MuTestImage-v0"
if IMAGE_ENV not in gym.registry:
    gym.register(IMAGE_ENV, entry_point=ImageEnv, max_episode_steps=20)


class TinyExtractor(BaseFeaturesExtractor):
    """A custom feature extractor (anything but a flatten)."""

    def __init__(self, observation_space: gym.spaces.Box) -> None:
        super().__init__(observation_space, features_dim=4)
        self.net = torch.nn.Linear(int(np.prod(observation_space.shape)), 4)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)


def _saved(model, path: Path) -> Path:
    model.save(path)
    return path


def test_documented_refusals(tmp_path: Path) -> None:
    """Image observations, a custom extractor, and VecNormalize on only some Dict keys."""
    image = TD3("CnnPolicy", gym.make(IMAGE_ENV), buffer_size=100, seed=0, device="cpu")
    cfg = SB3ImportConfig(model=_saved(image, tmp_path / "image.zip"), env_id=IMAGE_ENV)
    with pytest.raises(ValueError, match="the actor uses a NatureCNN; only flattened vector"):
        import_sb3(cfg, tmp_path / "image.onnx")

    custom = TD3("MlpPolicy", make_env(PENDULUM, 0), seed=0, device="cpu",
                 policy_kwargs={"features_extractor_class": TinyExtractor})  # fmt: skip
    cfg = SB3ImportConfig(model=_saved(custom, tmp_path / "custom.zip"), env_id=PENDULUM)
    with pytest.raises(ValueError, match="the actor uses a TinyExtractor"):
        import_sb3(cfg, tmp_path / "custom.onnx")

    reach = TD3("MultiInputPolicy", gym.make(REACH), buffer_size=100, seed=0, device="cpu")
    partial = VecNormalize(DummyVecEnv([lambda: gym.make(REACH)]), norm_obs_keys=["observation"])
    partial.save(tmp_path / "partial.pkl")
    cfg = SB3ImportConfig(
        model=_saved(reach, tmp_path / "reach.zip"),
        env_id=REACH,
        vecnormalize=tmp_path / "partial.pkl",
    )
    with pytest.raises(ValueError, match="all keys must be normalized"):
        import_sb3(cfg, tmp_path / "reach.onnx")
    assert not any(tmp_path.glob("*.onnx"))
