"""The sim-to-real ablation: the same env, seeds and step budget trained as

    nominal                             the env's default preset
    robust                              `--preset robust`: domain randomization
    robust+widening                     + ranges that widen from nominal (alone: the nominal
                                        run, then its ranges widen; FastTD3's two stages)
    robust+late-widening                + the same, late and short (from 5/6 of the run)
    robust+late-widening+no-load        + without the mass and strength knobs
    robust+final-widening               + the widening later and shorter (from 11/12)
    robust+late-widening+latency-only   late widening of the latency knob alone
    robust+final-widening+latency-only  final widening of the latency knob alone
    robust+history                      + past observations and applied actions in the input
    robust+history+privileged           + a critic that sees the randomization draws
    robust+history+privileged+widening  + ranges that widen from nominal
    robust+history+privileged+late-widening   the same, widening from 5/6 of the run
    robust+history+privileged+late-widening+grown   the same, its inputs joining at 5/6: the
                                        nominal run until then (`grow_inputs`)
    robust+history+privileged+final-widening+grown  the same, widening and joining at 11/12

(layers from training/presets.py `adaptation_layers`; `--preset adaptive` is the stack that
measured best: robust+history+privileged+widening for an arm, robust+final-widening for a
walker, `ADAPTIVE`), then
every policy evaluated on the same grid of shifted dynamics (training/robustness.py) with
onnxruntime.

    python -m benchmarks.robustness --env PandaReachDense-v3=20000 \
        --env HalfCheetahBulletEnv-v0=150000/3 --seeds 0 1 2 [--variants robust+history+privileged]

`ID=STEPS/EPISODES` sets an env's evaluation episodes per cell (default `--episodes`): a
HalfCheetah episode is 1000 steps of near-deterministic physics, a PandaReach one 50 steps
with a random goal whose success rate needs more of them.

Each run's last actor is evaluated (`policy.last.onnx`), so the export rule, which picks the
best evaluation at nominal dynamics, favours no variant. Per policy: return at nominal
dynamics; the share of grid cells where it holds, inside and outside the robust preset's
training ranges; its worst cell and the mean of its worst quarter of cells. A cell holds when
the return is ≥ 80% of the *nominal-trained* policy's nominal return of the same seed, or, on
envs that report success (PandaReach), when the success rate is ≥ 0.9. "Kept at nominal" is
1 − (R_nominal − R_variant) / |R_nominal|, which reads as R_variant / R_nominal for positive
returns and stays meaningful for negative ones. Over seeds, each figure is the interquartile
mean with a 95% bootstrap interval (training/robust_stats.py).

The runs are exactly what `mu train --env ENV --steps N --seed S [--preset P] --set ...
--out RUNS/ENV-VARIANT-sS` writes; finished runs with the same config are reused, as are
sweeps newer than their policies (one per run, swept as soon as it is trained), and unfinished
runs resume from their last checkpoint (every 25k steps), so an interrupted benchmark reruns
cheaply. A run that is the nominal run until its ranges widen (a walker's widening variants)
is not trained from the first step: the nominal run's first W steps are trained once per
seed (RUNS/ENV-nominal-toW-sS, each length going on from the one before) and the run branches
from there (training/trainer.py `branch`), as does the nominal run from the longest; the bits
are a straight run's, at a fraction of the cost.

Prints a table and writes to --out JSON, a PNG of the figures and, per env, one of the
learning curves (return at nominal dynamics while training); a part of the ablation
(`--variants`: nominal, the reference, and those named) writes files of its own, named for its
variants, so it never overwrites the whole ablation's.
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from training.config import TrainConfig
from training.plots import plot_runs
from training.robustness import SweepResult, cell_key, grid, inside, merge, sweep

# variant -> the adaptation layers it stacks on `robust` (None: the nominal preset)
VARIANTS: dict[str, tuple[str, ...] | None] = {
    "nominal": None,
    "robust": (),
    "robust+widening": ("widening",),
    "robust+late-widening": ("late-widening",),
    "robust+late-widening+no-load": ("late-widening", "no-load"),
    "robust+final-widening": ("final-widening",),
    "robust+late-widening+latency-only": ("late-widening", "latency-only"),
    "robust+final-widening+latency-only": ("final-widening", "latency-only"),
    "robust+history": ("history",),
    "robust+history+privileged": ("history", "privileged"),
    "robust+history+privileged+widening": ("history", "privileged", "widening"),
    "robust+history+privileged+late-widening": ("history", "privileged", "late-widening"),
    "robust+history+privileged+late-widening+grown": (
        "history",
        "privileged",
        "late-widening",
        "grown",
    ),
    # the late grown recipe less one of its inputs
    "robust+history+late-widening+grown": ("history", "late-widening", "grown"),
    "robust+privileged+late-widening+grown": ("privileged", "late-widening", "grown"),
    "robust+history+privileged+final-widening+grown": (
        "history",
        "privileged",
        "final-widening",
        "grown",
    ),
}
HOLD_FRACTION = 0.8
HOLD_SUCCESS = 0.9


def overrides(env_id: str, variant: str, steps: int) -> dict[str, Any]:
    """TrainConfig fields of `variant` (VARIANTS) for `env_id` trained for `steps`."""
    from training.presets import adaptation_layers, preset

    layers = VARIANTS[variant]
    if layers is None:
        return preset(env_id)
    out = preset(env_id, "robust")
    for name in layers:
        out.update(adaptation_layers(env_id, steps)[name])
    return out


def config(env_id: str, variant: str, seed: int, steps: int) -> TrainConfig:
    """The TrainConfig of one run of `variant`."""
    fields = {**overrides(env_id, variant, steps), "env_id": env_id, "seed": seed, "steps": steps}
    return TrainConfig.from_dict(fields)


def stage_steps(env_id: str, variant: str, steps: int) -> int | None:
    """How many steps a run of `variant` is the nominal run before its ranges widen
    (`TrainConfig.nominal_stage`); None where it differs from the first step."""
    from controller.errors import UsageError

    try:
        stage = config(env_id, variant, 0, steps).nominal_stage()
    except UsageError:
        return None
    return stage.steps if stage == config(env_id, "nominal", 0, stage.steps) else None


def stage_dir(runs: str, env_id: str, seed: int, stage: int) -> Path:
    return Path(runs) / f"{env_id}-nominal-to{stage}-s{seed}"


def train_stages(env_id: str, seed: int, stages: list[int], runs: str) -> None:
    """Train (or reuse) the nominal run's first `stages` steps, each length a run of its own
    that goes on from the one before: what the runs that widen late branch from."""
    previous = None
    for length in sorted(stages):
        run = stage_dir(runs, env_id, seed, length)
        train_into(config(env_id, "nominal", seed, length), run, previous)
        previous = run


def train_into(cfg: TrainConfig, run: Path, stage: Path | None = None) -> None:
    """Reuse a finished run of `cfg` in `run` (fields added since take defaults), resume an
    unfinished one from its last checkpoint (every 25k steps); else branch it from `stage`, a
    finished run of the nominal run's first steps (`trainer.branch`: the same run, bit for
    bit), or train it."""
    from training.trainer import branch, train

    saved = run / "config.json"
    same = saved.exists() and TrainConfig.load(saved) == cfg
    if same and (run / "policy.onnx").exists():
        return
    if same and (run / "checkpoint.pt").exists():
        train(cfg, run, resume=True, progress=False)
    elif stage is not None and (stage / "policy.onnx").exists():
        branch(stage, cfg, run, progress=False, overwrite=True)
    else:
        train(cfg, run, overwrite=True, progress=False)


def train_run(
    env_id: str, variant: str, seed: int, steps: int, runs: str, branch_at: int | None = None
) -> str:
    """Train (or reuse) one run, branched from the nominal run's first `branch_at` steps where
    given; returns the path of its policy.onnx."""
    run = Path(runs) / f"{env_id}-{variant}-s{seed}"
    stage = stage_dir(runs, env_id, seed, branch_at) if branch_at else None
    train_into(config(env_id, variant, seed, steps), run, stage)
    return str(run / "policy.onnx")


def sweep_run(env_id: str, variant: str, seed: int, runs: str, episodes: int) -> str:
    """Sweep one run's last actor (or reuse its sweep); returns the JSON path.

    The last actor: the export rule (best evaluation at nominal) then favours no variant. One
    policy per sweep, merged per seed later (training/robustness.py `merge`): a retrained or
    added variant costs its own sweep, not the seed's.
    """
    from training.atomic import atomic_write

    policy = Path(runs) / f"{env_id}-{variant}-s{seed}" / "policy.last.onnx"
    path = Path(runs) / f"sweep-{env_id}-{variant}-s{seed}.json"
    if path.exists():
        cached = SweepResult.load(path)
        same_cells = {cell_key(c.shifts) for c in cached.cells} == {
            cell_key(c) for c in grid(env_id)[1]
        }
        # a run retrained since (its config changed) keeps its policy's path: sweep it again
        fresh = path.stat().st_mtime >= policy.stat().st_mtime
        same = cached.policies == [str(policy)] and cached.episodes == episodes
        if same and same_cells and fresh:
            return str(path)
    result = sweep([policy], episodes, seed=10_000, progress=False)
    atomic_write(path, result.to_json().encode())
    return str(path)


def run_variant(
    env_id: str,
    variant: str,
    seed: int,
    steps: int,
    runs: str,
    episodes: int,
    branch_at: int | None,
) -> str:
    """Train (or reuse) one run, then sweep it: a run is swept as soon as it is trained, so an
    interrupted benchmark keeps the sweeps of the runs it finished. Returns the sweep's path."""
    train_run(env_id, variant, seed, steps, runs, branch_at)
    return sweep_run(env_id, variant, seed, runs, episodes)


def robust_ranges(env_id: str) -> dict[str, list[float]]:
    """The robust preset's training ranges, {knob: [lo, hi]}: what "inside" means."""
    return TrainConfig.from_dict({**overrides(env_id, "robust", 1), "env_id": env_id}).randomization


def summarize(
    result: SweepResult, variants: list[str], ranges: dict[str, list[float]]
) -> dict[str, Any]:
    """Per variant of one seed's sweep (one policy per variant, in order): nominal return, kept
    share, cells held inside and outside `ranges`, worst cell and worst-quarter mean."""
    from training.robust_stats import worst_fraction_mean

    nominal = result.cell({})
    success = nominal.success[0] is not None
    ref = nominal.returns[variants.index("nominal")]  # the nominal policy at nominal dynamics
    out: dict[str, Any] = {"ref_return": ref}
    for i, variant in enumerate(variants):

        def holds(c, i=i) -> bool:
            if success:
                return c.success[i] >= HOLD_SUCCESS
            return c.returns[i] >= HOLD_FRACTION * ref

        cells_in = [c for c in result.cells if inside(c.shifts, ranges)]
        cells_out = [c for c in result.cells if not inside(c.shifts, ranges)]
        returns = [c.returns[i] for c in result.cells]
        out[variant] = {
            "nominal_return": nominal.returns[i],
            "nominal_success": nominal.success[i],
            "kept": 1 - (ref - nominal.returns[i]) / abs(ref),
            "held_inside": sum(map(holds, cells_in)) / len(cells_in),
            "held_outside": sum(map(holds, cells_out)) / len(cells_out),
            "cells_inside": len(cells_in),
            "cells_outside": len(cells_out),
            "mean_cell": float(np.mean(returns)),
            "worst_cell": float(np.min(returns)),
            "worst25_mean": worst_fraction_mean(returns, 0.25),
        }
    return out


SHARES = ("kept", "held_inside", "held_outside")  # fractions; the other columns are returns
COLUMNS = [
    ("nominal_return", "nominal return"),
    ("kept", "kept at nominal"),
    ("held_inside", "held inside"),
    ("held_outside", "held outside"),
    ("worst_cell", "worst cell"),
    ("worst25_mean", "worst-25% mean"),
]


def report(summaries: dict[str, list[dict[str, Any]]], variants: list[str]) -> str:
    """One row per env and variant; each figure the IQM over seeds [95% bootstrap interval]."""
    from training.robust_stats import describe

    head = "| env | policy | " + " | ".join(label for _, label in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (2 + len(COLUMNS))]
    for env_id, per_seed in summaries.items():
        for variant in variants:
            rows = [s[variant] for s in per_seed]
            big = abs(rows[0]["nominal_return"]) >= 10
            returns = ".0f" if big else ".3f"
            cells = [
                describe([r[key] for r in rows], ".2f" if key in SHARES else returns)
                for key, _ in COLUMNS
            ]
            lines.append(f"| {env_id} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(summaries: dict[str, list[dict[str, Any]]], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.robust_stats import bootstrap_ci, iqm

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.6), squeeze=False)
    keys = [("kept", "kept at nominal"), ("held_inside", "held inside"),
            ("held_outside", "held outside")]  # fmt: skip
    width = 0.8 / len(variants)
    for ax, (env_id, per_seed) in zip(axes.flat, summaries.items(), strict=True):
        x = np.arange(len(keys))
        for j, variant in enumerate(variants):
            vals = [[s[variant][k] for s in per_seed] for k, _ in keys]
            mid = [iqm(v) for v in vals]
            ci = np.array([bootstrap_ci(v) for v in vals]).T
            err = [np.subtract(mid, ci[0]), np.subtract(ci[1], mid)]
            ax.bar(x + (j - (len(variants) - 1) / 2) * width, mid, width, yerr=err, label=variant)
        ax.set_xticks(x, [label for _, label in keys])
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set_title(f"{env_id} (IQM over {len(per_seed)} seeds, 95% CI)", fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", action="append", required=True, metavar="ID=STEPS[/EPISODES]")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--episodes",
        type=int,
        default=10,
        help="evaluation episodes per cell (ID=STEPS/N: per env)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="variants to train and compare (nominal, the reference, always included)",
    )
    p.add_argument("--jobs", type=int, default=2, help="worker processes")
    p.add_argument("--runs", default="runs/robustness", help="run directories and sweeps")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    envs, episodes = {}, {}
    for item in args.env:
        env_id, _, budget = item.partition("=")
        steps, _, n = budget.partition("/")
        n = n or str(args.episodes)
        if not (steps.isdigit() and n.isdigit() and int(n) > 0):
            raise SystemExit(f"--env {item!r}: expected ID=STEPS or ID=STEPS/EPISODES (≥ 1)")
        envs[env_id], episodes[env_id] = int(steps), int(n)
    variants = [v for v in VARIANTS if v in {"nominal", *args.variants}]
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    jobs = [(e, v, s, n) for e, n in envs.items() for s in args.seeds for v in variants]
    # a run that is the nominal run until its ranges widen branches from a run of those first
    # nominal steps, trained once per seed first; the nominal run goes on from the longest
    stages = {(e, w) for e, v, _, n in jobs if (w := stage_steps(e, v, n))}

    def branch_at(env_id: str, variant: str, seed: int, steps: int) -> int | None:
        if variant != "nominal":
            return stage_steps(env_id, variant, steps)
        return max((w for e, w in stages if e == env_id), default=None)

    # each seed's sweeps, in the order of `variants`
    sweeps: dict[tuple[str, int], list[SweepResult]] = {
        (e, s): [] for e in envs for s in args.seeds
    }
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        lengths = {e: [w for f, w in stages if f == e] for e in envs}
        first = [(e, s, lengths[e], args.runs) for e in envs for s in args.seeds if lengths[e]]
        list(pool.map(train_stages, *zip(*first, strict=True)))
        extra = [args.runs] * len(jobs), [episodes[j[0]] for j in jobs]
        extra += ([branch_at(*j) for j in jobs],)
        for (env_id, _, seed, _), path in zip(
            jobs, pool.map(run_variant, *zip(*jobs, strict=True), *extra), strict=True
        ):
            print(f"trained and swept {path}", flush=True)
            sweeps[env_id, seed].append(SweepResult.load(path))
    summaries = {
        e: [summarize(merge(sweeps[e, s]), variants, robust_ranges(e)) for s in args.seeds]
        for e in envs
    }
    text = report(summaries, variants)
    print(text)
    name = "robustness_" + "_".join(f"{e.split('-')[0]}_{n}" for e, n in envs.items())
    if len(variants) < len(VARIANTS):  # a part of the ablation: its own files
        name += "_" + "_".join(v.replace("+", "-") for v in variants[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.txt").write_text(text + "\n")
    (out / f"{name}.json").write_text(
        json.dumps(
            {
                "envs": envs,
                "episodes": episodes,
                "seeds": args.seeds,
                "variants": {e: {v: overrides(e, v, n) for v in variants} for e, n in envs.items()},
                "summaries": summaries,
            },
            indent=1,
        )
    )
    plot(summaries, variants, out / f"{name}.png")
    for env_id in envs:  # the evaluation return at nominal dynamics while each variant trained
        runs = [Path(args.runs) / f"{env_id}-{v}-s{s}" for v in variants for s in args.seeds]
        curves = out / f"{name}_curves_{env_id.split('-')[0]}.png"
        print(f"wrote {plot_runs(runs, curves)}")
    print(f"wrote {out / name}.{{txt,json,png}}")


if __name__ == "__main__":
    main()
