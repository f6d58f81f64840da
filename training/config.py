"""`TrainConfig`: every setting of a training run, documented, validated, saved with the run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.errors import UsageError
from training.fields import check_types, unknown_field


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


DEFAULT_STEPS = 50_000
# the schedule of the rand_* ranges (training/randomization.py `widening_scale`), not a knob
WIDENING = ("rand_widen_start", "rand_widen_steps")
# The settings each algorithm fills where the user left them unset: DDPG is TD3 with one critic,
# no target-policy noise and no delay, so a ddpg run refuses any other value of these.
ALGO_SETTINGS: dict[str, dict[str, Any]] = {
    "td3": {"n_critics": 2, "policy_delay": 2, "target_noise": 0.2},
    "td7": {"n_critics": 2, "policy_delay": 2, "target_noise": 0.2},
    "ddpg": {"n_critics": 1, "policy_delay": 1, "target_noise": 0.0},
}
# Fields an algorithm never reads: a value other than the default is refused, not dropped.
_TD7_ONLY = "a td7 setting"
IGNORED: dict[str, dict[str, str]] = {
    "td3": {},
    "ddpg": {"target_noise_clip": "ddpg adds no target-policy noise to clip"},
    "td7": {
        "critic_layer_norm": "td7's critics normalize with AvgL1Norm (training/sale.py)",
        "grow_inputs": "td7's encoders would need growing too (training/grow.py)",
    },
}
for _algo in ("td3", "ddpg"):
    IGNORED[_algo].update(
        {
            name: _TD7_ONLY
            for name in (
                "td7_zs_dim",
                "td7_target_every",
                "td7_lap_alpha",
                "td7_min_priority",
                "td7_checkpoint_episodes",
                "td7_checkpoint_switch",
            )
        }
    )


@dataclass
class TrainConfig:
    env_id: str = _f("InvertedPendulumBulletEnv-v0", "Gymnasium environment id.")
    algo: str = _f(
        "td3", "td3, ddpg (one critic, no target noise, no delay), or td7 (training/td7.py)."
    )
    steps: int = _f(DEFAULT_STEPS, "Environment steps to train for.")
    seed: int = _f(0, "Seed of torch, numpy, the training env and (offset) the eval env.")
    device: str = _f("cpu", "Torch device for networks and updates: cpu or cuda.")
    # networks
    actor_hidden: list[int] = _f([256, 256], "Hidden layer sizes of the actor MLP.")
    critic_hidden: list[int] = _f([256, 256], "Hidden layer sizes of each critic MLP.")
    critic_layer_norm: bool = _f(False, "LayerNorm after each hidden layer of the critics.")
    normalize_obs: bool = _f(True, "Running observation normalization (frozen at export).")
    # TD3 update
    n_critics: int | None = _f(
        None, "Critics in the ensemble; the target takes their minimum (unset: 2, ddpg 1)."
    )
    gamma: float = _f(0.99, "Discount factor.")
    n_step: int = _f(5, "Rewards summed in the TD target before bootstrapping (n-step return).")
    tau: float = _f(0.005, "Polyak rate of the target networks.")
    actor_lr: float = _f(1e-3, "Adam learning rate of the actor.")
    critic_lr: float = _f(1e-3, "Adam learning rate of the critics.")
    batch_size: int = _f(256, "Transitions per update.")
    policy_delay: int | None = _f(
        None, "Critic updates per actor (and target) update (unset: 2, ddpg 1)."
    )
    target_noise: float | None = _f(
        None, "Std of target-policy smoothing noise, in [-1, 1] action units (unset: 0.2, ddpg 0)."
    )
    target_noise_clip: float = _f(0.5, "Clip of target-policy smoothing noise.")
    # TD7 (algo td7 only; training/td7.py): SALE, LAP, value clipping, policy checkpoints
    td7_zs_dim: int = _f(256, "Size of the SALE embeddings zs and zsa.")
    td7_target_every: int = _f(250, "Updates between hard target copies and encoder refreshes.")
    td7_lap_alpha: float = _f(0.4, "LAP exponent: priority = max(|TD error|, min)^alpha.")
    td7_min_priority: float = _f(1.0, "LAP floor of |TD error|, also the Huber loss's knee.")
    td7_checkpoint_episodes: int = _f(20, "Episodes per checkpoint assessment, after the switch.")
    td7_checkpoint_switch: int = _f(
        750_000, "Updates after which assessments take td7_checkpoint_episodes, not 1."
    )
    # data collection
    buffer_size: int = _f(1_000_000, "Replay buffer capacity (transitions).")
    learning_starts: int = _f(1000, "Uniform-random steps before the first update.")
    updates_per_step: int = _f(1, "Gradient updates per environment step once learning.")
    noise: str = _f("gaussian", "Exploration noise: gaussian or ou (Ornstein-Uhlenbeck).")
    noise_std: float = _f(0.1, "Exploration noise std, in [-1, 1] action units.")
    # evaluation, logging, checkpoints
    eval_every: int = _f(5000, "Steps between deterministic evaluations.")
    eval_episodes: int = _f(10, "Episodes per evaluation.")
    checkpoint_every: int = _f(25_000, "Steps between checkpoints (taken at episode ends).")
    torch_threads: int = _f(1, "torch intra-op threads; 1 is fastest for small nets on CPU.")
    export: str = _f(
        "best",
        "Actor in policy.onnx: best (best evaluation once widening ranges are full; td7: its "
        "checkpoint) or last.",
    )
    # domain randomization of the training env (training/randomization.py): each a range
    # [lo, hi] drawn per episode from the run's seeded generator; [] leaves the knob nominal
    rand_friction: list[float] = _f([], "Multiplier of the robot's lateral friction.")
    rand_mass: list[float] = _f([], "Multiplier of every robot link's mass.")
    rand_strength: list[float] = _f([], "Multiplier of motor strength (power, or arm gain).")
    rand_damping: list[float] = _f([], "Joint damping added to every joint, N·m·s/rad.")
    rand_latency: list[int] = _f([], "Control steps between the action and the env.")
    rand_offset: list[float] = _f([], "Action bias per dimension, fraction of half range.")
    rand_obs_noise: list[float] = _f([], "Observation noise std, fraction of feature std.")
    rand_push: list[float] = _f([], "Velocity kick on the body on 1% of steps, m/s.")
    rand_widen_start: int = _f(
        0, "Steps at nominal dynamics before the rand_* ranges start to widen; 0 = at once."
    )
    rand_widen_steps: int = _f(
        0, "Steps over which the rand_* ranges widen linearly from nominal to full; 0 = full."
    )
    # adaptation to what the actor cannot see (training/history.py, docs/sim_to_real.md)
    history_obs: int = _f(0, "Past observations beside the current one in the actor's input.")
    history_actions: int = _f(
        0, "Past applied actions in the actor's input; with rand_latency, its largest value + 1."
    )
    privileged_critic: bool = _f(
        False,
        "Critics also see the episode's randomization draws and the noise-free observation; "
        "the exported actor does not (asymmetric actor-critic).",
    )
    grow_inputs: bool = _f(
        False,
        "The history and privileged inputs join at rand_widen_start, at zero weight: the run is "
        "the nominal run until then and keeps its gait (training/grow.py).",
    )

    def __post_init__(self) -> None:
        check_types(self)
        self._algorithm_settings()
        checks = {
            "algo must be td3, ddpg or td7": self.algo in ("td3", "ddpg", "td7"),
            "noise must be gaussian or ou": self.noise in ("gaussian", "ou"),
            "export must be best or last": self.export in ("best", "last"),
            "device must be cpu or cuda[:N]": self.device == "cpu"
            or self.device.startswith("cuda"),
            "steps must be > 0": self.steps > 0,
            "gamma must be in (0, 1]": 0 < self.gamma <= 1,
            "tau must be in (0, 1]": 0 < self.tau <= 1,
            "learning rates must be > 0": self.actor_lr > 0 and self.critic_lr > 0,
            "batch_size must be > 0": self.batch_size > 0,
            "policy_delay must be >= 1": self.policy_delay >= 1,
            "n_critics must be >= 1": self.n_critics >= 1,
            "n_step must be >= 1": self.n_step >= 1,
            "noise stds must be >= 0": min(self.noise_std, self.target_noise) >= 0,
            "buffer_size must be >= batch_size": self.buffer_size >= self.batch_size,
            "learning_starts must be >= batch_size": self.learning_starts >= self.batch_size,
            "updates_per_step must be >= 1": self.updates_per_step >= 1,
            "eval_every, eval_episodes, checkpoint_every must be > 0": min(
                self.eval_every, self.eval_episodes, self.checkpoint_every
            )
            > 0,
            "hidden sizes must be positive": all(
                h > 0 for h in [*self.actor_hidden, *self.critic_hidden]
            ),
            "torch_threads must be >= 1": self.torch_threads >= 1,
            "history_obs, history_actions, rand_widen_start, rand_widen_steps must be >= 0": min(
                self.history_obs, self.history_actions, self.rand_widen_start, self.rand_widen_steps
            )
            >= 0,
            "td7 sizes and periods must be >= 1": min(
                self.td7_zs_dim, self.td7_target_every, self.td7_checkpoint_episodes
            )
            >= 1,
            "td7_lap_alpha must be >= 0, td7_min_priority > 0": self.td7_lap_alpha >= 0
            and self.td7_min_priority > 0,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise UsageError("invalid TrainConfig: " + "; ".join(failed))
        from training.randomization import check_ranges

        check_ranges(self.randomization)
        for name in WIDENING:
            if getattr(self, name) and not self.randomization:
                raise UsageError(f"invalid TrainConfig: {name} widens no rand_* range")
        grown = self.history_obs or self.history_actions or self.privileged_critic
        if self.grow_inputs and not (self.rand_widen_start and grown):
            raise UsageError(
                "invalid TrainConfig: grow_inputs needs rand_widen_start > 0 (when the inputs "
                "join) and history_obs, history_actions or privileged_critic (the inputs to grow)"
            )
        if self.randomization and self.rand_widen_start >= self.steps:
            raise UsageError(
                f"invalid TrainConfig: rand_widen_start={self.rand_widen_start} >= steps="
                f"{self.steps}: the rand_* ranges would never widen; lower it"
            )

    def _algorithm_settings(self) -> None:
        """Fill the algorithm's own settings where unset; refuse a setting that contradicts the
        algorithm, or one it would ignore (`ALGO_SETTINGS`, `IGNORED`)."""
        if self.algo not in ALGO_SETTINGS:
            return  # refused with the other checks
        errors = []
        for name, value in ALGO_SETTINGS[self.algo].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
            elif self.algo == "ddpg" and getattr(self, name) != value:
                errors.append(f"{name}={getattr(self, name)} (ddpg is TD3 with {name}={value})")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, why in IGNORED[self.algo].items():
            if getattr(self, name) != defaults[name]:
                errors.append(f"{name}={getattr(self, name)} ({why})")
        if errors:
            raise UsageError(
                f"invalid TrainConfig: algo {self.algo} does not take " + "; ".join(errors)
            )

    @property
    def randomization(self) -> dict[str, list[float]]:
        """The randomized knobs, {knob: [lo, hi]} (`mu.randomization` in the policy file)."""
        return {
            f.name.removeprefix("rand_"): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.startswith("rand_") and f.name not in WIDENING and getattr(self, f.name)
        }

    def nominal_stage(self) -> TrainConfig:
        """The nominal run that a run of this config is for its first `rand_widen_start` steps
        (`trainer.branch`): the same config with no rand_* range, trained that long, and with
        `grow_inputs` no input to grow. Refused where there is none: no late widening, or a
        privileged critic from the first step (its input holds the draws)."""
        late = self.randomization and self.rand_widen_start > 0
        if not late or (self.privileged_critic and not self.grow_inputs):
            raise UsageError(
                "only a run whose rand_* ranges widen late (rand_widen_start > 0) and whose critic "
                "is not privileged until then is a nominal run until then"
            )
        off = {
            f.name: [] for f in dataclasses.fields(self) if f.name.startswith("rand_")
        } | dict.fromkeys(WIDENING, 0)
        if self.grow_inputs:
            off |= dict.fromkeys(("history_obs", "history_actions"), 0) | dict.fromkeys(
                ("privileged_critic", "grow_inputs"), False
            )
        return dataclasses.replace(self, **off, steps=self.rand_widen_start)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "TrainConfig") -> TrainConfig:
        names = sorted(f.name for f in dataclasses.fields(cls))
        for name in data:
            if name not in names:
                raise unknown_field(name, names, where)
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
