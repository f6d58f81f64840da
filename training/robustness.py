"""Robustness sweeps: one or two policy files evaluated over a grid of shifted dynamics,
latency, offset and noise (1-D sweeps of every knob the env supports, plus friction × mass and
strength × offset heatmaps, the second a miscalibrated actuator: gain and bias at once), with
onnxruntime and the simulator only. Prints a table, writes JSON and a PNG.

Every policy meets the same cells, the same episode seeds and the same noise draws, so two
policies are compared cell by cell.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from controller.errors import UsageError
from training.envs import make_env
from training.evaluate import evaluate_session, load_session, policy_env_id
from training.randomization import NOMINAL, supported_knobs

# Points of each 1-D sweep: they reach past the robust presets' ranges to show generalization.
# Latency is whole control steps, so its seven points run 0-6.
SWEEPS: dict[str, list[float]] = {
    "friction": [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0],
    "mass": [0.5, 0.67, 0.83, 1.0, 1.17, 1.33, 1.5],
    "strength": [0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.4],
    "damping": [0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0],
    "latency": [0, 1, 2, 3, 4, 5, 6],
    "offset": [-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3],
    "obs_noise": [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5],
    "push": [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0],
}
HEATMAPS: list[dict[str, list[float]]] = [
    {"friction": [0.25, 0.5, 1.0, 1.5, 2.0], "mass": [0.5, 0.75, 1.0, 1.25, 1.5]},
    {"strength": [0.4, 0.55, 0.7, 1.0, 1.4], "offset": [-0.3, -0.15, 0.0, 0.15, 0.3]},
]


@dataclass
class Cell:
    shifts: dict[str, float]  # only the knobs away from nominal; {} is nominal
    returns: list[float] = field(default_factory=list)  # mean return, one per policy
    success: list[float | None] = field(default_factory=list)


@dataclass
class SweepResult:
    env_id: str
    policies: list[str]
    ranges: list[dict[str, list[float]]]  # each policy's training randomization
    episodes: int
    seed: int
    sweeps: dict[str, list[float]]
    heatmaps: list[dict[str, list[float]]]
    cells: list[Cell]

    def cell(self, shifts: dict[str, float]) -> Cell:
        key = cell_key(shifts)
        return next(c for c in self.cells if cell_key(c.shifts) == key)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, path: str | Path) -> SweepResult:
        data = json.loads(Path(path).read_text())
        data["cells"] = [Cell(**c) for c in data["cells"]]
        return cls(**data)


def cell_key(shifts: dict[str, float]) -> tuple:
    return tuple(sorted((k, float(v)) for k, v in shifts.items() if v != NOMINAL[k]))


def grid(env_id: str) -> tuple[dict[str, list[float]], list[dict[str, float]]]:
    """The knobs `env_id` supports with their sweep points, and the unique cells (1-D sweeps
    and the heatmaps; nominal once)."""
    env = make_env(env_id, 0)
    knobs = supported_knobs(env)
    env.close()
    sweeps = {k: v for k, v in SWEEPS.items() if k in knobs}
    cells = [{k: v} for k, points in sweeps.items() for v in points]
    for (a, xs), (b, ys) in (h.items() for h in heatmaps(sweeps)):
        cells += [{a: x, b: y} for x in xs for y in ys]
    unique: dict[tuple, dict[str, float]] = {}
    for c in cells:
        unique.setdefault(cell_key(c), {k: v for k, v in c.items() if v != NOMINAL[k]})
    return sweeps, list(unique.values())


def heatmaps(sweeps: dict[str, list[float]]) -> list[dict[str, list[float]]]:
    """The heatmaps whose two knobs are both swept."""
    return [h for h in HEATMAPS if all(k in sweeps for k in h)]


def sweep(
    policies: Sequence[str | Path], episodes: int = 10, seed: int = 0, progress: bool = True
) -> SweepResult:
    """Evaluate every policy (same env) on every cell of `grid`."""
    sessions = [load_session(str(p)) for p in policies]
    env_ids = {policy_env_id(s) for s in sessions}
    if len(env_ids) != 1:
        raise UsageError(f"policies are for different envs: {sorted(env_ids)}")
    (env_id,) = env_ids
    sweeps, shifts = grid(env_id)
    cells = [Cell(s) for s in shifts]
    for c in tqdm(cells, disable=not progress, unit="cell", desc=f"sweep {env_id}"):
        for sess in sessions:
            res = evaluate_session(sess, env_id, episodes, seed, c.shifts)
            c.returns.append(res.mean_return)
            c.success.append(res.success_rate)
    ranges = [
        json.loads(s.get_modelmeta().custom_metadata_map.get("mu.randomization", "{}"))
        for s in sessions
    ]
    return SweepResult(
        env_id, [str(p) for p in policies], ranges, episodes, seed, sweeps, heatmaps(sweeps), cells
    )


def merge(results: Sequence[SweepResult]) -> SweepResult:
    """Sweeps of the same env, grid, episodes and seed side by side, their policies in order:
    each policy meets the same cells, episode seeds and noise draws whatever it is swept with,
    so a policy swept alone merges into exactly the columns a joint sweep would give it."""
    first = results[0]
    keys = [cell_key(c.shifts) for c in first.cells]
    for r in results[1:]:
        if (r.env_id, r.episodes, r.seed) != (first.env_id, first.episodes, first.seed) or sorted(
            cell_key(c.shifts) for c in r.cells
        ) != sorted(keys):
            raise UsageError(
                f"cannot merge the sweep of {r.policies} ({r.env_id}, {r.episodes} episodes, "
                f"seed {r.seed}, {len(r.cells)} cells) with that of {first.policies} "
                f"({first.env_id}, {first.episodes} episodes, seed {first.seed}, "
                f"{len(first.cells)} cells)"
            )
    cells = [Cell(c.shifts) for c in first.cells]
    for r in results:
        by_key = {cell_key(c.shifts): c for c in r.cells}
        for c, key in zip(cells, keys, strict=True):
            c.returns += by_key[key].returns
            c.success += by_key[key].success
    return SweepResult(
        first.env_id,
        [p for r in results for p in r.policies],
        [x for r in results for x in r.ranges],
        first.episodes,
        first.seed,
        first.sweeps,
        first.heatmaps,
        cells,
    )


def inside(shifts: dict[str, float], ranges: dict[str, list[float]]) -> bool:
    """Whether every shifted knob lies within the training `ranges` (a knob not randomized
    in training is inside only at nominal)."""
    return all(k in ranges and ranges[k][0] <= v <= ranges[k][1] for k, v in shifts.items())


def table(result: SweepResult) -> str:
    """Return (and success, when the env reports it) per sweep point, one column per policy."""
    names = [Path(p).parent.name or Path(p).stem for p in result.policies]
    has_success = result.cells[0].success[0] is not None
    head = "| knob | value | " + " | ".join(names) + " |"
    lines = [
        f"{result.env_id}: mean return"
        + (" (success rate)" if has_success else "")
        + f" over {result.episodes} episodes; * = inside that policy's training range",
        head,
        "|" + " --- |" * (2 + len(names)),
    ]

    def fmt(c: Cell, i: int) -> str:
        text = f"{c.returns[i]:.3f}" if abs(c.returns[i]) < 10 else f"{c.returns[i]:.0f}"
        if has_success:
            text += f" ({c.success[i]:.2f})"
        return text + ("*" if inside(c.shifts, result.ranges[i]) and c.shifts else "")

    for knob, points in result.sweeps.items():
        for v in points:
            c = result.cell({knob: v})
            lines.append(
                f"| {knob} | {v:g} | " + " | ".join(fmt(c, i) for i in range(len(names))) + " |"
            )
    for (a, xs), (b, ys) in (h.items() for h in result.heatmaps):
        for x in xs:
            for y in ys:
                c = result.cell({a: x, b: y})
                cells = " | ".join(fmt(c, i) for i in range(len(names)))
                lines.append(f"| {a}×{b} | {x:g}×{y:g} | {cells} |")
    return "\n".join(lines)


def plot(result: SweepResult, path: str | Path) -> Path:
    """Mean return against each knob, policies overlaid with their training ranges shaded, and
    one heatmap of return per policy and knob pair (success rates are in the table: on
    panda-gym they saturate where returns still separate the policies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = list(result.sweeps)
    n_heat = len(result.policies) * len(result.heatmaps)
    cols = 4
    rows = -(-(len(knobs) + n_heat) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    names = [Path(p).parent.name or Path(p).stem for p in result.policies]
    for ax, knob in zip(axes.flat, knobs, strict=False):
        points = result.sweeps[knob]
        for i, name in enumerate(names):
            ys = [result.cell({knob: v}).returns[i] for v in points]
            line = ax.plot(points, ys, marker="o", label=name)[0]
            if knob in result.ranges[i]:
                lo, hi = result.ranges[i][knob]
                ax.axvspan(lo, hi, color=line.get_color(), alpha=0.12)
        ax.axvline(NOMINAL[knob], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(knob)
        ax.set_ylabel("return")
    axes.flat[0].legend(fontsize=7)
    panels = iter(list(axes.flat)[len(knobs) :])
    for (a, xs), (b, ys) in (h.items() for h in result.heatmaps):
        z = np.array(
            [
                [[result.cell({a: x, b: y}).returns[i] for x in xs] for y in ys]
                for i in range(len(names))
            ]
        )
        for i, name in enumerate(names):  # one colour scale per knob pair: policies compare
            ax = next(panels)
            im = ax.imshow(z[i], origin="lower", aspect="auto", vmin=z.min(), vmax=z.max())
            ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
            ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
            ax.set(xlabel=a, ylabel=b)
            ax.set_title(name, fontsize=8)
            fig.colorbar(im, ax=ax)
    for ax in list(axes.flat)[len(knobs) + n_heat :]:
        ax.axis("off")
    fig.suptitle(f"{result.env_id}: robustness over shifted dynamics ({result.episodes} episodes)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def run_sweep(
    policies: Sequence[str | Path], out: str | Path, episodes: int = 10, seed: int = 0
) -> tuple[SweepResult, str]:
    """`sweep`, then write out/sweep.json and out/sweep.png; returns the result and its table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = sweep(policies, episodes, seed)
    (out / "sweep.json").write_text(result.to_json())
    plot(result, out / "sweep.png")
    return result, table(result)
