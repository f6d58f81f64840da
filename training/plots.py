"""Learning curves from run directories (`evals.csv` + `config.json`), no torch.

Runs whose configs differ only in the seed are one curve: the mean over seeds, with ± one std
shaded, at the evaluation steps they share.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from controller.errors import MissingFile
from training.config import TrainConfig


def read_evals(run: Path) -> dict[str, np.ndarray]:
    """evals.csv as columns, the deployed actor's rows (the first named: TD7's checkpoint
    policy); success_rate is NaN where the env reports none."""
    path = Path(run) / "evals.csv"
    rows = list(csv.DictReader(open(path)))
    rows = [r for r in rows if r.get("actor") == rows[0].get("actor")]
    return {
        key: np.array([float(r[key]) if r[key] not in ("", "None") else np.nan for r in rows])
        for key in ("step", "wall_s", "return_mean", "success_rate")
    }


def group_by_config(runs: Sequence[Path]) -> dict[str, list[Path]]:
    """Runs keyed by a label of their config without the seed, in first-seen order. Configs
    compare as TrainConfigs, so a run saved before a field existed groups with the same config
    that writes the field's default (the equality `benchmarks.robustness` reuses runs by)."""
    groups: dict[str, list[Path]] = {}
    keys: dict[str, str] = {}
    for run in runs:
        cfg = dataclasses.replace(TrainConfig.load(Path(run) / "config.json"), seed=0)
        key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
        if key not in keys:
            name = Path(run).name.rsplit("-s", 1)[0] if "-s" in Path(run).name else Path(run).name
            keys[key] = name if name not in keys.values() else f"{name} ({len(keys)})"
        groups.setdefault(keys[key], []).append(Path(run))
    return groups


def plot_runs(runs: Sequence[str | Path], path: str | Path) -> Path:
    """Return against environment steps (and success rate, where reported), one curve per
    config; writes `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for run in runs:
        if not (Path(run) / "evals.csv").exists() or not (Path(run) / "config.json").exists():
            raise MissingFile(f"no evals.csv or config.json in {run}: not a run of mu train")
    groups = group_by_config([Path(r) for r in runs])
    curves = {label: [read_evals(r) for r in members] for label, members in groups.items()}
    has_success = any(
        np.isfinite(e["success_rate"]).any() for evals in curves.values() for e in evals
    )
    fig, axes = plt.subplots(1, 2 if has_success else 1, figsize=(11 if has_success else 6, 4))
    axes = np.atleast_1d(axes)
    for label, evals in curves.items():
        steps = sorted(set.intersection(*(set(e["step"]) for e in evals)))
        for ax, key in zip(axes, ("return_mean", "success_rate"), strict=False):
            ys = np.array([[e[key][list(e["step"]).index(s)] for s in steps] for e in evals])
            mean = ys.mean(0)
            text = label if len(evals) == 1 else f"{label} ({len(evals)} seeds)"
            (line,) = ax.plot(steps, mean, marker=".", label=text)
            if len(evals) > 1:  # the band in its curve's colour (not the cycle's next one)
                band = (mean - ys.std(0), mean + ys.std(0))
                ax.fill_between(steps, *band, alpha=0.2, color=line.get_color())
    axes[0].set(xlabel="environment steps", ylabel="evaluation return")
    if has_success:
        axes[1].set(xlabel="environment steps", ylabel="success rate", ylim=(-0.05, 1.05))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
