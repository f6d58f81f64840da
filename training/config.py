"""`TrainConfig`: every setting of a training run, documented, validated, saved with the run."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    env_id: str = _f("InvertedPendulumBulletEnv-v0", "Gymnasium environment id.")
    algo: str = _f(
        "td3", "td3, ddpg (one critic, no target noise, no delay), or td7 (training/td7.py)."
    )
    steps: int = _f(50_000, "Environment steps to train for.")
    seed: int = _f(0, "Seed of torch, numpy, the training env and (offset) the eval env.")
    device: str = _f("cpu", "Torch device for networks and updates: cpu or cuda.")
    # networks
    actor_hidden: list[int] = _f([256, 256], "Hidden layer sizes of the actor MLP.")
    critic_hidden: list[int] = _f([256, 256], "Hidden layer sizes of each critic MLP.")
    critic_layer_norm: bool = _f(False, "LayerNorm after each hidden layer of the critics.")
    normalize_obs: bool = _f(True, "Running observation normalization (frozen at export).")
    # TD3 update
    n_critics: int = _f(2, "Critics in the ensemble; the target takes their minimum.")
    gamma: float = _f(0.99, "Discount factor.")
    n_step: int = _f(5, "Rewards summed in the TD target before bootstrapping (n-step return).")
    tau: float = _f(0.005, "Polyak rate of the target networks.")
    actor_lr: float = _f(1e-3, "Adam learning rate of the actor.")
    critic_lr: float = _f(1e-3, "Adam learning rate of the critics.")
    batch_size: int = _f(256, "Transitions per update.")
    policy_delay: int = _f(2, "Critic updates per actor (and target) update.")
    target_noise: float = _f(0.2, "Std of target-policy smoothing noise, in [-1, 1] action units.")
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
        "best", "Actor in policy.onnx: best (best evaluation; td7: its checkpoint) or last."
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

    def __post_init__(self) -> None:
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
            "td7 sizes and periods must be >= 1": min(
                self.td7_zs_dim, self.td7_target_every, self.td7_checkpoint_episodes
            )
            >= 1,
            "td7_lap_alpha must be >= 0, td7_min_priority > 0": self.td7_lap_alpha >= 0
            and self.td7_min_priority > 0,
        }
        failed = [msg for msg, ok in checks.items() if not ok]
        if failed:
            raise ValueError("invalid TrainConfig: " + "; ".join(failed))
        from training.randomization import check_ranges

        check_ranges(self.randomization)
        if self.algo == "ddpg":  # DDPG is TD3 with these three settings
            self.n_critics, self.target_noise, self.policy_delay = 1, 0.0, 1

    @property
    def randomization(self) -> dict[str, list[float]]:
        """The randomized knobs, {knob: [lo, hi]} (`mu.randomization` in the policy file)."""
        return {
            f.name.removeprefix("rand_"): getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name.startswith("rand_") and getattr(self, f.name)
        }

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
