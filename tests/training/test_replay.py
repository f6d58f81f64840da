"""n-step returns from the replay buffer, on a case worked out by hand."""

import numpy as np
import pytest

from training.replay import ReplayBuffer


@pytest.mark.parametrize("capacity", [5, 8])  # 5: the buffer is exactly full (ring edge)
def test_n_step_sums_stop_at_episode_end_and_newest_step(capacity):
    rb = ReplayBuffer(capacity, obs_dim=1, act_dim=1)
    # steps 0..4 with rewards 1..5; step 2 ends an episode by truncation, nothing terminates
    for t in range(5):
        rb.add([t], [0.0], t + 1.0, [t + 0.5], terminal=False, truncated=(t == 2))
    batch = rb.sample(256, np.random.default_rng(0), n_step=3, gamma=0.5)
    want = {  # start step: (reward sum, discount, next_obs)
        0: (1 + 0.5 * 2 + 0.25 * 3, 0.125, 2.5),
        1: (2 + 0.5 * 3, 0.25, 2.5),  # stops at the episode end
        2: (3, 0.5, 2.5),
        3: (4 + 0.5 * 5, 0.25, 4.5),  # stops at the newest stored step
        4: (5, 0.5, 4.5),
    }
    seen = set()
    for obs, r, disc, nxt, term in zip(
        batch["obs"][:, 0],
        batch["reward"],
        batch["discount"],
        batch["next_obs"][:, 0],
        batch["terminal"],
        strict=True,
    ):
        t = int(obs)
        seen.add(t)
        assert (float(r), float(disc), float(nxt)) == pytest.approx(want[t])
        assert term == 0  # truncation never makes a target terminal
    assert seen == set(want)


def test_one_step_is_the_plain_td_transition():
    rb = ReplayBuffer(4, obs_dim=1, act_dim=1)
    rb.add([0], [0.0], 1.0, [9], terminal=True, truncated=False)
    batch = rb.sample(4, np.random.default_rng(0), n_step=1, gamma=0.9)
    assert batch["reward"].tolist() == [1.0] * 4 and batch["terminal"].tolist() == [1.0] * 4
    assert batch["discount"].numpy() == pytest.approx([0.9] * 4)
