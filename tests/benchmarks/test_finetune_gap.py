"""The reality-gap benchmark's bound: what the motor allows, on real panda-gym episodes."""

from __future__ import annotations

import argparse

import numpy as np
import onnxruntime as ort

from benchmarks.finetune_gap import EVAL_SEED, POLICY_DIR, GapEnv, reach_bound


def test_the_bound_beats_the_unadapted_policy_on_the_gap_and_nothing_beats_nominal() -> None:
    args = argparse.Namespace(seed=0, eval_episodes=10)
    nominal = reach_bound(False, args)["mean_return"]
    gap = reach_bound(True, args)["mean_return"]
    assert gap < nominal  # the weak motor is slower, whatever drives it
    session = ort.InferenceSession(str(POLICY_DIR / "policy.onnx"))
    env, returns = GapEnv(True, 0), []
    for i in range(args.eval_episodes):
        obs, total, done = env.reset(EVAL_SEED + i), 0.0, False
        while not done:
            action = session.run(None, {"obs": obs[None]})[0][0]
            obs, r, terminated, truncated = env.step(action)
            total, done = total + r, terminated or truncated
        returns.append(total)
    # The bound inverts the motor: it must do better than a policy that does not.
    assert gap > np.mean(returns) + 0.1
