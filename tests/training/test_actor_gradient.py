"""The actor update is the deterministic policy gradient: ∂Q/∂u = ∂Q/∂a · ∂μ/∂u."""

import copy

import torch

from training.config import TrainConfig
from training.explain import chain_rule_sides
from training.networks import Actor, Critics, Normalizer
from training.td3 import Agent, update


def test_autograd_actor_gradient_equals_chain_rule_product():
    torch.manual_seed(0)
    obs_dim, act_dim = 5, 3
    normalizer = Normalizer(obs_dim)
    normalizer.update(torch.randn(100, obs_dim) * 3 + 1)
    actor = Actor(obs_dim, act_dim, [16, 16]).double()
    critic = Critics(2, obs_dim, act_dim, [16, 16], layer_norm=False).double()
    normalizer.double()
    for _ in range(5):
        obs = torch.randn(obs_dim, dtype=torch.float64)
        left, dq_da, right = chain_rule_sides(normalizer, actor, critic, obs)
        assert left.shape == right.shape == (sum(p.numel() for p in actor.parameters()),)
        assert dq_da.abs().sum() > 0  # a non-trivial slope, so the comparison means something
        torch.testing.assert_close(left, right, rtol=1e-10, atol=1e-12)


def test_td3_update_gives_the_actor_the_mean_chain_rule_gradient():
    """The gradient `td3.update` leaves on the actor is -mean_b ∂Q/∂a · ∂μ/∂u over the batch."""
    torch.manual_seed(1)
    cfg = TrainConfig(batch_size=8, learning_starts=8, actor_hidden=[8], critic_hidden=[8])
    agent = Agent.create(cfg, obs_dim=4, act_dim=2)
    agent.normalizer.update(torch.randn(50, 4))
    batch = {
        "obs": torch.randn(8, 4),
        "action": torch.rand(8, 2) * 2 - 1,
        "reward": torch.randn(8),
        "next_obs": torch.randn(8, 4),
        "terminal": torch.zeros(8),
        "discount": torch.full((8,), 0.99),
    }
    actor_before = copy.deepcopy(agent.actor)
    update(agent, batch, cfg, update_actor=True)  # critic steps first, then the actor
    got = torch.cat([p.grad.reshape(-1) for p in agent.actor.parameters()])
    products = [
        chain_rule_sides(agent.normalizer, actor_before, agent.critic, o)[2] for o in batch["obs"]
    ]
    want = -torch.stack(products).mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
