"""Evaluate a policy file alone: onnxruntime and the simulator, no torch.

`shifts` evaluates under fixed shifted dynamics, latency, offset or noise
(training/randomization.py's knobs, each held at one value)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import onnxruntime as ort

from controller import contract
from controller.errors import MissingFile, UsageError
from training.envs import make_env, run_episodes
from training.history import with_history
from training.randomization import randomize


@dataclass
class OnnxEval:
    env_id: str
    returns: list[float]
    success_rate: float | None
    shifts: dict[str, float]

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))


def load_session(path: str | Path) -> ort.InferenceSession:
    """onnxruntime's session of a policy file, or a one-line error saying what to give."""
    path = Path(path)
    if path.is_dir():
        hint = f"; its policy is {path / 'policy.onnx'}" if (path / "policy.onnx").exists() else ""
        raise UsageError(f"{path} is a directory: give a policy file (.onnx){hint}")
    if not path.is_file():
        raise MissingFile(f"no policy file at {path}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except contract.ORT_ERRORS as err:
        raise UsageError(f"{path} is not an ONNX policy file: {str(err)[:200]}") from None


def policy_env_id(sess: ort.InferenceSession) -> str:
    meta = sess.get_modelmeta().custom_metadata_map
    if contract.ENV_ID not in meta:
        raise UsageError("not a mu policy file (no mu.env_id metadata; `mu export` writes one)")
    return meta[contract.ENV_ID]


def shifted_env(env_id: str, seed: int, shifts: dict[str, float]) -> gym.Env:
    """`env_id` with every knob in `shifts` held at its value (noise seeded with `seed`)."""
    ranges = {k: [v, v] for k, v in shifts.items()}
    return randomize(make_env(env_id, seed), ranges, np.random.default_rng(seed))


def evaluate_session(
    sess: ort.InferenceSession,
    env_id: str,
    episodes: int,
    seed: int,
    shifts: dict[str, float] | None = None,
) -> OnnxEval:
    """Deterministic returns of `sess` on `env_id` under `shifts` ({knob: value}); episode i
    is reset with seed + i, and noise draws come from a generator seeded with `seed`."""
    shifts = dict(shifts or {})
    try:
        history = contract.history_spec(sess.get_modelmeta().custom_metadata_map)
    except (ValueError, TypeError) as err:  # its mu.history is not what mu export writes
        raise UsageError(f"not a usable mu policy file: {err}") from None
    env = shifted_env(env_id, seed, shifts)
    if history:  # the policy reads its own recent past: the same input as in training
        env = with_history(env, history["obs"], history["actions"])
    returns, rate = run_episodes(
        env,
        lambda obs: sess.run([contract.OUTPUT_NAME], {contract.INPUT_NAME: obs[None]})[0][0],
        episodes,
        seed,
    )
    env.close()
    return OnnxEval(env_id, returns, rate, shifts)


def evaluate_onnx(
    path: str,
    episodes: int = 10,
    seed: int = 0,
    env_id: str | None = None,
    shifts: dict[str, float] | None = None,
) -> OnnxEval:
    """Deterministic returns of the ONNX policy at `path` (see `evaluate_session`)."""
    sess = load_session(path)
    return evaluate_session(sess, env_id or policy_env_id(sess), episodes, seed, shifts)


def report(result: OnnxEval) -> str:
    return json.dumps(
        {
            "env_id": result.env_id,
            "episodes": len(result.returns),
            "mean_return": round(result.mean_return, 3),
            "min_return": round(min(result.returns), 3),
            "success_rate": result.success_rate,
            **({"shifts": result.shifts} if result.shifts else {}),
        }
    )
