"""Online fine-tuning refuses a td7 agent with a message a person can act on."""

import pytest
import torch

from controller.finetune.config import FinetuneConfig, check_algo
from controller.finetune.learner import Learner
from training import checkpoint, td7
from training.config import TrainConfig


def test_learner_refuses_a_td7_agent(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(algo="td7", actor_hidden=[8], critic_hidden=[8], td7_zs_dim=4)
    meta = {"env_id": "InvertedPendulumBulletEnv-v0", "obs_dim": 5, "act_dim": 1}
    checkpoint.save(tmp_path / "agent.pt", cfg, td7.Agent.create(cfg, 5, 1), meta)
    with pytest.raises(ValueError, match="trained with td7.*supports td3 and ddpg"):
        Learner(FinetuneConfig(checkpoint=tmp_path / "agent.pt", versions_dir=tmp_path / "v"))


def test_serving_side_check_reads_the_policy_algo():
    check_algo("td3", "p.onnx")
    check_algo("ddpg", "p.onnx")
    with pytest.raises(ValueError, match="p.onnx was trained with td7.*without --finetune"):
        check_algo("td7", "p.onnx")
