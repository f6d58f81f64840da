"""What a user asks `mu train` / `mu export` / `mu eval` for is what runs, or is refused in one
line: settings resolve in one order, runs are not lost or silently replaced, and TD7 exports
the best actor it evaluated. Real envs, tiny budgets."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from controller.cli import main
from training import checkpoint
from training.config import TrainConfig
from training.envs import EVAL_SEED_OFFSET
from training.evaluate import evaluate_onnx
from training.trainer import train

REPO = Path(__file__).resolve().parents[2]
ENV = "InvertedPendulumBulletEnv-v0"
SMALL = ["--set", "learning_starts=200", "--set", "batch_size=32", "--set", "actor_hidden=[16]",
         "--set", "critic_hidden=[16]", "--set", "eval_every=200", "--set", "eval_episodes=1",
         "--set", "checkpoint_every=200"]  # fmt: skip


def props(path) -> dict[str, str]:
    return ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map


# -- settings --------------------------------------------------------------------------------


def test_set_seed_trains_that_seed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run directory is relative: runs/ENV-ALGO-sSEED
    assert main(["train", "--env", ENV, "--steps", "250", *SMALL, "--set", "seed=3"]) == 0
    run = tmp_path / "runs" / f"{ENV}-td3-s3"
    assert json.loads((run / "config.json").read_text())["seed"] == 3


def test_set_values_are_typed():
    from training.resolve import resolve

    cfg = resolve({"env": ENV}, ["normalize_obs=False", "actor_hidden=[64, 64]", "gamma=0.9"])
    assert cfg.normalize_obs is False and cfg.actor_hidden == [64, 64] and cfg.gamma == 0.9
    for item, says in (
        ("gamma=abc", "gamma expects a number"),
        ("actor_hidden=64", "actor_hidden expects a list"),
        ("normalize_obs=maybe", "normalize_obs expects true or false"),
        ("gama=0.9", "did you mean gamma"),
    ):
        with pytest.raises(ValueError, match=says):
            resolve({"env": ENV}, [item])


def test_normalize_obs_false_turns_normalization_off(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--env", ENV, "--steps", "250", *SMALL, "--set", "normalize_obs=False"]
    assert main([*args, "--out", str(run)]) == 0
    assert json.loads((run / "config.json").read_text())["normalize_obs"] is False
    _, agent, _, _ = checkpoint.load(run)
    assert not agent.normalizer.enabled


def test_flags_and_sets_that_disagree_are_refused(capsys):
    from training.resolve import resolve

    # (a small budget, so that code which does not refuse would end soon)
    assert (
        main(["train", "--env", ENV, "--steps", "250", *SMALL, "--seed", "1", "--set", "seed=3"])
        == 2
    )
    assert "--seed 1 and --set seed=3 disagree" in capsys.readouterr().err
    # agreeing is fine: the flag is a shortcut for the --set
    assert resolve({"env": ENV, "seed": 3}, ["seed=3"]).seed == 3


def test_algorithms_refuse_settings_they_contradict_or_ignore(capsys):
    from training.resolve import resolve

    short = ["train", "--env", ENV, "--steps", "250", *SMALL]  # should it not refuse: short
    assert main([*short, "--algo", "ddpg", "--set", "n_critics=2"]) == 2
    assert "algo ddpg does not take n_critics=2" in capsys.readouterr().err
    assert main([*short, "--algo", "td7", "--set", "critic_layer_norm=true"]) == 2
    assert "algo td7 does not take critic_layer_norm=True" in capsys.readouterr().err
    assert main([*short, "--set", "td7_zs_dim=8"]) == 2
    assert "td7_zs_dim=8 (a td7 setting)" in capsys.readouterr().err
    # a preset's TD3 values give way to DDPG's own; the user's unset fields are DDPG's
    cfg = resolve({"env": ENV, "algo": "ddpg"}, [], preset_name="zoo")
    assert (cfg.n_critics, cfg.target_noise, cfg.policy_delay) == (1, 0.0, 1)


def test_adaptive_widening_is_a_share_of_the_runs_steps():
    from training.resolve import resolve

    cheetah, panda = "HalfCheetahBulletEnv-v0", "PandaReachDense-v3"
    for steps, span in ((20_000, 5_000), (40_000, 10_000)):
        cfg = resolve({"env": panda, "steps": steps}, [], preset_name="adaptive")
        assert (cfg.rand_widen_start, cfg.rand_widen_steps) == (0, span)
    cfg = resolve({"env": panda}, ["steps=8000"], preset_name="adaptive")  # a --set counts too
    assert (cfg.rand_widen_start, cfg.rand_widen_steps) == (0, 2_000)
    # a walker's adaptive preset is the nominal run for 5/6 of its steps, then the widening,
    # where history and the privileged critic join ...
    for steps, start, span in ((150_000, 125_000, 12_500), (60_000, 50_000, 5_000)):
        cfg = resolve({"env": cheetah, "steps": steps}, [], preset_name="adaptive")
        assert (cfg.rand_widen_start, cfg.rand_widen_steps) == (start, span)
        assert cfg.history_actions == 2 and cfg.privileged_critic and cfg.grow_inputs
    # ... which TD7 cannot grow: its adaptive run has them from the first step
    cfg = resolve({"env": cheetah, "algo": "td7"}, [], preset_name="adaptive")
    assert cfg.history_actions == 2 and cfg.privileged_critic and not cfg.grow_inputs
    # ... and the user's own schedule is theirs
    cfg = resolve({"env": cheetah}, ["rand_widen_start=100", "rand_widen_steps=50"], "adaptive")
    assert (cfg.rand_widen_start, cfg.rand_widen_steps) == (100, 50)


def test_list_fields_documents_every_field(capsys):
    assert main(["train", "--list-fields"]) == 0
    out = capsys.readouterr().out
    for name in ("gamma", "n_critics", "rand_latency", "td7_zs_dim"):
        assert f"\n{name} (" in f"\n{out}"
    assert "Discount factor." in out


# -- runs --------------------------------------------------------------------------------------


def test_a_second_train_into_a_run_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--env", ENV, "--steps", "250", *SMALL, "--out", str(run)]) == 0
    before = (run / "policy.onnx").read_bytes()
    assert main(["train", "--env", "Pendulum-v1", "--steps", "250", *SMALL, "--out", str(run)]) == 2
    assert "holds a run already" in capsys.readouterr().err
    assert (run / "policy.onnx").read_bytes() == before
    assert (
        main(["train", "--env", ENV, "--steps", "250", *SMALL, "--out", str(run), "--overwrite"])
        == 0
    )


def test_resume_refuses_flags_it_would_ignore_and_never_goes_back(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--env", ENV, "--steps", "400", *SMALL, "--out", str(run)]) == 0
    first = json.loads(props(run / "policy.onnx")["mu.eval_return"])
    assert main(["train", "--resume", str(run), "--seed", "5", "--steps", "600"]) == 2
    assert "--seed would be ignored" in capsys.readouterr().err.replace(", ", " ")
    assert main(["train", "--resume", str(run), "--steps", "300"]) == 2  # below the run
    assert "is at step 400" in capsys.readouterr().err
    assert json.loads(props(run / "policy.onnx")["mu.eval_return"]) == first
    # a finished run resumes from its end-of-training checkpoint; the best export carries over
    assert main(["train", "--resume", str(run), "--steps", "600"]) == 0
    assert json.loads(props(run / "policy.onnx")["mu.eval_return"]) >= first


def test_ctrl_c_leaves_a_resumable_run_that_no_other_process_trains_meanwhile(tmp_path, capsys):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "controller.cli", "train", "--env", ENV, "--steps", "100000",
           *SMALL, "--out", str(run)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    deadline = time.monotonic() + 120  # ~10 s expected: imports, then 200 steps
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    # while it trains, the run is its alone: a second process is refused and deletes nothing
    replace = ["--env", ENV, "--steps", "250", *SMALL, "--out", str(run), "--overwrite"]
    for args in (replace, ["--resume", str(run)]):
        assert main(["train", *args]) == 2
        assert "another process is training into" in capsys.readouterr().err
    assert (run / "checkpoint.pt").exists() and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"mu train --resume {run}" in err
    step = checkpoint.load(run / "checkpoint.pt")[3]["step"]
    assert 200 <= step < 100000
    assert main(["train", "--resume", str(run), "--steps", str(step + 50)]) == 0
    assert (run / "policy.onnx").exists()


def test_resume_from_the_end_of_training_continues_exactly(tmp_path):
    """A checkpoint in the middle of an episode (the end of training, or Ctrl-C) replays the
    episode's start on resume: the same weights as one straight run."""
    cfg = TrainConfig(env_id=ENV, steps=700, learning_starts=200, batch_size=32,
                      actor_hidden=[16], critic_hidden=[16], eval_every=350, eval_episodes=1,
                      checkpoint_every=10_000)  # fmt: skip
    train(cfg, tmp_path / "straight", progress=False)
    short = TrainConfig.from_dict({**json.loads(cfg.to_json()), "steps": 437})
    train(short, tmp_path / "resumed", progress=False)
    episode = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")[3]["episode"]
    assert episode["length"] > 0  # stopped mid-episode
    train(cfg, tmp_path / "resumed", resume=True, progress=False)
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")[1]
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")[1]
    for name, module in a.modules().items():
        for k, v in module.state_dict().items():
            assert torch.equal(v, b.modules()[name].state_dict()[k]), f"{name}.{k}"


def test_export_of_a_run_writes_the_actor_of_its_policy(tmp_path):
    """`mu export RUN` exports agent.pt's actor: the one policy.onnx holds (the best evaluated
    by default), not the last checkpoint's."""
    run = tmp_path / "run"
    args = ["train", "--env", ENV, "--steps", "1000", *SMALL, "--set", "eval_episodes=2"]
    assert main([*args, "--out", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "p.onnx")]) == 0
    obs = checkpoint.load(run / "checkpoint.pt")[3]["replay"]["obs"].numpy()[-300:]
    ours = ort.InferenceSession(str(tmp_path / "p.onnx")).run(["action"], {"obs": obs})[0]
    want = ort.InferenceSession(str(run / "policy.onnx")).run(["action"], {"obs": obs})[0]
    np.testing.assert_allclose(ours, want, atol=1e-6)
    assert (
        props(tmp_path / "p.onnx")["mu.eval_return"] == props(run / "policy.onnx")["mu.eval_return"]
    )


def test_wrong_inputs_get_one_line(tmp_path, capsys):
    policy = REPO / "policies" / "panda_reach" / "policy.onnx"
    cases = [
        (["eval", str(tmp_path / "missing.onnx")], "no policy file at"),
        (["eval", str(REPO / "policies" / "panda_reach")], "is a directory: give a policy file"),
        (["eval", str(REPO / "README.md")], "is not an ONNX policy file"),
        (["explain", str(policy)], "is not a mu checkpoint"),
        (["export", str(tmp_path), "--out", str(tmp_path / "p.onnx")], "not a run directory"),
        (["train", "--resume", str(tmp_path)], "not a run directory"),
        (["train", "--env", "CartPole-v1"], "need continuous (Box) actions"),
    ]
    for args, says in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, (args, err)


# -- TD7's exported actor ----------------------------------------------------------------------


def test_td7_exports_the_best_actor_it_evaluated_where_its_checkpoint_freezes(tmp_path):
    """Pendulum's returns are negative and vary with the start state. A lucky early episode
    sets a checkpoint bar that later, better actors do not beat in one exploring episode: the
    checkpoint policy freezes while the current actor improves. The export takes the best
    evaluation of either actor."""
    cfg = TrainConfig(env_id="Pendulum-v1", algo="td7", steps=2400, learning_starts=400,
                      batch_size=32, actor_hidden=[32], critic_hidden=[32], td7_zs_dim=16,
                      td7_target_every=50, eval_every=400, eval_episodes=3)  # fmt: skip
    train(cfg, tmp_path, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "evals.csv")))
    by_actor = {
        name: [float(r["return_mean"]) for r in rows if r["actor"] == name]
        for name in ("checkpoint", "current")
    }
    assert len(set(by_actor["checkpoint"][-3:])) == 1  # the mechanism: the checkpoint froze
    assert max(by_actor["current"]) > max(by_actor["checkpoint"])  # and a later actor beat it
    best = max(by_actor["current"])
    meta = props(tmp_path / "policy.onnx")
    assert json.loads(meta["mu.eval_return"]) == pytest.approx(best)
    again = evaluate_onnx(str(tmp_path / "policy.onnx"), 3, cfg.seed + EVAL_SEED_OFFSET)
    assert again.mean_return == pytest.approx(best, abs=1e-3)
