"""One way from the command line to a `TrainConfig`. Layers, each over the one before: the
env's preset, the named preset (`--preset`), the algorithm's, a preset file (`--preset-file`),
`--set FIELD=VALUE`, then the flags. A flag is a shortcut for `--set` of its field; a flag and
a `--set` that disagree are refused, as is a preset file for another env."""

from __future__ import annotations

from typing import Any

from controller.errors import UsageError
from training.config import DEFAULT_STEPS, TrainConfig
from training.fields import parse_sets
from training.presets import load_preset_file, preset

# flag -> the field it sets
FLAGS = {"env": "env_id", "algo": "algo", "seed": "seed", "steps": "steps", "device": "device",
         "export": "export"}  # fmt: skip


def resolve(
    flags: dict[str, Any],
    sets: list[str],
    preset_name: str | None = None,
    preset_file: str | None = None,
) -> TrainConfig:
    """The TrainConfig of `mu train`: `flags` ({flag: value or None}, see FLAGS), `sets`
    (`FIELD=VALUE` items), the named preset and the preset file. Raises UsageError."""
    from_sets = parse_sets(TrainConfig, sets, "--set")
    from_flags = {FLAGS[k]: v for k, v in flags.items() if v is not None}
    for field, value in from_flags.items():
        if field in from_sets and from_sets[field] != value:
            flag = next(k for k, f in FLAGS.items() if f == field)
            raise UsageError(
                f"--{flag} {value} and --set {field}={from_sets[field]} disagree; give one"
            )
    from_file = load_preset_file(preset_file) if preset_file else {}
    chosen = {**from_file, **from_sets, **from_flags}
    env = chosen.get("env_id")
    if not env:
        raise UsageError("--env is required (or --resume RUN, or a --preset-file with env_id)")
    if from_file.get("env_id", env) != env:
        raise UsageError(f"--preset-file {preset_file} is for {from_file['env_id']}, not {env}")
    algo = chosen.get("algo", "td3")
    base = preset(env, preset_name, algo, chosen.get("steps", DEFAULT_STEPS))
    return TrainConfig.from_dict({**base, **chosen, "algo": algo})


def run_dir(cfg: TrainConfig) -> str:
    """The default run directory: runs/ENV-ALGO-sSEED."""
    return f"runs/{cfg.env_id}-{cfg.algo}-s{cfg.seed}"
