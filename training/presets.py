"""Per-environment training presets, in one place.

`TrainConfig`'s defaults are a plain, fast-learning TD3 ([256, 256], lr 1e-3, γ 0.99, 1000
random steps, observation normalization, 5-step returns). A preset overrides only what its
environment needs.
`zoo` reproduces RL Zoo's TD3 settings for the Bullet envs (td3.yml), for like-for-like
comparison with Stable-Baselines3.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any

from controller.errors import UsageError, read_text
from training.config import ALGO_SETTINGS, DEFAULT_STEPS

ZOO: dict[str, Any] = {
    "gamma": 0.98,
    "buffer_size": 200_000,
    "learning_starts": 10_000,
    "noise_std": 0.1,
    "batch_size": 256,
    "actor_lr": 7e-4,
    "critic_lr": 7e-4,
    "actor_hidden": [400, 300],
    "critic_hidden": [400, 300],
    "normalize_obs": False,
    "tau": 0.005,
    "policy_delay": 2,
    "target_noise": 0.2,
    "target_noise_clip": 0.5,
    "n_step": 1,
}

# Default preset per env id; ids not listed use TrainConfig's defaults.
BY_ENV: dict[str, dict[str, Any]] = {
    # Short (50-step) episodes with a dense distance reward, ended on success: a short horizon
    # learns faster, and 1-step returns measured better than 5 on Reach (return -0.196 vs -0.226
    # at 18k steps, seed 0).
    "PandaReachDense-v3": {"gamma": 0.95, "n_step": 1, "eval_every": 2000, "eval_episodes": 20},
    "PandaPushDense-v3": {"gamma": 0.95, "n_step": 1, "eval_every": 5000, "eval_episodes": 20},
    # Locomotion: RL Zoo's discount and larger nets; keep our normalization and faster start.
    "HalfCheetahBulletEnv-v0": {
        "gamma": 0.98,
        "actor_hidden": [400, 300],
        "critic_hidden": [400, 300],
    },
    "AntBulletEnv-v0": {"gamma": 0.98, "actor_hidden": [400, 300], "critic_hidden": [400, 300]},
    "HopperBulletEnv-v0": {"gamma": 0.98, "actor_hidden": [400, 300], "critic_hidden": [400, 300]},
    "Walker2DBulletEnv-v0": {
        "gamma": 0.98,
        "actor_hidden": [400, 300],
        "critic_hidden": [400, 300],
    },
}

# `robust`: the env's default preset plus domain randomization with published-practice ranges
# (sources in docs/sim_to_real.md): friction ×[0.5, 1.25] (legged_gym,
# Minitaur), mass and motor strength ×[0.8, 1.2] (Minitaur), latency 0-2 control steps
# (Minitaur 0-40 ms; Playground's Panda 1-3 steps), small joint damping, calibration offsets
# and sensor noise.
_LOCOMOTION_ROBUST: dict[str, Any] = {
    "rand_friction": [0.5, 1.25],
    "rand_mass": [0.8, 1.2],
    "rand_strength": [0.8, 1.2],
    "rand_damping": [0.0, 0.1],
    "rand_latency": [0, 1],
    "rand_offset": [-0.05, 0.05],
    "rand_obs_noise": [0.0, 0.05],
}
ROBUST: dict[str, dict[str, Any]] = {
    env_id: _LOCOMOTION_ROBUST
    for env_id in (
        "HalfCheetahBulletEnv-v0",
        "AntBulletEnv-v0",
        "HopperBulletEnv-v0",
        "Walker2DBulletEnv-v0",
    )
}
# The panda arms are position-controlled through IK: strength is the gain of the commanded
# end-effector displacement. Its range reaches 0.5 and the offset 0.25 of the half range because
# an arm's calibration drifts that far (finetune_gap's weak, biased motor: 0.5·a + 0.2). Up to
# one control step of actuation delay: a real arm applies its commands late (Playground's
# Panda randomizes 1-3 steps).
_ARM_ROBUST: dict[str, Any] = {
    "rand_friction": [0.5, 1.25],
    "rand_mass": [0.8, 1.2],
    "rand_strength": [0.5, 1.2],
    "rand_damping": [0.0, 0.1],
    "rand_latency": [0, 1],
    "rand_offset": [-0.25, 0.25],
    "rand_obs_noise": [0.0, 0.02],
}
ROBUST.update({"PandaReachDense-v3": _ARM_ROBUST, "PandaPushDense-v3": _ARM_ROBUST})


# The adaptation layers over `robust` (docs/sim_to_real.md), each measured apart by
# benchmarks/robustness.py: the last actions in the actor's input (the largest latency + 1:
# with a delay of k steps the last k actions make the state Markov again) and two past
# observations; a critic that sees the draws; ranges that widen from nominal, on a schedule
# that is a share of the run's steps (start, span): a walker at nominal for two thirds of the
# run, then widening over a sixth (HalfCheetah 150k: full from 125k); an arm over its first
# quarter (PandaReach 20k: 5 000 steps).
WIDEN_SHARE = {"locomotion": (Fraction(2, 3), Fraction(1, 6)), "arm": (Fraction(0), Fraction(1, 4))}
# `late-widening`: the nominal run for five sixths of the run, then the ranges widen over a
# twelfth and stay full for the last twelfth (HalfCheetah 150k: from 125k, full from 137.5k)
LATE_WIDEN_SHARE = (Fraction(5, 6), Fraction(1, 12))
# `final-widening`: later and shorter still, from eleven twelfths over a twenty-fourth
FINAL_WIDEN_SHARE = (Fraction(11, 12), Fraction(1, 24))
# `no-load`: the ranges without the knobs that change a walker's load per unit of motor power
# (mass, strength); a fast gait loses 5-22% of its return at mass 1.17 or strength 0.85
# whatever it trained on (benchmarks/README.md)
NO_LOAD = {"rand_mass": [], "rand_strength": []}
# `latency-only`: latency the one knob drawn, the one cell inside the ranges that the nominal
# walkers lose on every seed; late or final, it held fewer cells than the final widening of
# every knob (33 and 32 of 39 against 35 on HalfCheetah; benchmarks/README.md)
# `grown`: the history and privileged inputs join when the ranges widen (`grow_inputs`), so a
# run with them is the nominal run, gait included, until then (training/grow.py)
# `adaptive`: the layers that measured best in the ablation (benchmarks/README.md). A walker's
# is history and the privileged critic grown into the nominal run at the late widening: on
# HalfCheetah (150k, seeds 0-2, one run) it kept 0.97 of the nominal return and held 37 of 39
# cells inside the ranges against the nominal policies' 35, 80 of 216 outside against 74, with
# a worst quarter above theirs (-349 against -671). The final widening alone tied the nominal
# policies inside (35); history with the privileged critic from the first step is a different
# run whose gait is a draw of its own (0 cells on one seed). An arm's takes history, the
# privileged critic and the widening from the first step; the widening was neutral there.
ADAPTIVE = {
    "locomotion": ("history", "privileged", "late-widening", "grown"),
    "arm": ("history", "privileged", "widening"),
}


def _kind(env_id: str) -> str:
    return "arm" if ROBUST[env_id] is _ARM_ROBUST else "locomotion"


def adaptation_layers(env_id: str, steps: int = DEFAULT_STEPS) -> dict[str, dict[str, Any]]:
    """{layer: overrides} over `robust` for `env_id` trained for `steps`, in the order they
    stack (`ADAPTIVE` says which of them `--preset adaptive` takes)."""

    def widening(start: Fraction, span: Fraction) -> dict[str, int]:
        return {"rand_widen_start": int(start * steps), "rand_widen_steps": int(span * steps)}

    return {
        "history": {
            "history_obs": 2,
            "history_actions": int(max(ROBUST[env_id].get("rand_latency", [0]))) + 1,
        },
        "privileged": {"privileged_critic": True},
        "widening": widening(*WIDEN_SHARE[_kind(env_id)]),
        "late-widening": widening(*LATE_WIDEN_SHARE),
        "final-widening": widening(*FINAL_WIDEN_SHARE),
        "no-load": NO_LOAD,
        "latency-only": {k: [] for k in ROBUST[env_id] if k != "rand_latency"},
        "grown": {"grow_inputs": True},
    }


NAMED: dict[str, dict[str, Any]] = {
    "zoo": ZOO,
    "default": {},
    "robust": {},
    "adaptive": {},
}

# Per algorithm, over the env's preset: TD7 keeps its paper's networks (Fujimoto et al. 2023:
# 256 units in every layer of actor, critics and encoder). The locomotion presets' wider
# [400, 300] nets are RL Zoo's TD3 choice; under TD7 they cost 1.8× the update time
# (11.2 against 20.2 updates/s on CPU) for an architecture TD7 was not tuned with.
# DDPG's own settings (`config.ALGO_SETTINGS`) come over a preset's TD3 values (zoo's delay and
# target noise), so that only a user's own contrary value is refused.
BY_ALGO: dict[str, dict[str, Any]] = {
    "td7": {"actor_hidden": [256, 256], "critic_hidden": [256, 256]},
    "ddpg": ALGO_SETTINGS["ddpg"],
}


def preset(
    env_id: str, name: str | None = None, algo: str = "td3", steps: int = DEFAULT_STEPS
) -> dict[str, Any]:
    """Overrides for `env_id` trained with `algo` for `steps`: its default preset, or the named
    one (`zoo`, `default`, `robust`, `adaptive`), then the algorithm's own (`BY_ALGO`)."""
    if name is None:
        base = dict(BY_ENV.get(env_id, {}))
    elif name not in NAMED:
        raise UsageError(f"unknown preset {name!r}; choose from {sorted(NAMED)}")
    elif name in ("robust", "adaptive"):
        if env_id not in ROBUST:
            raise UsageError(
                f"no {name} preset for {env_id} (there is one for {sorted(ROBUST)}); "
                "set the ranges with --set rand_friction=[0.5,1.25] and the like"
            )
        base = {**BY_ENV.get(env_id, {}), **ROBUST[env_id]}
        if name == "adaptive":
            layers = adaptation_layers(env_id, steps)
            for layer in ADAPTIVE[_kind(env_id)]:
                # TD7's encoders cannot grow (training/grow.py): under TD7 a walker's
                # `adaptive` has its history and privileged critic from the first step
                if not (layer == "grown" and algo == "td7"):
                    base.update(layers[layer])
    else:
        base = {**BY_ENV.get(env_id, {}), **NAMED[name]} if name == "zoo" else dict(NAMED[name])
    return {**base, **BY_ALGO.get(algo, {})}


def load_preset_file(path: str | Path) -> dict[str, Any]:
    """A preset file: JSON of TrainConfig fields (`mu sweep` writes its best configuration as
    one, best_preset.json). Fields are checked when the TrainConfig is built."""
    text = read_text(path, f"preset file {path}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"preset file {path}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise UsageError(
            f"preset file {path}: expected {{field: value}}, got {type(data).__name__}"
        )
    if "seed" in data:
        raise UsageError(f"preset file {path}: a preset holds no seed; give --seed")
    return data
