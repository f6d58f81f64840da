"""Evaluate a policy file alone: onnxruntime and the simulator, no torch."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from training.envs import make_env, run_episodes


@dataclass
class OnnxEval:
    env_id: str
    returns: list[float]
    success_rate: float | None

    @property
    def mean_return(self) -> float:
        return float(np.mean(self.returns))


def evaluate_onnx(
    path: str, episodes: int = 10, seed: int = 0, env_id: str | None = None
) -> OnnxEval:
    """Deterministic returns of the ONNX policy at `path`; episode i is reset with seed + i."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    env_id = env_id or sess.get_modelmeta().custom_metadata_map["mu.env_id"]
    env = make_env(env_id, seed)
    returns, rate = run_episodes(
        env, lambda obs: sess.run(["action"], {"obs": obs[None]})[0][0], episodes, seed
    )
    env.close()
    return OnnxEval(env_id, returns, rate)


def report(result: OnnxEval) -> str:
    return json.dumps(
        {
            "env_id": result.env_id,
            "episodes": len(result.returns),
            "mean_return": round(result.mean_return, 3),
            "min_return": round(min(result.returns), 3),
            "success_rate": result.success_rate,
        }
    )
