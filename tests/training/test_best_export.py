"""The trainer exports the actor with the best evaluation, not the last (and the last beside it)."""

import csv
import json

import onnxruntime as ort
import pytest

from controller.cli import main
from training.config import TrainConfig
from training.envs import EVAL_SEED_OFFSET
from training.evaluate import evaluate_onnx
from training.plots import group_by_config
from training.snapshots import choose_export
from training.trainer import train

ENV = "InvertedPendulumBulletEnv-v0"


def cfg(**kw) -> TrainConfig:
    base = dict(
        env_id="InvertedPendulumBulletEnv-v0",
        steps=1800,
        learning_starts=300,
        batch_size=32,
        actor_hidden=[32],
        critic_hidden=[32],
        eval_every=300,
        eval_episodes=2,
        checkpoint_every=900,
    )
    return TrainConfig(**{**base, **kw})


def props(path) -> dict[str, str]:
    return ort.InferenceSession(str(path)).get_modelmeta().custom_metadata_map


def remeasured(path, c: TrainConfig) -> float:
    """The file's return on the evaluation episodes the trainer used."""
    return evaluate_onnx(str(path), c.eval_episodes, c.seed + EVAL_SEED_OFFSET).mean_return


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("best")
    train(cfg(), out, progress=False)
    return out


def test_policy_onnx_is_the_best_evaluated_actor(run):
    rows = [
        (int(r["step"]), float(r["return_mean"])) for r in csv.DictReader(open(run / "evals.csv"))
    ]
    best_step, best = max(rows, key=lambda r: r[1])
    last_step, last = rows[-1]
    assert best > last, f"this run must peak before its end to show the rule: {rows}"

    meta = props(run / "policy.onnx")
    assert meta["mu.export_rule"] == "best"
    assert json.loads(meta["mu.eval_return"]) == pytest.approx(best)
    assert remeasured(run / "policy.onnx", cfg()) == pytest.approx(best, abs=1e-3)

    last_meta = props(run / "policy.last.onnx")
    assert last_meta["mu.export_rule"] == "last"
    assert remeasured(run / "policy.last.onnx", cfg()) == pytest.approx(last, abs=1e-3)
    assert (run / "curve.png").stat().st_size > 0


def test_export_last_restores_the_last_actor(run, tmp_path):
    train(cfg(export="last"), tmp_path, progress=False)  # same seed: the same run
    meta = props(tmp_path / "policy.onnx")
    assert meta["mu.export_rule"] == "last"
    last = float(list(csv.DictReader(open(run / "evals.csv")))[-1]["return_mean"])
    assert json.loads(meta["mu.eval_return"]) == pytest.approx(last)


def test_plot_overlays_runs(run, tmp_path, capsys):
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "new" / "c.png")]) == 0
    assert (tmp_path / "new" / "c.png").stat().st_size > 0  # the folder made, like mu explain
    assert main(["plot", str(tmp_path)]) == 2
    assert "no evals.csv" in capsys.readouterr().err


def test_runs_group_by_config_whatever_defaults_their_files_spell_out(run, tmp_path):
    cfg = json.loads((run / "config.json").read_text())
    older, other_seed, other_config = (tmp_path / n for n in ("a-s0", "a-s1", "b-s0"))
    for folder, fields in [
        (older, {k: v for k, v in cfg.items() if k != "rand_widen_start"}),  # saved before it
        (other_seed, {**cfg, "seed": cfg["seed"] + 1}),
        (other_config, {**cfg, "tau": cfg["tau"] / 2}),
    ]:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(fields))
    assert cfg["rand_widen_start"] == 0  # the default the older file leaves out
    groups = group_by_config([run, older, other_seed, other_config])
    assert list(groups.values()) == [[run, older, other_seed], [other_config]]


def test_choose_export_takes_the_best_evaluated_actor_over_the_last():
    meta = {"env_id": ENV}
    snap = lambda ret, step, who: {  # noqa: E731
        "eval_return": ret, "eval_success_rate": None, "step": step, "evaluated": who,
        "weights": {},
    }  # fmt: skip
    best, last = snap(-900.0, 2000, "current"), snap(-1200.0, 2400, "current")
    pick, chosen = choose_export("best", best, last, meta)
    assert pick is best and chosen["eval_return"] == -900.0 and chosen["eval_step"] == 2000
    assert chosen["export_rule"] == "best" and chosen["env_id"] == ENV
    # a tie or a better last actor: the last one, without an evaluation step
    pick, chosen = choose_export("best", snap(-1200.0, 800, "checkpoint"), last, meta)
    assert pick is last and "eval_step" not in chosen
    pick, chosen = choose_export("last", best, last, meta)
    assert pick is last and chosen["export_rule"] == "last"
    assert choose_export("best", None, last, meta)[0] is last
