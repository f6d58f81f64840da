"""The training side of the `mu` CLI, end to end on a real env (tiny budget)."""

import json

from controller.cli import main

SMALL = ["--set", "learning_starts=300", "--set", "batch_size=32", "--set", "actor_hidden=[32]",
         "--set", "critic_hidden=[32]", "--set", "eval_every=300", "--set", "eval_episodes=1",
         "--set", "checkpoint_every=300"]  # fmt: skip


def test_train_resume_export_eval_explain(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--env", "InvertedPendulumBulletEnv-v0", "--steps", "400", "--seed", "3"]
    assert main([*args, *SMALL, "--out", str(run)]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert (cfg["seed"], cfg["steps"], cfg["actor_hidden"]) == (3, 400, [32])

    assert main(["train", "--resume", str(run), "--steps", "700"]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 700
    assert (run / "evals.csv").read_text().splitlines()[-1].startswith("600,")

    assert main(["export", str(run), "--out", str(tmp_path / "p.onnx")]) == 0
    assert main(["eval", str(tmp_path / "p.onnx"), "--episodes", "2"]) == 0
    assert main(["explain", str(run), "--states", "2"]) == 0
    out = capsys.readouterr().out
    (report,) = [json.loads(line) for line in out.splitlines() if line.startswith('{"env_id"')]
    assert report["episodes"] == 2
    assert out.count("max |difference|") == 2


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--env", "InvertedPendulumBulletEnv-v0", "--set", "gamma=2"]) == 2
    assert "gamma must be in (0, 1]" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "p.onnx")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
