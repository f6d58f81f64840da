"""Environment wrapping: flat float32 observations in a recorded order, quiet pybullet."""

import numpy as np
import pytest

from training.config import TrainConfig
from training.envs import make_env
from training.presets import preset


def test_dict_observation_is_flattened_in_recorded_order():
    env = make_env("PandaReachDense-v3", seed=0)
    assert env.layout == [("achieved_goal", 3), ("desired_goal", 3), ("observation", 6)]
    raw, _ = env.unwrapped.reset(seed=3)
    flat, _ = env.reset(seed=3)
    assert flat.dtype == np.float32 and flat.shape == (12,)
    np.testing.assert_array_equal(flat[3:6], raw["desired_goal"])
    np.testing.assert_array_equal(flat[6:], raw["observation"])


def test_box_observation_layout_and_seeded_reset():
    env = make_env("InvertedPendulumBulletEnv-v0", seed=0)
    assert env.layout == [("obs", 5)]
    a, _ = env.reset(seed=7)
    b, _ = env.reset(seed=7)
    np.testing.assert_array_equal(a, b)


def test_pybullet_prints_nothing(capfd):
    make_env("HalfCheetahBulletEnv-v0", seed=0).reset()
    out, err = capfd.readouterr()
    assert "argv" not in out and "pybullet build time" not in err


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="gamma"):
        TrainConfig(gamma=1.5)
    with pytest.raises(ValueError, match="no field 'gama'; did you mean gamma"):
        TrainConfig.from_dict({"gama": 0.9})


def test_ddpg_is_a_configuration_of_td3():
    cfg = TrainConfig(algo="ddpg")
    assert (cfg.n_critics, cfg.target_noise, cfg.policy_delay) == (1, 0.0, 1)


def test_presets():
    assert preset("PandaReachDense-v3")["gamma"] == 0.95
    assert preset("HalfCheetahBulletEnv-v0", "zoo")["actor_hidden"] == [400, 300]
    # TD7 keeps its paper's 256-unit networks over the env's TD3 widths, and the rest
    cheetah, cheetah_td7 = (
        preset("HalfCheetahBulletEnv-v0"),
        preset("HalfCheetahBulletEnv-v0", algo="td7"),
    )
    assert cheetah["critic_hidden"] == [400, 300]
    assert cheetah_td7 == {**cheetah, "actor_hidden": [256, 256], "critic_hidden": [256, 256]}
    assert preset("HalfCheetahBulletEnv-v0", "robust", "td7")["rand_friction"] == [0.5, 1.25]
    with pytest.raises(ValueError, match="unknown preset"):
        preset("X", "fast")
