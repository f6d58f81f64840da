"""Trainer on a real PyBullet env: reproducibility, exact resume, outputs of a run."""

import csv

import numpy as np
import onnxruntime as ort
import pytest
import torch

from training import checkpoint
from training.config import TrainConfig
from training.explain import explain
from training.trainer import train

ENV = "InvertedPendulumBulletEnv-v0"


def small_cfg(**kw) -> TrainConfig:
    base = dict(
        env_id=ENV,
        steps=1200,
        learning_starts=300,
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32],
        eval_every=600,
        eval_episodes=1,
        checkpoint_every=400,
    )
    return TrainConfig(**{**base, **kw})


def weights(run) -> dict[str, torch.Tensor]:
    _, agent, _, _ = checkpoint.load(run / "agent.pt")
    return {
        f"{m}.{k}": v for m, mod in agent.modules().items() for k, v in mod.state_dict().items()
    }


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train(small_cfg(), out, progress=False)
    return out


def test_run_writes_policy_checkpoints_and_logs(reference_run):
    for name in ["policy.onnx", "agent.pt", "checkpoint.pt", "config.json", "evals.csv"]:
        assert (reference_run / name).exists(), name
    rows = list(csv.DictReader(open(reference_run / "evals.csv")))
    assert [int(r["step"]) for r in rows] == [600, 1200]
    assert any((reference_run / "tb").iterdir())
    sess = ort.InferenceSession(str(reference_run / "policy.onnx"))
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["mu.env_id"] == ENV and meta["mu.train_steps"] == "1200"
    # the agent file carries no training state (what fine-tuning needs, without the buffer)
    assert checkpoint.load(reference_run / "agent.pt")[3] is None


def test_same_seed_is_bit_identical(reference_run, tmp_path):
    train(small_cfg(), tmp_path, progress=False)
    assert_same_weights(reference_run, tmp_path)
    a = (reference_run / "evals.csv").read_text().splitlines()
    b = (tmp_path / "evals.csv").read_text().splitlines()
    strip_wall = lambda lines: [line.split(",")[:1] + line.split(",")[2:] for line in lines]  # noqa: E731
    assert strip_wall(a) == strip_wall(b)


def test_other_seed_differs(reference_run, tmp_path):
    train(small_cfg(seed=1), tmp_path, progress=False)
    with pytest.raises(AssertionError):
        assert_same_weights(reference_run, tmp_path)


def test_resume_continues_exactly(reference_run, tmp_path):
    """Stop after the first checkpoint, resume to the end: same weights as one straight run."""
    train(
        small_cfg(steps=500), tmp_path, progress=False
    )  # checkpoint at the first episode end ≥ 400
    state = checkpoint.load(tmp_path / "checkpoint.pt")[3]
    assert 400 <= state["step"] <= 500
    assert state["replay"]["size"] == state["step"]
    with open(tmp_path / "evals.csv", "a") as f:  # an evaluation after it, then the kill
        f.write("600,1.0,-5.0,0.0,\n")
    train(small_cfg(), tmp_path, resume=True, progress=False)
    assert_same_weights(reference_run, tmp_path)
    rows = [(tmp_path / "evals.csv").read_text(), (reference_run / "evals.csv").read_text()]
    ours, straight = ([r.split(",")[:1] + r.split(",")[2:] for r in t.splitlines()] for t in rows)
    assert ours == straight  # the stray row is gone, the step evaluated once, as straight


def test_time_limit_truncation_is_stored_as_non_terminal(tmp_path):
    """PandaReach episodes end at the 50-step time limit (or earlier, terminated, on success).
    A truncated end must be stored as non-terminal, or the critic would learn that the last
    state is worth nothing."""
    cfg = small_cfg(
        env_id="PandaReachDense-v3", steps=400, learning_starts=256, checkpoint_every=100
    )
    train(cfg, tmp_path, progress=False)
    replay = checkpoint.load(tmp_path / "checkpoint.pt")[3]["replay"]
    obs, next_obs = replay["obs"].numpy(), replay["next_obs"].numpy()
    terminal = replay["terminal"].numpy().ravel()
    ends = [i for i in range(len(obs) - 1) if not np.array_equal(next_obs[i], obs[i + 1])]
    lengths = np.diff([-1, *ends])
    truncated = [e for e, n in zip(ends, lengths, strict=True) if n == 50]
    assert len(truncated) >= 3
    assert terminal[truncated].sum() == 0


def test_pendulum_falls_are_stored_as_terminal(reference_run):
    state = checkpoint.load(reference_run / "checkpoint.pt")[3]
    terminal = state["replay"]["terminal"].numpy().ravel()
    assert terminal.sum() > 0 and set(np.unique(terminal)) <= {0.0, 1.0}


def test_explain_prints_matching_sides(reference_run):
    text = explain(reference_run, states=3)
    diffs = [
        float(line.split("max |difference| ")[1].split(",")[0])
        for line in text.splitlines()
        if "max |difference|" in line
    ]
    cosines = [
        float(line.rsplit("cosine ", 1)[1]) for line in text.splitlines() if "cosine" in line
    ]
    assert len(diffs) == 3
    assert max(diffs) < 1e-5 and min(cosines) > 0.9999
