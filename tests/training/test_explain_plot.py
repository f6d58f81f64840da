"""`mu explain --plot`: Q over a 2-D action slice at a real state, and one actor step."""

import numpy as np
import pytest
import torch

from controller.cli import main
from training import checkpoint
from training.algos import create_agent
from training.config import TrainConfig
from training.envs import action_bounds, make_env
from training.explain_plot import one_actor_step

ENV = "PandaReachDense-v3"  # three action dimensions: a real 2-D slice


@pytest.fixture(scope="module", params=["td3", "td7"])
def agent_file(request, tmp_path_factory):
    env = make_env(ENV, 0)
    low, high = action_bounds(env)
    obs_dim = env.observation_space.shape[0]
    td7 = {"td7_zs_dim": 8} if request.param == "td7" else {}  # a td7 setting, td7 only
    cfg = TrainConfig(env_id=ENV, algo=request.param, actor_hidden=[16], critic_hidden=[16], **td7)
    torch.manual_seed(0)
    meta = {
        "env_id": ENV,
        "obs_dim": obs_dim,
        "act_dim": 3,
        "obs_layout": [list(p) for p in env.layout],
        "action_low": low.tolist(),
        "action_high": high.tolist(),
    }
    path = tmp_path_factory.mktemp(request.param) / "agent.pt"
    checkpoint.save(path, cfg, create_agent(cfg, obs_dim, 3), meta)
    return path


def test_one_actor_step_climbs_the_critic(agent_file):
    _, agent, _, _ = checkpoint.load(agent_file)
    obs = torch.randn(agent.normalizer.mean.numel())
    mu, dq_da, moved = one_actor_step(agent, obs, lr=1e-3)
    step = moved - mu
    assert np.abs(step).max() > 0
    assert step @ dq_da > 0  # Δa ≈ lr · (∂μ/∂u)(∂μ/∂u)ᵀ ∂Q/∂a: an ascent direction


def test_explain_plot_writes_the_png(agent_file, tmp_path, capsys):
    png = tmp_path / "slice.png"
    assert main(["explain", str(agent_file), "--states", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.stat().st_size > 10_000 and "one actor step moves μ(s)" in out
    assert (
        main(["explain", str(agent_file), "--states", "1", "--plot", str(png), "--dims", "0", "7"])
        == 2
    )
