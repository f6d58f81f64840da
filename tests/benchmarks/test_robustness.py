"""The ablation's figures: its variants' configs, the robustness statistics, the summary of a
sweep (a hand-made one: the training runs are the benchmark's, hours long), and its per-run
sweeps, cached and merged (real sweeps of the bundled policies)."""

import os

import numpy as np
import pytest

from benchmarks.robustness import VARIANTS, overrides, report, stage_steps, summarize, sweep_run
from controller.errors import UsageError
from training.config import TrainConfig
from training.presets import preset
from training.robust_stats import bootstrap_ci, iqm, worst_fraction_mean
from training.robustness import Cell, SweepResult, grid, merge, sweep

CHEETAH = "HalfCheetahBulletEnv-v0"
STEPS = 150_000  # the ablation's budget


def test_variants_stack_the_adaptation_layers():
    def config(variant: str, **extra) -> TrainConfig:
        fields = {**overrides(CHEETAH, variant, STEPS), "env_id": CHEETAH, "steps": STEPS}
        return TrainConfig.from_dict({**fields, **extra})

    configs = {v: config(v) for v in VARIANTS}
    widen = {"rand_widen_start": 100_000, "rand_widen_steps": 25_000}
    assert configs["nominal"].randomization == {}
    robust = configs["robust"].randomization
    no_load = {k: v for k, v in robust.items() if k not in ("mass", "strength")}
    assert configs["robust+late-widening+no-load"].randomization == no_load
    for when in ("late", "final"):  # the latency knob alone, on the same schedules
        only = config(
            f"robust+{when}-widening", **{f"rand_{k}": [] for k in robust if k != "latency"}
        )
        assert configs[f"robust+{when}-widening+latency-only"] == only
        assert only.randomization == {"latency": robust["latency"]}
    fewer = (
        "nominal",
        "robust+late-widening+no-load",
        *(v for v in VARIANTS if "latency-only" in v),
    )
    assert robust and all(c.randomization == robust for v, c in configs.items() if v not in fewer)
    assert configs["robust"].history_actions == 0
    # the widening alone: the nominal run until 100k, then the robust ranges
    assert configs["robust+widening"] == config("robust", **widen)
    late = {"rand_widen_start": 125_000, "rand_widen_steps": 12_500}  # full for the last 12.5k
    assert configs["robust+late-widening"] == config("robust", **late)
    final = {"rand_widen_start": 137_500, "rand_widen_steps": 6_250}  # full for the last 6.25k
    assert configs["robust+final-widening"] == config("robust", **final)
    # the runs that are the nominal run until their ranges widen branch from it there
    assert {
        v: stage_steps(CHEETAH, v, STEPS) for v in VARIANTS if stage_steps(CHEETAH, v, STEPS)
    } == {
        "robust+widening": 100_000,
        "robust+late-widening": 125_000,
        "robust+late-widening+no-load": 125_000,
        "robust+final-widening": 137_500,
        "robust+late-widening+latency-only": 125_000,
        "robust+final-widening+latency-only": 137_500,
        "robust+history+privileged+late-widening+grown": 125_000,
        "robust+history+late-widening+grown": 125_000,
        "robust+privileged+late-widening+grown": 125_000,
        "robust+history+privileged+final-widening+grown": 137_500,
    }  # nor a privileged critic's from the first step: it sees the draws
    # the last actions reach past the largest latency
    assert configs["robust+history"].history_actions == robust["latency"][1] + 1
    assert not configs["robust+history"].privileged_critic
    assert configs["robust+history+privileged"].privileged_critic
    assert configs["robust+history+privileged+widening"] == config(
        "robust+history+privileged", **widen
    )
    assert configs["robust+history+privileged+late-widening"] == config(
        "robust+history+privileged", **late
    )
    for when, schedule in (("late", late), ("final", final)):  # the inputs join at the widening
        grown = configs[f"robust+history+privileged+{when}-widening+grown"]
        assert grown == config("robust+history+privileged", **schedule, grow_inputs=True)
    # the late grown recipe less one of its inputs
    history = {"history_obs": 2, "history_actions": robust["latency"][1] + 1}
    for one, inputs in (("history", history), ("privileged", {"privileged_critic": True})):
        variant = f"robust+{one}+late-widening+grown"
        assert configs[variant] == config("robust", **inputs, **late, grow_inputs=True)
    # `--preset adaptive` is the stack that measured best
    for env_id, best in ((CHEETAH, "robust+history+privileged+late-widening+grown"),
                         ("PandaReachDense-v3", "robust+history+privileged+widening")):  # fmt: skip
        adaptive = {**preset(env_id, "adaptive", steps=STEPS), "env_id": env_id, "steps": STEPS}
        ours = {**overrides(env_id, best, STEPS), "env_id": env_id, "steps": STEPS}
        assert TrainConfig.from_dict(adaptive) == TrainConfig.from_dict(ours)


def test_statistics():
    assert worst_fraction_mean([5, 1, 3, 2, 4, 6, 7, 8]) == 1.5  # the lowest quarter: 1, 2
    assert worst_fraction_mean([3, 9]) == 3  # at least one value
    assert iqm([1, 2, 3]) == 2  # three seeds: nothing cut
    assert iqm([100, 1, 2, 3, -50, 4, 5, 6]) == 3.5  # two cut from each end
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0])
    assert 1.0 <= lo < 2.0 < hi <= 3.0
    assert bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)


def test_summary_and_table(tmp_path):
    variants = list(VARIANTS)
    top = variants[-1]
    ranges = [{}, *[{"mass": [0.8, 1.2]}] * (len(variants) - 1)]
    none, middle = [None] * len(variants), len(variants) - 3  # nominal, robust, ..., top
    cells = [
        Cell({}, [100.0, 90.0, *[95.0] * middle, 100.0], none),
        Cell({"mass": 1.1}, [70.0, 85.0, *[90.0] * middle, 96.0], none),  # inside
        Cell({"mass": 2.0}, [10.0, 40.0, *[50.0] * middle, 90.0], none),  # outside
    ]
    result = SweepResult(CHEETAH, variants, ranges, 1, 0, {"mass": [1.1, 2.0]}, [], cells)
    s = summarize(result, variants, {"mass": [0.8, 1.2]})
    assert s["nominal"]["held_inside"] == 0.5 and s[top]["held_inside"] == 1.0
    assert s["robust"]["held_outside"] == 0.0 and s[top]["held_outside"] == 1.0
    assert s["robust"]["kept"] == pytest.approx(0.9)
    assert s["nominal"]["worst_cell"] == 10.0
    assert s[top]["worst25_mean"] == 90.0
    text = report({CHEETAH: [s, s, s]}, variants)
    assert f"| HalfCheetahBulletEnv-v0 | {top} | 100 [100, 100] |" in text
    assert "worst-25% mean" in text and len(text.splitlines()) == 2 + len(variants)
    assert np.isfinite(s["robust+history"]["mean_cell"])


def test_a_sweep_is_reused_only_while_newer_than_its_policy(tmp_path):
    policy = tmp_path / f"{CHEETAH}-robust-s0" / "policy.last.onnx"
    policy.parent.mkdir()
    policy.write_bytes(b"not onnx")  # a sweep that reads it fails: the cache was not used
    cells = [Cell(c, [0.0], [None]) for c in grid(CHEETAH)[1]]
    cached = SweepResult(CHEETAH, [str(policy)], [{}], 3, 10_000, {}, [], cells)
    path = tmp_path / f"sweep-{CHEETAH}-robust-s0.json"
    path.write_text(cached.to_json())
    assert sweep_run(CHEETAH, "robust", 0, str(tmp_path), 3) == str(path)
    with pytest.raises(UsageError, match="not an ONNX policy file"):
        sweep_run(CHEETAH, "robust", 0, str(tmp_path), 5)  # other episodes: swept again
    os.utime(policy, (path.stat().st_mtime + 1,) * 2)  # retrained after the sweep
    with pytest.raises(UsageError, match="not an ONNX policy file"):
        sweep_run(CHEETAH, "robust", 0, str(tmp_path), 3)


def test_policies_swept_alone_merge_into_their_joint_sweep():
    a, b = "policies/panda_reach/policy.onnx", "policies/panda_reach_robust/policy.onnx"
    joint = sweep([a, b], episodes=1, seed=10_000, progress=False)
    alone = [sweep([p], episodes=1, seed=10_000, progress=False) for p in (b, a)]
    merged = merge(alone[::-1])
    assert merged == joint  # every cell's returns, success rates, ranges and policies
    assert joint.cells[0].returns[0] != joint.cells[0].returns[1]  # two different policies
    alone[0].episodes = 2
    with pytest.raises(UsageError, match="cannot merge the sweep"):
        merge(alone)
