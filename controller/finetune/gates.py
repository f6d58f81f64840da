"""Promotion gates for a candidate actor, checked in the serving process (onnxruntime, no torch).

The learner's export already refused any candidate whose onnxruntime output differs from torch
(training.export's parity gate). Here the candidate must also give finite actions inside the
bounds on recent served states, and stay close to the policy being served: the change of action,
as a fraction of the action range, is bounded per dimension (max) and on average (mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.contract import INPUT_NAME, OUTPUT_NAME
from controller.policy import ORT_ERRORS, Policy


@dataclass(frozen=True)
class GateResult:
    passed: bool
    reason: str
    max_change: float = float("nan")
    mean_change: float = float("nan")


def check_candidate(
    candidate: Policy,
    current: Policy,
    states: np.ndarray,
    max_change: float,
    mean_change: float,
    min_states: int,
) -> GateResult:
    """Gate the loaded `candidate` against the served `current` policy on `states` [n, obs_dim];
    a candidate that passes is served as loaded (Finetuner._consider)."""
    if len(states) < min_states:
        return GateResult(False, f"only {len(states)} recent states; the gate needs {min_states}")
    if candidate.obs_dim != current.obs_dim or candidate.act_dim != current.act_dim:
        return GateResult(False, "candidate dimensions differ from the served policy")
    try:
        states = np.ascontiguousarray(states, np.float32)
        new = candidate.session.run([OUTPUT_NAME], {INPUT_NAME: states})[0]
        old = current.session.run([OUTPUT_NAME], {INPUT_NAME: states})[0]
    except ORT_ERRORS as e:
        return GateResult(False, f"candidate does not run: {e}")
    if not np.isfinite(new).all():
        return GateResult(False, "candidate gives non-finite actions on recent states")
    # The served path clamps anyway; a candidate far outside its bounds is broken, not unlucky.
    span = current.high - current.low
    if (new < current.low - 1e-3 * span).any() or (new > current.high + 1e-3 * span).any():
        return GateResult(False, "candidate gives actions outside the bounds")
    change = np.abs(new - old) / span
    worst, mean = float(change.max()), float(change.mean())
    if worst > max_change:
        return GateResult(
            False,
            f"max action change {worst:.3f} of the range exceeds {max_change}",
            worst,
            mean,
        )
    if mean > mean_change:
        return GateResult(
            False,
            f"mean action change {mean:.3f} of the range exceeds {mean_change}",
            worst,
            mean,
        )
    return GateResult(True, "passed", worst, mean)
