"""Import a Stable-Baselines3 TD3, DDPG or SAC model as a mu policy file (contract 1).

    obs → VecNormalize statistics (clip_obs, epsilon) → SB3 actor → tanh → scale, bias → action

SB3 keeps the observation normalizer in a separate VecNormalize pickle and leaves action
unscaling to the caller; both go inside the graph here, so the file maps the raw observation to
the action in the environment's units like every mu policy. SAC is exported deterministically:
tanh of the mean, which is what `predict(obs, deterministic=True)` returns.

The file is written only when onnxruntime agrees with `model.predict(obs, deterministic=True)`
(on VecNormalize-normalized observations) to PARITY_TOL on observations of a rollout in the
real environment plus random ones around them.

SB3's model zip and VecNormalize file are pickles: loading one runs code from it. They are opened
only because the user asked for it (`mu export --from-sb3`), on files they trust.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DDPG, SAC, TD3
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.torch_layers import CombinedExtractor, FlattenExtractor
from stable_baselines3.common.vec_env import VecNormalize
from torch import nn

from controller.errors import UsageError
from training.envs import ObsLayout, action_bounds, make_env
from training.export import (
    PARITY_SAMPLES,
    contract_props,
    onnx_error,
    random_observations,
    to_onnx,
    write_checked,
)
from training.networks import Normalizer, Policy

log = logging.getLogger(__name__)


@dataclass
class SB3ImportConfig:
    """What `mu export --from-sb3` needs; saved next to the policy file."""

    #: The SB3 model zip (`model.save(...)`). A pickle: only files you trust.
    model: Path
    #: Gymnasium id the model was trained on; the parity check rolls out in it.
    env_id: str
    #: VecNormalize statistics (`vec_env.save(...)`), also a pickle; None = raw observations.
    vecnormalize: Path | None = None
    #: Rollout steps for the parity check (as many random observations are added).
    parity_samples: int = PARITY_SAMPLES
    #: Seed of the parity rollout and of the random observations.
    seed: int = 0

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if not self.model.is_file():
            raise UsageError(f"SB3 model {self.model} is not a file")
        if self.vecnormalize is not None:
            self.vecnormalize = Path(self.vecnormalize)
            if not self.vecnormalize.is_file():
                raise UsageError(f"VecNormalize file {self.vecnormalize} is not a file")
        if self.parity_samples < 10:
            raise UsageError(f"parity_samples must be at least 10, got {self.parity_samples}")

    def to_json(self) -> str:
        fields = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
        return json.dumps(fields, indent=2)


def sb3_algo(model_zip: Path) -> str:
    """'td3', 'ddpg' or 'sac', read from the zip's JSON `data` entry (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(model_zip) as archive:
            data = json.loads(archive.read("data"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise UsageError(f"{model_zip} is not a Stable-Baselines3 model zip: {e}") from None
    module = data.get("policy_class", {}).get("__module__", "")
    if module.startswith("stable_baselines3.sac."):
        return "sac"
    if module.startswith("stable_baselines3.td3."):
        # DDPG is TD3's code with no policy delay and no target-policy smoothing clip.
        ddpg = data.get("policy_delay") == 1 and data.get("target_noise_clip") == 0.0
        return "ddpg" if ddpg else "td3"
    raise UsageError(
        f"{model_zip} holds a {module or 'unknown'} policy; only TD3, DDPG and SAC actors "
        "(deterministic, continuous actions) can be imported"
    )


def load_trusted(cfg: SB3ImportConfig) -> tuple[str, BaseAlgorithm, VecNormalize | None]:
    """Unpickle the model (and VecNormalize statistics) the user asked to import."""
    algo = sb3_algo(cfg.model)
    log.warning(
        "loading pickled Stable-Baselines3 model %s: only import files you trust", cfg.model
    )
    model = {"td3": TD3, "ddpg": DDPG, "sac": SAC}[algo].load(cfg.model, device="cpu")
    if cfg.vecnormalize is None:
        return algo, model, None
    log.warning("loading pickled VecNormalize statistics %s", cfg.vecnormalize)
    with open(cfg.vecnormalize, "rb") as f:
        stats = pickle.load(f)  # the format VecNormalize.save writes; the user vouched for it
    if not isinstance(stats, VecNormalize):
        raise UsageError(f"{cfg.vecnormalize} holds a {type(stats).__name__}, not VecNormalize")
    return algo, model, stats


class SB3Actor(nn.Module):
    """SB3's deterministic actor on normalized, flat observations → action in [-1, 1]."""

    def __init__(self, model: BaseAlgorithm, algo: str) -> None:
        super().__init__()
        actor = model.policy.actor
        extractor = actor.features_extractor
        flat = isinstance(extractor, FlattenExtractor) or (
            isinstance(extractor, CombinedExtractor)
            and all(isinstance(e, nn.Flatten) for e in extractor.extractors.values())
        )
        if not flat:
            # Flattening each part and concatenating them in order is the flat vector itself;
            # any other extractor (CNN, custom) would have to go into the graph too.
            raise UsageError(
                f"the actor uses a {type(extractor).__name__}; only flattened vector "
                "observations (FlattenExtractor, CombinedExtractor of vectors) can be imported"
            )
        self.actor = actor
        self.sac = algo == "sac"

    def forward(self, obs_norm: torch.Tensor) -> torch.Tensor:
        if self.sac:
            return torch.tanh(self.actor.mu(self.actor.latent_pi(obs_norm)))
        return self.actor.mu(obs_norm)  # TD3/DDPG: mu ends in Tanh


def folded_normalizer(stats: VecNormalize | None, layout: ObsLayout) -> Normalizer:
    """VecNormalize's observation statistics as mu's frozen Normalizer, in layout order."""
    dim = sum(size for _, size in layout)
    if stats is None or not stats.norm_obs:
        return Normalizer(dim, enabled=False)
    if isinstance(stats.obs_rms, dict):
        keys = [name for name, _ in layout]
        if sorted(stats.obs_rms) != sorted(keys):
            raise UsageError(
                f"VecNormalize normalizes keys {sorted(stats.obs_rms)} of {keys}; mu's normalizer "
                "applies one clip to every value, so all keys must be normalized"
            )
        rms = [stats.obs_rms[k] for k in keys]
    else:
        rms = [stats.obs_rms]
    mean = np.concatenate([r.mean.reshape(-1) for r in rms])
    var = np.concatenate([r.var.reshape(-1) for r in rms])
    if mean.shape != (dim,):
        raise UsageError(f"VecNormalize statistics have {mean.size} values; the env has {dim}")
    normalizer = Normalizer(dim, clip=float(stats.clip_obs), eps=float(stats.epsilon))
    normalizer.shift.copy_(torch.as_tensor(mean, dtype=torch.float32))
    normalizer.scale.copy_(torch.as_tensor(1.0 / np.sqrt(var + stats.epsilon), dtype=torch.float32))
    return normalizer.eval()


def _to_sb3(flat: np.ndarray, space: gym.Space, layout: ObsLayout) -> Any:
    """Flat observations [n, dim] → what `model.predict` takes for `space` (batched)."""
    n = flat.shape[0]
    if isinstance(space, gym.spaces.Dict):
        out, start = {}, 0
        for name, size in layout:
            out[name] = flat[:, start : start + size].reshape(n, *space[name].shape)
            start += size
        return out
    return flat.reshape(n, *space.shape)


def reference_actions(
    model: BaseAlgorithm, stats: VecNormalize | None, flat: np.ndarray, layout: ObsLayout
) -> np.ndarray:
    """`model.predict(normalize(obs), deterministic=True)` for flat raw observations [n, dim]."""
    obs = _to_sb3(flat, model.observation_space, layout)
    if stats is not None:
        obs = stats.normalize_obs(obs)
    actions, _ = model.predict(obs, deterministic=True)
    return np.asarray(actions, np.float32).reshape(len(flat), -1)


def _check_env(model: BaseAlgorithm, env: gym.Env, layout: ObsLayout, env_id: str) -> None:
    space = model.observation_space
    if isinstance(space, gym.spaces.Dict) and list(space.spaces) != [n for n, _ in layout]:
        raise UsageError(
            f"the model observes keys {list(space.spaces)}; {env_id} gives {[n for n, _ in layout]}"
        )
    dim = sum(size for _, size in layout)
    model_dim = int(gym.spaces.flatdim(space))
    if model_dim != dim:
        raise UsageError(f"the model observes {model_dim} values; {env_id} gives {dim}")
    low, high = action_bounds(env)
    if not (
        np.array_equal(model.action_space.low, low)
        and np.array_equal(model.action_space.high, high)
    ):
        raise UsageError(
            f"the model's action bounds {model.action_space} differ from {env_id}'s "
            f"{env.action_space}: was it trained on another environment?"
        )


def _rollout(
    model: BaseAlgorithm, stats: VecNormalize | None, env: gym.Env, layout: ObsLayout, n: int
) -> np.ndarray:
    """Raw observations the imported policy itself visits in the real environment."""
    out = []
    obs, _ = env.reset()
    while len(out) < n:
        out.append(obs)
        action = reference_actions(model, stats, obs[np.newaxis], layout)[0]
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    return np.asarray(out, np.float32)


def import_sb3(cfg: SB3ImportConfig, out: str | Path) -> Path:
    """`mu export --from-sb3 MODEL.zip [--vecnormalize STATS.pkl] --env ID --out policy.onnx`.

    Raises UsageError when the model or the statistics do not fit the env, ParityError when
    onnxruntime disagrees with `model.predict`; nothing is written then.
    """
    out = Path(out)
    algo, model, stats = load_trusted(cfg)
    env = make_env(cfg.env_id, cfg.seed)
    try:
        layout = env.layout
        _check_env(model, env, layout, cfg.env_id)
        low, high = action_bounds(env)
        policy = Policy(folded_normalizer(stats, layout), SB3Actor(model, algo), low, high).eval()
        meta = {
            "env_id": cfg.env_id,
            "obs_dim": sum(size for _, size in layout),
            "act_dim": int(low.size),
            "action_low": low.tolist(),
            "action_high": high.tolist(),
            "obs_layout": [list(part) for part in layout],
            "train_steps": int(model.num_timesteps),
        }
        props = {**contract_props(meta, algo), "mu.imported_from": f"stable-baselines3 {algo}"}
        data = to_onnx(policy, meta["obs_dim"], props)
        visited = _rollout(model, stats, env, layout, cfg.parity_samples)
    finally:
        env.close()
    probes = np.concatenate([visited, random_observations(visited, cfg.parity_samples, cfg.seed)])
    err = onnx_error(data, probes, reference_actions(model, stats, probes, layout))
    write_checked(out, data, err, len(probes))
    (out.parent / f"{out.stem}.config.json").write_text(cfg.to_json())
    return out
