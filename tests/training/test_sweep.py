"""`mu sweep` on local Ray (real Ray, real PyBullet, tiny budgets): trial run directories, the
ranked table, a failed trial beside finished ones, resume after an interrupt, the best preset."""

import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray", reason="mu sweep needs the [cluster] extra")
import ray  # noqa: E402

from controller.cli import main  # noqa: E402
from training.sweep import SweepConfig  # noqa: E402

ENV = "InvertedPendulumBulletEnv-v0"
TINY = {  # tests/training/test_trainer.py's small_cfg, shorter
    "learning_starts": 200,
    "batch_size": 32,
    "actor_hidden": [32],
    "critic_hidden": [32],
    "eval_every": 200,
    "eval_episodes": 1,
    "checkpoint_every": 400,
}
ROOT = Path(__file__).resolve().parents[2]


def sweep_file(path: Path, **kw) -> Path:
    data = {"env": ENV, "steps": 400, "seeds": [0], "set": TINY, **kw}
    path.write_text(yaml.safe_dump(data))
    return path


def test_sweep_interrupted_resumed_ranked_with_a_failed_trial(tmp_path, capsys):
    """Two valid configurations × two seeds and an invalid one (gamma > 1). `mu sweep` with
    one worker gets SIGINT once its first trial has finished; running it again keeps that
    trial as it was and runs the rest, the invalid one failing without stopping the others."""
    path = sweep_file(
        tmp_path / "two.yaml", name="two", space={"gamma": [0.99, 0.8, 2.0]}, seeds=[0, 1]
    )
    storage = tmp_path / "storage"
    cmd = [sys.executable, "-m", "controller.cli", "sweep", str(path)]
    cmd += ["--storage", str(storage), "--workers", "1"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc, lines), daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 300  # a bound against a hang, not a timing check
        while not any("c0-s0: finished" in line for line in seen):
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "mu sweep exited early:\n" + "".join(seen)
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    exp = storage / "two"
    first = (exp / "runs" / "c0-s0" / "evals.csv").read_bytes()
    assert not (exp / "runs" / "c1-s1").exists(), "the sweep finished before the interrupt"

    try:
        assert main(["sweep", str(path), "--storage", str(storage)]) == 1  # 1: a trial failed
    finally:
        ray.shutdown()
    printed = capsys.readouterr().out
    # same bytes, wall-clock column included: c0-s0 was not trained again
    assert (exp / "runs" / "c0-s0" / "evals.csv").read_bytes() == first
    results = json.loads((exp / "results.json").read_text())
    rows = {r["config"]: r for r in results["rows"]}
    for label in ("c0-s0", "c0-s1", "c1-s0", "c1-s1"):
        assert (exp / "runs" / label / "policy.onnx").exists(), label
    assert {f["label"] for f in results["failed"]} == {"c2-s0", "c2-s1"}
    assert all("gamma must be in (0, 1]" in f["error"] for f in results["failed"])
    assert rows["c2"]["mean"] is None and rows["c2"]["seeds_finished"] == 0

    # ranked by the mean over seeds of each trial's last evaluation return
    def last_return(label: str) -> float:
        return float((exp / "runs" / label / "evals.csv").read_text().split()[-1].split(",")[2])

    for c in ("c0", "c1"):
        scores = [last_return(f"{c}-s{s}") for s in (0, 1)]
        assert rows[c]["mean"] == pytest.approx(sum(scores) / 2)
    order = [r["config"] for r in results["rows"]]
    assert order[-1] == "c2"
    assert rows[order[0]]["mean"] >= rows[order[1]]["mean"]
    table = (exp / "results.txt").read_text()
    assert [line.split()[1] for line in table.splitlines()[2:5]] == order
    assert table in printed and "FAILED c2-s0" in table
    assert (exp / "curves.png").stat().st_size > 0

    # the best configuration as a preset file: mu train with it is that trial's run
    best = exp / "best_preset.json"
    out = tmp_path / "again"
    assert main(["train", "--preset-file", str(best), "--seed", "1", "--out", str(out)]) == 0
    trial = exp / "runs" / f"{order[0]}-s1"
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (trial / "config.json").read_text()
    )
    strip_wall = lambda p: [r.split(",")[:1] + r.split(",")[2:] for r in p.read_text().split()]  # noqa: E731
    assert strip_wall(out / "evals.csv") == strip_wall(trial / "evals.csv")


def test_invalid_sweep_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"space: \['gama'\] are not TrainConfig fields"):
        SweepConfig(env=ENV, space={"gama": [0.9]})
    with pytest.raises(ValueError, match="loguniform needs low < high and low > 0"):
        SweepConfig(env=ENV, space={"actor_lr": {"loguniform": [0, 1e-3]}})
    with pytest.raises(ValueError, match="seeds and steps have keys of their own"):
        SweepConfig(env=ENV, set={"seed": 3})
    with pytest.raises(ValueError, match="unknown keys"):
        SweepConfig.load(sweep_file(tmp_path / "x.yaml", seed=[1]))


def test_configurations_grid_times_draws(tmp_path):
    sweep = SweepConfig(
        env=ENV,
        space={"batch_size": [32, 64], "tau": {"uniform": [0.001, 0.01]}},
        samples=3,
        seeds=[0, 1],
    )
    points = sweep.configurations()
    assert [p["batch_size"] for p in points] == [32] * 3 + [64] * 3
    assert all(0.001 <= p["tau"] <= 0.01 for p in points)
    assert points == SweepConfig(**{**sweep.__dict__}).configurations()  # fixed draws
    labels = [t["label"] for t in sweep.trials()]
    assert labels[:3] == ["c0-s0", "c0-s1", "c1-s0"] and len(labels) == 12
    # YAML reads 1e-3 as a string; the sweep file reads it as a number
    (tmp_path / "s.yaml").write_text(
        f"env: {ENV}\nspace: {{actor_lr: [1e-3], buffer_size: [1e6]}}\n"
    )
    assert SweepConfig.load(tmp_path / "s.yaml").space == {
        "actor_lr": [0.001],
        "buffer_size": [1_000_000],
    }


def _read_lines(proc: subprocess.Popen, lines: queue.Queue) -> None:
    for line in proc.stdout:
        lines.put(line)
    lines.put(None)
