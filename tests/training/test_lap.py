"""LAP replay on a sum-tree: draws in proportion to priorities, O(log N) structure, exact state."""

import numpy as np
import pytest
import torch

from training.lap import PrioritizedReplay, SumTree
from training.replay import ReplayBuffer


def test_draws_are_proportional_to_priorities():
    tree = SumTree(6)
    priorities = np.array([1.0, 4.0, 0.5, 2.5, 0.0, 2.0])  # a zero is never drawn
    tree.set(np.arange(6), priorities)
    n = 200_000
    rng = np.random.default_rng(0)
    counts = np.bincount(tree.find(rng.uniform(0, tree.total, n)), minlength=tree.leaves)
    want = priorities / priorities.sum()
    np.testing.assert_allclose(counts[:6] / n, want, atol=0.005)
    assert counts[4] == 0 and counts[6:].sum() == 0


def test_find_matches_the_cumulative_sum_it_replaces():
    rng = np.random.default_rng(1)
    p = rng.uniform(0.1, 3.0, 1000)
    tree = SumTree(1000)
    tree.set(np.arange(1000), p)
    mass = rng.uniform(0, tree.total, 5000)
    want = np.searchsorted(np.cumsum(p), mass, side="right")  # the O(N) reference method
    np.testing.assert_array_equal(tree.find(mass), want)


@pytest.mark.parametrize("capacity", [1, 2, 5, 1000, 1 << 20])
def test_depth_is_logarithmic_and_inner_nodes_are_sums(capacity):
    tree = SumTree(capacity)
    assert tree.leaves >= capacity and tree.leaves < 2 * max(capacity, 1) + 1
    assert tree.depth == max(1, int(np.ceil(np.log2(capacity))))
    rng = np.random.default_rng(2)
    k = min(capacity, 4096)
    tree.set(rng.choice(capacity, k, replace=False), rng.uniform(1, 2, k))
    inner = np.arange(1, tree.leaves)
    np.testing.assert_allclose(tree.tree[inner], tree.tree[2 * inner] + tree.tree[2 * inner + 1])


def test_a_priority_write_touches_one_root_to_leaf_path():
    tree = SumTree(1 << 16)
    tree.set(np.arange(1 << 16), np.ones(1 << 16))
    before = tree.tree.copy()
    tree.set(np.array([12345]), np.array([7.0]))
    changed = np.flatnonzero(before != tree.tree)
    assert len(changed) == tree.depth + 1 == 17  # the leaf and its 16 ancestors, nothing else
    assert tree.total == (1 << 16) - 1 + 7.0


def fill(rb: ReplayBuffer, n: int) -> None:
    for t in range(n):
        rb.add([t], [0.1], float(t), [t + 1], terminal=False, truncated=(t % 7 == 6))


def test_prioritized_replay_new_transitions_get_the_max_and_priorities_move_draws():
    rb = PrioritizedReplay(64, obs_dim=1, act_dim=1)
    fill(rb, 10)
    assert rb.priority.get(np.arange(10)).tolist() == [1.0] * 10
    rb.update_priorities(np.array([3]), np.array([50.0]))
    fill(rb, 1)  # the next transition gets the largest priority seen
    assert rb.priority.get(np.array([10]))[0] == 50.0
    batch = rb.sample(4000, np.random.default_rng(0), n_step=1)
    share = (batch["index"].numpy() == 3).mean()
    assert share == pytest.approx(50 / (9 + 50 + 50), abs=0.03)
    rb.update_priorities(np.array([3, 10]), np.array([1.0, 1.0]))
    rb.reset_max_priority()
    assert rb.max_priority == 1.0


def test_prioritized_batches_carry_the_same_n_step_targets_as_uniform_replay():
    uniform, prioritized = ReplayBuffer(16, 1, 1), PrioritizedReplay(16, 1, 1)
    fill(uniform, 20)  # wraps the ring
    fill(prioritized, 20)
    batch = prioritized.sample(64, np.random.default_rng(3), n_step=3, gamma=0.9)
    idx = batch["index"].numpy()
    want = uniform.gather(idx, 3, 0.9)
    for k, v in want.items():
        assert torch.equal(batch[k], v), k
    # the encoder's target is one step on, even with n-step returns
    assert torch.equal(batch["next_obs_1"], torch.from_numpy(uniform.data["next_obs"][idx]))
    assert not torch.equal(batch["next_obs_1"], batch["next_obs"])


def test_state_dict_round_trip_rebuilds_the_identical_tree():
    rb = PrioritizedReplay(100, 1, 1)
    fill(rb, 37)
    rng = np.random.default_rng(4)
    rb.update_priorities(rng.integers(0, 37, 20), rng.uniform(1, 9, 20))
    other = PrioritizedReplay(100, 1, 1)
    other.load_state_dict(rb.state_dict())
    np.testing.assert_array_equal(other.priority.tree, rb.priority.tree)
    assert other.max_priority == rb.max_priority
    a = rb.sample(32, np.random.default_rng(5))
    b = other.sample(32, np.random.default_rng(5))
    assert all(torch.equal(a[k], b[k]) for k in a)
