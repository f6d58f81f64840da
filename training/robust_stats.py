"""Robustness figures a reviewer trusts: beside the share of grid cells a policy holds, its worst
cell and the mean of its worst quarter of cells (a tail the mean hides), and over seeds the
interquartile mean with a bootstrap confidence interval (Agarwal et al. 2021, rliable's method:
the mean of the middle half, cut with scipy's `trim_mean(x, 0.25)` convention, and percentile
intervals from resampling the seeds). numpy only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def worst_fraction_mean(values: Sequence[float], fraction: float = 0.25) -> float:
    """The mean of the lowest `fraction` of `values` (at least one value)."""
    x = np.sort(np.asarray(values, np.float64))
    return float(x[: max(1, int(np.ceil(fraction * len(x))))].mean())


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: `int(0.25 n)` values cut from each end, the rest averaged (with
    three seeds nothing is cut, and it is the mean)."""
    x = np.sort(np.asarray(values, np.float64))
    cut = int(0.25 * len(x))
    return float(x[cut : len(x) - cut].mean())


def bootstrap_ci(
    values: Sequence[float], level: float = 0.95, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of `iqm` over `samples` resamples (with replacement) of `values`."""
    x = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    stats = [iqm(x[rng.integers(0, len(x), len(x))]) for _ in range(samples)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [tail, 100 - tail])
    return float(lo), float(hi)


def describe(values: Sequence[float], fmt: str = ".2f") -> str:
    """'IQM [lo, hi]' of per-seed values."""
    lo, hi = bootstrap_ci(values)
    return f"{iqm(values):{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"
