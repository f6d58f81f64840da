"""Domain randomization: Gymnasium wrappers that shift dynamics, delay and bias actions, add
sensor noise and push the robot, redrawn at every reset from the run's seeded generator.

Each knob takes a range [lo, hi] drawn uniformly per episode; a fixed shift (`mu eval --shift`)
is the range [v, v]. Nominal values are read from the simulator once, at the first reset, and
every reset applies nominal × draw, so shifts never compound across episodes.

    friction   multiplier of the robot links' lateral friction (Bullet multiplies the two
               bodies' values, so every contact of the robot scales by it)
    mass       multiplier of every robot link's mass
    strength   motor strength multiplier: the robot's `power` in pybullet-envs-gymnasium
               (torque = power × power_coef × a); the gain of the commanded end-effector
               displacement on the position-controlled panda-gym arms (applied a = m·a, saturating
               at the bounds)
    damping    joint damping added to every robot joint, N·m·s/rad (nominal 0 in these envs)
    latency    whole control steps between the policy's action and the env (a FIFO; the first
               k steps of an episode apply the action bounds' midpoint)
    offset     calibration bias added to each action dimension, as a fraction of its half range;
               drawn per dimension
    obs_noise  Gaussian noise on each observed feature, as a fraction of that feature's running
               std (what the policy sees; the env's state is unchanged)
    push       horizontal velocity kick on the robot's body, m/s, on 1% of steps
               (locomotion only: the panda arms are position-controlled with a fixed base)

Ranges can widen from nominal (`Widening`): each draw is pulled toward the knob's nominal value
by a scale that the trainer holds at 0 for `rand_widen_start` steps and then grows to 1 over
`rand_widen_steps` (`widening_scale`), so a policy first learns the nominal task and then meets
ever larger shifts, instead of the cautious average that a fixed wide range teaches from the
first step.

The privileged critic reads what the actor cannot see (`privileged`): every knob's draw of the
episode, normalized to its range, and the observation before noise (`CleanObs`).

Dynamics knobs work on the PyBullet locomotion envs and the panda-gym arms; the other knobs on
any Gymnasium env. A knob an env cannot honour raises UsageError naming both. No torch here:
`mu eval --shift/--sweep` runs on a serving install with the simulator.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

from controller.errors import UsageError

Ranges = dict[str, tuple[float, float]]

# name -> nominal value (the identity shift)
NOMINAL: dict[str, float] = {
    "friction": 1.0,
    "mass": 1.0,
    "strength": 1.0,
    "damping": 0.0,
    "latency": 0.0,
    "offset": 0.0,
    "obs_noise": 0.0,
    "push": 0.0,
}
DYNAMICS = ("friction", "mass", "strength", "damping")
PUSH_PROB = 0.01


def check_ranges(ranges: dict[str, Any]) -> Ranges:
    """Validate {knob: [lo, hi]}; returns {knob: (lo, hi)} in a fixed (sorted) order."""
    out: Ranges = {}
    for name in sorted(ranges):
        if name not in NOMINAL:
            raise UsageError(f"unknown randomization knob {name!r}; choose from {list(NOMINAL)}")
        value = ranges[name]
        if len(value) != 2 or not value[0] <= value[1]:
            raise UsageError(f"randomization {name}: expected [lo, hi] with lo <= hi, got {value}")
        lo, hi = float(value[0]), float(value[1])
        if name in ("friction", "mass", "strength") and lo <= 0:
            raise UsageError(f"randomization {name}: multipliers must be > 0, got {value}")
        if name in ("damping", "latency", "obs_noise", "push") and lo < 0:
            raise UsageError(f"randomization {name}: must be >= 0, got {value}")
        if name == "latency" and not (lo.is_integer() and hi.is_integer()):
            raise UsageError(f"randomization latency: whole control steps, got {value}")
        out[name] = (lo, hi)
    return out


class Widening:
    """How far draws reach from nominal: `scale` 0 holds every knob at its nominal value, 1
    draws from the full range (each draw v becomes nominal + scale · (v - nominal))."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, value: Any, nominal: float) -> Any:
        return value if self.scale >= 1 else nominal + self.scale * (value - nominal)


FULL = Widening()


def widening_scale(step: int, start: int, steps: int) -> float:
    """`Widening.scale` after `step` training steps: 0 until `start`, then linear to 1 over
    `steps` (0: at once)."""
    if step < start:
        return 0.0
    return min(1.0, (step - start) / steps) if steps else 1.0


def randomize(
    env: gym.Env,
    ranges: dict[str, Any],
    rng: np.random.Generator,
    widening: Widening = FULL,
) -> gym.Env:
    """`env` wrapped with the knobs in `ranges` ({} returns `env` unchanged). All draws come
    from `rng`, in a fixed order, so a seeded run is reproducible; `widening` pulls them toward
    nominal."""
    ranges = check_ranges(ranges)
    inner = env
    # innermost first: the offset is added last, after the motor gain (applied = m·a + b, as a
    # miscalibrated actuator), and the latency FIFO delays what the policy chose
    if "offset" in ranges:
        env = ActionOffset(env, ranges["offset"], rng)
    dynamics = {k: v for k, v in ranges.items() if k in DYNAMICS}
    if dynamics:
        env = Dynamics(env, dynamics, rng)
    if "push" in ranges:
        env = Pushes(env, ranges["push"], rng)
    if "latency" in ranges:
        env = ActionLatency(env, ranges["latency"], rng)
    if "obs_noise" in ranges:
        env = ObsNoise(env, ranges["obs_noise"], rng)
    wrapper = env
    while wrapper is not inner:
        wrapper.widening = widening
        wrapper = wrapper.env
    return env


class CleanObs(gym.ObservationWrapper):
    """Keeps the last observation before any randomization touches it (`privileged`); wrap the
    plain env with it, then randomize."""

    def observation(self, obs: np.ndarray) -> np.ndarray:
        self.last = np.asarray(obs, np.float32)
        return obs


def privileged_dim(ranges: dict[str, Any], obs_dim: int, act_dim: int) -> int:
    """The size of `privileged`'s vector."""
    return knob_dim(ranges, act_dim) + obs_dim


def knob_dim(ranges: dict[str, Any], act_dim: int) -> int:
    """How many values of `privileged`'s vector are knob draws (they lead it)."""
    knobs = [k for k in check_ranges(ranges) if k != "push"]
    return sum(act_dim if k == "offset" else 1 for k in knobs)


def privileged(env: gym.Env, ranges: dict[str, Any]) -> np.ndarray:
    """What the critic knows and the actor must infer (`privileged_vector`), read from the
    randomizers around `env` and the `CleanObs` below them."""
    values: dict[str, Any] = {}
    for name in check_ranges(ranges):
        if name in DYNAMICS:
            values[name] = find(env, Dynamics).values[name]
        elif name == "offset":
            wrapper = find(env, ActionOffset)
            values[name] = wrapper.bias / wrapper._half
        elif name == "latency":
            values[name] = find(env, ActionLatency).k
        elif name == "obs_noise":
            values[name] = find(env, ObsNoise).scale
    return privileged_vector(ranges, values, find(env, CleanObs).last)


def nominal_privileged(ranges: dict[str, Any], clean: np.ndarray, act_dim: int) -> np.ndarray:
    """`privileged_vector` with every knob at its nominal value: what a robot, which knows no
    draws, gives a privileged critic (online fine-tuning)."""
    values = {k: np.zeros(act_dim) if k == "offset" else NOMINAL[k] for k in check_ranges(ranges)}
    return privileged_vector(ranges, values, clean)


def privileged_vector(ranges: dict[str, Any], values: dict[str, Any], clean) -> np.ndarray:
    """The episode's draw of every randomized knob (sorted; push has no draw per episode and is
    left out; offset one per action dimension, in fractions of the half range), each mapped
    from its range to [-1, 1] (0 for a fixed value), then the noise-free observation."""
    parts = []
    for name, (lo, hi) in check_ranges(ranges).items():
        if name == "push":
            continue
        value = np.atleast_1d(np.asarray(values[name], np.float64))
        parts.append(np.zeros_like(value) if hi == lo else (value - lo) / (hi - lo) * 2 - 1)
    parts.append(np.asarray(clean, np.float64).reshape(-1))
    return np.concatenate(parts).astype(np.float32)


def supported_knobs(env: gym.Env) -> list[str]:
    """The knobs `env` can honour, in `NOMINAL`'s order."""
    robot = _Robot(env)
    return [k for k in NOMINAL if robot.supports(k)]


def find(env: gym.Env, cls: type) -> Any:
    """The first wrapper of type `cls` around `env`, or None."""
    while isinstance(env, gym.Wrapper):
        if isinstance(env, cls):
            return env
        env = env.env
    return None


class _Robot:
    """What the dynamics knobs touch in one env family: the Bullet client, the robot's links
    and joints, and its motor strength."""

    def __init__(self, env: gym.Env) -> None:
        base = env.unwrapped
        self.env_id = env.spec.id if env.spec else type(base).__name__
        robot = getattr(base, "robot", None)
        if hasattr(base, "sim") and hasattr(robot, "joint_forces"):  # panda-gym
            self.kind = "panda"
            self.client = base.sim.physics_client
            self.bodies = [base.sim._bodies_idx[robot.body_name]]
            self.dt = base.sim.dt
        elif hasattr(base, "_p") and hasattr(robot, "objects"):  # pybullet-envs-gymnasium
            self.kind = "locomotion" if hasattr(robot, "power") else "bullet"
            self.client = base._p
            self.bodies = list(robot.objects)
            self.dt = base.scene.dt if hasattr(base, "scene") else None
        else:
            self.kind = None
        self.robot = robot

    def links(self) -> list[tuple[int, int]]:
        return [(b, link) for b in self.bodies for link in range(-1, self.client.getNumJoints(b))]

    def supports(self, knob: str) -> bool:
        if knob in ("friction", "mass", "damping"):
            return self.kind is not None
        if knob == "strength":
            return self.kind in ("locomotion", "panda")
        if knob == "push":
            return self.kind == "locomotion"
        return True

    def require(self, knobs: list[str]) -> None:
        bad = [k for k in knobs if not self.supports(k)]
        if bad:
            raise UsageError(
                f"{self.env_id} cannot honour randomization {', '.join(bad)}: dynamics knobs "
                "need a PyBullet locomotion env or a panda-gym arm (strength: one with a motor "
                "power or an end-effector gain; push: a free-moving locomotion robot)"
            )


class Dynamics(gym.Wrapper):
    """Friction, mass, strength and joint damping, redrawn at every reset from the nominal
    values read at the first reset (pybullet-envs-gymnasium loads the robot there)."""

    widening: Widening = FULL  # `randomize` sets the run's

    def __init__(self, env: gym.Env, ranges: Ranges, rng: np.random.Generator) -> None:
        super().__init__(env)
        self.robot = _Robot(env)
        self.robot.require(list(ranges))
        self.ranges, self.rng = ranges, rng
        self.values: dict[str, float] = dict.fromkeys(ranges, 1.0)
        self.nominal: dict[str, Any] | None = None

    def _read_nominal(self) -> dict[str, Any]:
        c, links = self.robot.client, self.robot.links()
        return {
            "mass": [c.getDynamicsInfo(b, link)[0] for b, link in links],
            "friction": [c.getDynamicsInfo(b, link)[1] for b, link in links],
            "damping": [c.getJointInfo(b, link)[6] if link >= 0 else 0.0 for b, link in links],
            "power": getattr(self.robot.robot, "power", None),
        }

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        out = self.env.reset(**kwargs)
        if self.nominal is None:
            self.nominal = self._read_nominal()
        self.values = {
            k: self.widening(float(self.rng.uniform(lo, hi)), NOMINAL[k])
            for k, (lo, hi) in self.ranges.items()
        }
        c, nom = self.robot.client, self.nominal
        for i, (b, link) in enumerate(self.robot.links()):
            if "mass" in self.values:
                c.changeDynamics(b, link, mass=nom["mass"][i] * self.values["mass"])
            if "friction" in self.values:
                c.changeDynamics(
                    b, link, lateralFriction=nom["friction"][i] * self.values["friction"]
                )
            if "damping" in self.values and link >= 0:
                c.changeDynamics(b, link, jointDamping=nom["damping"][i] + self.values["damping"])
        if "strength" in self.values and self.robot.kind == "locomotion":
            self.robot.robot.power = nom["power"] * self.values["strength"]
        return out

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        if "strength" in self.values and self.robot.kind == "panda":
            action = np.asarray(action) * self.values["strength"]  # the arm clips to its bounds
        return self.env.step(action)


class Pushes(gym.Wrapper):
    """On 1% of steps, a horizontal velocity kick of a drawn size on the robot's body, given as
    the force that delivers it over one control step."""

    widening: Widening = FULL  # `randomize` sets the run's

    def __init__(self, env: gym.Env, span: tuple[float, float], rng: np.random.Generator) -> None:
        super().__init__(env)
        self.robot = _Robot(env)
        self.robot.require(["push"])
        self.span, self.rng = span, rng
        self.pushes = 0

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        if self.rng.random() < PUSH_PROB:
            c, part = self.robot.client, self.robot.robot.robot_body
            body, link = part.bodies[part.bodyIndex], part.bodyPartIndex
            total = sum(c.getDynamicsInfo(b, k)[0] for b, k in self.robot.links())
            angle = self.rng.uniform(0.0, 2 * np.pi)
            dv = self.widening(self.rng.uniform(*self.span), 0.0)
            force = total * dv / self.robot.dt * np.array([np.cos(angle), np.sin(angle), 0.0])
            at = part.pose().xyz().tolist()
            c.applyExternalForce(body, link, force.tolist(), at, c.WORLD_FRAME)
            self.pushes += 1
        return self.env.step(action)


class ActionLatency(gym.Wrapper):
    """The env applies the action the policy chose k control steps ago, k drawn per episode."""

    widening: Widening = FULL  # `randomize` sets the run's

    def __init__(self, env: gym.Env, span: tuple[float, float], rng: np.random.Generator) -> None:
        super().__init__(env)
        self.span, self.rng = (int(span[0]), int(span[1])), rng
        low, high = env.action_space.low, env.action_space.high
        self._idle = ((low + high) / 2).astype(env.action_space.dtype)
        self.k = 0
        self._fifo: deque[np.ndarray] = deque()

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self.k = int(
            round(self.widening(int(self.rng.integers(self.span[0], self.span[1] + 1)), 0))
        )
        self._fifo = deque([self._idle] * self.k)
        return self.env.reset(**kwargs)

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        self._fifo.append(np.array(action, copy=True))
        return self.env.step(self._fifo.popleft())


class ActionOffset(gym.ActionWrapper):
    """A calibration bias per action dimension, drawn per episode, in fractions of the half
    range; the biased action is clipped to the bounds as a real actuator saturates."""

    widening: Widening = FULL  # `randomize` sets the run's

    def __init__(self, env: gym.Env, span: tuple[float, float], rng: np.random.Generator) -> None:
        super().__init__(env)
        self.span, self.rng = span, rng
        self._half = (env.action_space.high - env.action_space.low) / 2
        self.bias = np.zeros(env.action_space.shape, env.action_space.dtype)

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        draw = self.widening(self.rng.uniform(*self.span, size=self.bias.shape), 0.0)
        self.bias = (draw * self._half).astype(self.bias.dtype)
        return self.env.reset(**kwargs)

    def action(self, action: np.ndarray) -> np.ndarray:
        space = self.env.action_space
        return np.clip(np.asarray(action) + self.bias, space.low, space.high)


class ObsNoise(gym.ObservationWrapper):
    """Gaussian noise of (drawn fraction) × each feature's running std on what the policy sees.
    The running statistics are of the clean observations (Welford), kept across episodes."""

    widening: Widening = FULL  # `randomize` sets the run's

    def __init__(self, env: gym.Env, span: tuple[float, float], rng: np.random.Generator) -> None:
        super().__init__(env)
        self.span, self.rng = span, rng
        dim = env.observation_space.shape
        self.count, self.mean, self.m2 = 0, np.zeros(dim), np.zeros(dim)
        self.scale = 0.0

    def reset(self, **kwargs: Any) -> tuple[Any, dict]:
        self.scale = self.widening(float(self.rng.uniform(*self.span)), 0.0)
        return super().reset(**kwargs)

    def observation(self, obs: np.ndarray) -> np.ndarray:
        self.count += 1
        delta = obs - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (obs - self.mean)
        std = np.sqrt(self.m2 / max(self.count - 1, 1))
        noise = self.rng.normal(0.0, 1.0, obs.shape) * self.scale * std
        return (obs + noise).astype(obs.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def clear(self) -> None:
        self.count, self.mean, self.m2 = 0, np.zeros_like(self.mean), np.zeros_like(self.m2)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]
        self.mean, self.m2 = np.asarray(state["mean"]), np.asarray(state["m2"])
