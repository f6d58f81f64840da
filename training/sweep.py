"""`mu sweep SWEEP.yaml`: seeds and hyperparameter sweeps of `mu train` on Ray Tune.

The sweep file (YAML, or JSON):

    name: pendulum-lr           # experiment directory STORAGE/NAME (default: the file's stem)
    env: InvertedPendulumBulletEnv-v0
    preset: zoo                 # optional, as `mu train --preset`
    algo: td3
    set: {eval_every: 2000}     # fixed TrainConfig fields, as `mu train --set`
    steps: 10000
    seeds: [0, 1]
    metric: return              # or success_rate
    scope: last                 # a trial's score: its last evaluation, or its best
    space:                      # TrainConfig fields searched over
      actor_lr: [1.0e-3, 3.0e-4]                # a list: every value (grid)
      tau: {uniform: [0.001, 0.01]}             # drawn `samples` times per grid point
      critic_lr: {loguniform: [1.0e-4, 1.0e-2]}
      batch_size: {choice: [64, 256]}
    samples: 1
    asha: {grace_period: 2000, reduction_factor: 2}   # optional early stopping (steps)

Configurations are fixed before the sweep starts (the grid × draws from a generator seeded by
`sample_seed`) and every configuration runs with every seed, so each row of the results table
is one configuration's mean ± std over seeds. Each trial is a `training.trainer.train` call that
reports every evaluation to Tune; its run directory (exactly as `mu train` writes it) is the
trial's checkpoint, and `STORAGE/NAME/runs/cI-sSEED` points at it.

Results in STORAGE/NAME: results.txt and results.json (the table), curves.png (mean ± std over
seeds, `training.plots.plot_runs`), best_preset.json (`mu train --preset-file`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from controller.errors import UsageError, read_text
from training.config import TrainConfig
from training.presets import preset
from training.runner import RunnerConfig, error_line, run_trials

log = logging.getLogger(__name__)
SAMPLERS = ("uniform", "loguniform", "choice")
FIXED_BY_SWEEP = ("env_id", "seed", "steps")  # named by the sweep's own keys


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class SweepConfig:
    env: str = _f("", "Gymnasium id every trial trains on.")
    name: str = _f("sweep", "Experiment name: results go to STORAGE/NAME.")
    preset: str | None = _f(None, "Named preset (as mu train --preset); default: the env's own.")
    algo: str = _f("td3", "Algorithm of every trial (or a field of `space`).")
    set: dict[str, Any] = _f({}, "Fixed TrainConfig fields, as mu train --set.")
    steps: int = _f(10_000, "Environment steps per trial.")
    seeds: list[int] = _f([0], "Seeds; every configuration runs with each.")
    metric: str = _f("return", "Score of a trial: evaluation return, or success_rate.")
    scope: str = _f("last", "Which evaluation scores a trial: last, or best.")
    space: dict[str, Any] = _f(
        {}, "TrainConfig field -> list (grid) or {uniform|loguniform|choice}."
    )
    samples: int = _f(1, "Draws of the sampled fields per grid point.")
    sample_seed: int = _f(0, "Seed of those draws.")
    asha: dict[str, int] | None = _f(None, "ASHA early stopping: {grace_period, reduction_factor}.")
    cpus_per_trial: float = _f(1.0, "CPUs per trial.")

    def __post_init__(self) -> None:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        errors = []
        if not self.env:
            errors.append("env is required")
        if self.steps <= 0:
            errors.append("steps must be > 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            errors.append(f"seeds must be a non-empty list of distinct ints, got {self.seeds}")
        if self.metric not in ("return", "success_rate"):
            errors.append(f"metric must be return or success_rate, got {self.metric!r}")
        if self.scope not in ("last", "best"):
            errors.append(f"scope must be last or best, got {self.scope!r}")
        for key, what in ((self.set, "set"), (self.space, "space")):
            bad = sorted(set(key) - (fields - set(FIXED_BY_SWEEP)))
            if bad:
                errors.append(
                    f"{what}: {bad} are not TrainConfig fields a sweep may set "
                    f"(env, seeds and steps have keys of their own)"
                )
        for name, spec in self.space.items():
            errors += [f"space.{name}: {e}" for e in _check_spec(spec)]
        sampled = [n for n, s in self.space.items() if isinstance(s, dict)]
        if self.samples < 1 or (self.samples > 1 and not sampled):
            errors.append("samples must be >= 1, and > 1 only with a sampled field in space")
        if self.asha is not None and (
            set(self.asha) - {"grace_period", "reduction_factor"}
            or min(self.asha.values(), default=1) < 1
        ):
            errors.append("asha takes grace_period (steps) and reduction_factor, both >= 1")
        if errors:
            raise UsageError("invalid sweep: " + "; ".join(errors))
        preset(self.env, self.preset)  # raises on an unknown preset

    @classmethod
    def load(cls, path: str | Path) -> SweepConfig:
        import yaml

        text = read_text(path, f"sweep file {path}")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise UsageError(f"{path}: not YAML ({' '.join(str(err).split())})") from None
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a sweep file is a mapping of keys (see mu sweep --help)")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**{"name": Path(path).stem, **_numbers(data)})

    def configurations(self) -> list[dict[str, Any]]:
        """Each configuration's values of the searched fields, in a fixed order."""
        grid = {n: s for n, s in self.space.items() if isinstance(s, list)}
        drawn = {n: s for n, s in self.space.items() if isinstance(s, dict)}
        rng = np.random.default_rng(self.sample_seed)
        points = []
        for values in itertools.product(*grid.values()):
            for _ in range(self.samples):
                point = dict(zip(grid, values, strict=True))
                point.update({n: _draw(s, rng) for n, s in drawn.items()})
                points.append({n: point[n] for n in self.space})
        return points

    def overrides(self, point: dict[str, Any]) -> dict[str, Any]:
        """TrainConfig fields of one configuration (all but the seed)."""
        return {
            **preset(self.env, self.preset, point.get("algo", self.algo), self.steps),
            **self.set,
            "env_id": self.env,
            "algo": self.algo,
            "steps": self.steps,
            **point,
        }

    def trials(self) -> list[dict[str, Any]]:
        return [
            {"label": f"c{i}-s{seed}", "config": self.overrides(p), "seed": seed}
            for i, p in enumerate(self.configurations())
            for seed in self.seeds
        ]


def _numbers(data: Any) -> Any:
    """YAML reads 1e-3 (no dot) as a string: numbers written that way become numbers."""
    if isinstance(data, dict):
        return {k: _numbers(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_numbers(v) for v in data]
    if isinstance(data, str):
        try:
            x = float(data)
        except ValueError:
            return data
        if not math.isfinite(x):
            return data
        return int(x) if x.is_integer() and abs(x) >= 1 else x  # 1e6 for an int field
    return data


def _check_spec(spec: Any) -> list[str]:
    if isinstance(spec, list):
        return [] if spec else ["an empty list"]
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SAMPLERS:
        return [f"a list of values or one of {{{'|'.join(SAMPLERS)}: ...}}, got {spec!r}"]
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return [] if isinstance(args, list) and args else ["choice takes a non-empty list"]
    if not (isinstance(args, list) and len(args) == 2 and all(_is_num(a) for a in args)):
        return [f"{kind} takes [low, high], got {args!r}"]
    lo, hi = args
    if not lo < hi or (kind == "loguniform" and lo <= 0):
        return [f"{kind} needs low < high{' and low > 0' if kind == 'loguniform' else ''}"]
    return []


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    lo, hi = (math.log(a) for a in args) if kind == "loguniform" else args
    x = float(rng.uniform(lo, hi))
    return float(f"{math.exp(x) if kind == 'loguniform' else x:.4g}")  # readable in the table


def sweep_trial(params: dict[str, Any]) -> None:
    """One trial, in a Ray worker: `train` with the trial's config and seed, each evaluation
    reported to Tune, the run directory saved as the trial's checkpoint."""
    from ray import tune

    from training.trainer import train

    spec = params["trial"]
    cfg = TrainConfig.from_dict({**spec["config"], "seed": spec["seed"]})
    metric = spec.get("metric", "return")
    last: dict[str, Any] = {}

    def report(row: dict[str, Any]) -> None:
        if metric == "success_rate" and row["success_rate"] is None:
            raise UsageError(f"{cfg.env_id} reports no success rate; use metric: return")
        last.update(_metrics(row))
        tune.report(dict(last))

    with tempfile.TemporaryDirectory(prefix="mu-trial-") as tmp:
        run = Path(tmp) / spec["label"]
        train(cfg, run, progress=False, on_eval=report)
        # the checkpoint is copied to storage before report returns
        tune.report({**last, "final": True}, checkpoint=tune.Checkpoint.from_directory(run))


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    out = {
        "step": int(row["step"]),
        "wall_s": float(row["wall_s"]),
        "return": float(row["return_mean"]),
        "return_std": float(row["return_std"]),
    }
    if row["success_rate"] is not None:
        out["success_rate"] = float(row["success_rate"])
    return out


@dataclass
class SweepResult:
    table: str
    rows: list[dict[str, Any]]
    failed: list[dict[str, str]]
    out: Path
    best_preset: Path | None
    curves: Path | None


def run_sweep(sweep: SweepConfig, runner: RunnerConfig) -> SweepResult:
    """Run every configuration × seed of `sweep` on Ray Tune and summarize (module doc)."""
    from ray.tune.schedulers import ASHAScheduler

    trials = [{**t, "metric": sweep.metric} for t in sweep.trials()]
    # max_t one past the budget: ASHA stops a trial that reaches max_t at once, which would cut
    # it off between its last evaluation and its export
    scheduler = (
        ASHAScheduler(time_attr="step", max_t=sweep.steps + 1, **sweep.asha) if sweep.asha else None
    )
    # a trial seeds all it uses (as mu train does), so a worker process can run the next one
    runner = dataclasses.replace(
        runner, name=sweep.name, cpus_per_trial=sweep.cpus_per_trial, reuse_workers=True
    )
    grid = run_trials(
        sweep_trial, trials, runner, metric=sweep.metric, mode="max", scheduler=scheduler
    )
    remote = "://" in runner.storage
    out = Path("runs/sweeps", sweep.name) if remote else Path(runner.experiment)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    by_label: dict[str, dict[str, Any]] = {}
    for result in grid:
        label = result.config["trial"]["label"]
        by_label[label] = _trial_outcome(result, sweep, out / "runs" / label, remote)
    # a sweep stopped by Ctrl-C returns without the trials it never started
    unstarted = {"status": "stopped", "step": 0}
    outcomes = [
        by_label.get(t["label"], {"label": t["label"], "seed": t["seed"], **unstarted})
        for t in trials
    ]
    return summarize(sweep, outcomes, out)


def _trial_outcome(result: Any, sweep: SweepConfig, link: Path, remote: bool) -> dict[str, Any]:
    label = result.config["trial"]["label"]
    outcome: dict[str, Any] = {"label": label, "seed": result.config["trial"]["seed"]}
    if result.error is not None:
        return {**outcome, "status": "failed", "error": error_line(str(result.error))}
    df = result.metrics_dataframe
    scores = [] if df is None or sweep.metric not in df else df[sweep.metric].dropna().tolist()
    if result.checkpoint is None or not (result.metrics or {}).get("final"):
        step = int((result.metrics or {}).get("step", 0))
        return {**outcome, "status": "stopped", "step": step}
    if remote:  # results on a URI: bring the run here
        if not link.exists():
            result.checkpoint.to_directory(str(link))
    else:  # a resumed sweep may have rerun the trial into another checkpoint
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(result.checkpoint.path, link.parent))
    score = scores[-1] if sweep.scope == "last" else max(scores)
    return {**outcome, "status": "finished", "score": float(score), "run": str(link)}


def summarize(sweep: SweepConfig, outcomes: list[dict[str, Any]], out: Path) -> SweepResult:
    """The table (one row per configuration, sorted by the mean score), results.json,
    curves.png and best_preset.json in `out`."""
    points = sweep.configurations()
    rows = []
    for i, point in enumerate(points):
        mine = [o for o in outcomes if o["label"].rsplit("-s", 1)[0] == f"c{i}"]
        scores = [o["score"] for o in mine if o["status"] == "finished"]
        rows.append(
            {
                "config": f"c{i}",
                "params": point,
                "mean": float(np.mean(scores)) if scores else None,
                "std": float(np.std(scores)) if scores else None,
                "seeds_finished": len(scores),
                "seeds": len(mine),
                "trials": mine,
            }
        )
    rows.sort(key=lambda r: -math.inf if r["mean"] is None else r["mean"], reverse=True)
    failed = [
        {"label": o["label"], "error": o["error"]} for o in outcomes if o["status"] == "failed"
    ]
    table = _table(sweep, rows, failed, outcomes)
    best_preset = None
    if rows and rows[0]["mean"] is not None:
        best = int(rows[0]["config"][1:])
        best_preset = out / "best_preset.json"
        best_preset.write_text(json.dumps(sweep.overrides(points[best]), indent=2) + "\n")
    runs = [o["run"] for o in outcomes if o["status"] == "finished"]
    curves = None
    if runs:
        from training.plots import plot_runs

        curves = plot_runs(runs, out / "curves.png")
    (out / "results.txt").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps(
            {
                "sweep": dataclasses.asdict(sweep),
                "rows": rows,
                "failed": failed,
                "best_preset": str(best_preset) if best_preset else None,
            },
            indent=1,
        )
    )
    return SweepResult(table, rows, failed, out, best_preset, curves)


def _table(
    sweep: SweepConfig,
    rows: list[dict[str, Any]],
    failed: list[dict[str, str]],
    outcomes: list[dict[str, Any]],
) -> str:
    names = list(sweep.space)
    head = ["rank", "config", f"{sweep.metric} (mean ± std)", "seeds", *names]
    body = []
    for rank, r in enumerate(rows, 1):
        score = "-" if r["mean"] is None else f"{r['mean']:.4g} ± {r['std']:.2g}"
        cells = [str(rank), r["config"], score, f"{r['seeds_finished']}/{r['seeds']}"]
        body.append(cells + [_fmt(r["params"][n]) for n in names])
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    lines = [
        f"{sweep.env}, {sweep.steps} steps, seeds {sweep.seeds}: {sweep.metric} of each "
        f"trial's {sweep.scope} evaluation, mean ± std over seeds, best first",
        "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    for o in outcomes:
        if o["status"] == "stopped":
            lines.append(f"stopped {o['label']} at step {o['step']} (early stopping or interrupt)")
    lines += [f"FAILED {f['label']}: {f['error']}" for f in failed]
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, float) else json.dumps(x)
