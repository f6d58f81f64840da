"""The ablation's figures: its variants' configs, the robustness statistics, and the summary of
a sweep (a hand-made one: the training runs are the benchmark's, hours long)."""

import numpy as np
import pytest

from benchmarks.robustness import VARIANTS, overrides, report, summarize
from training.config import TrainConfig
from training.robust_stats import bootstrap_ci, iqm, worst_fraction_mean
from training.robustness import Cell, SweepResult

CHEETAH = "HalfCheetahBulletEnv-v0"


def test_variants_stack_the_adaptation_layers():
    configs = {
        v: TrainConfig.from_dict({**overrides(CHEETAH, v), "env_id": CHEETAH}) for v in VARIANTS
    }
    assert configs["nominal"].randomization == {}
    robust = configs["robust"].randomization
    assert robust and all(c.randomization == robust for v, c in configs.items() if v != "nominal")
    assert configs["robust"].history_actions == 0
    # the last actions reach past the largest latency
    assert configs["robust+history"].history_actions == robust["latency"][1] + 1
    assert not configs["robust+history"].privileged_critic
    assert configs["robust+history+privileged"].privileged_critic
    assert configs["adaptive"].rand_widen_steps > 0
    assert configs["adaptive"] == TrainConfig.from_dict(
        {**overrides(CHEETAH, "robust+history+privileged"), "env_id": CHEETAH,
         "rand_widen_steps": configs["adaptive"].rand_widen_steps}
    )  # fmt: skip


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
    ranges = [{}, *[{"mass": [0.8, 1.2]}] * 4]
    cells = [
        Cell({}, [100.0, 90.0, 95.0, 99.0, 100.0], [None] * 5),
        Cell({"mass": 1.1}, [70.0, 85.0, 90.0, 95.0, 96.0], [None] * 5),  # inside
        Cell({"mass": 2.0}, [10.0, 40.0, 50.0, 85.0, 90.0], [None] * 5),  # outside
    ]
    result = SweepResult(CHEETAH, variants, ranges, 1, 0, {"mass": [1.1, 2.0]}, [], cells)
    path = tmp_path / "sweep.json"
    path.write_text(result.to_json())
    s = summarize(str(path), variants)
    assert s["nominal"]["held_inside"] == 0.5 and s["adaptive"]["held_inside"] == 1.0
    assert s["robust"]["held_outside"] == 0.0 and s["adaptive"]["held_outside"] == 1.0
    assert s["robust"]["kept"] == pytest.approx(0.9)
    assert s["nominal"]["worst_cell"] == 10.0
    assert s["adaptive"]["worst25_mean"] == 90.0
    text = report({CHEETAH: [s, s, s]}, variants)
    assert "| HalfCheetahBulletEnv-v0 | adaptive | 100 [100, 100] |" in text
    assert "worst-25% mean" in text and len(text.splitlines()) == 2 + len(variants)
    assert np.isfinite(s["robust+history"]["mean_cell"])
