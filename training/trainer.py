"""The training loop: collect with exploration noise, learn on the algorithm's schedule
(`td3.StepSchedule`: after every step; `td7.EpisodeSchedule`: at episode ends), evaluate on a
separately seeded env, log, checkpoint, and export at the end the actor with the best
evaluation (`policy.onnx`, or the last with `export="last"`) and the last one
(`policy.last.onnx`).

Evaluations measure every actor the agent has (`algos.actors`: TD7's checkpoint policy and its
current actor; TD3's one actor), each a row of evals.csv naming it, and the best of all of them
is kept: the exported policy is never worse, at nominal dynamics, than any evaluated actor.

Every episode starts with `env.reset(seed=...)` drawn from the trainer's generator. A
checkpoint holds how the episode under way started (its seed, the randomization's state) and
its actions are in the replay, so a resumed run replays that episode's start and continues
exactly where it stopped, whether it was checkpointed at an episode end, at the end of
training or on Ctrl-C.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from controller.errors import MissingFile, UsageError
from training import checkpoint, grow
from training.algos import (
    AnyAgent,
    actors,
    create_agent,
    create_buffer,
    create_schedule,
    deployed,
    with_deployed,
)
from training.atomic import atomic_write
from training.config import TrainConfig
from training.envs import (
    EVAL_SEED_OFFSET,
    FlatObs,
    action_bounds,
    make_env,
    run_episodes,
    to_env_units,
)
from training.history import with_history
from training.noise import make_noise
from training.randomization import (
    CleanObs,
    ObsNoise,
    Widening,
    find,
    nominal_privileged,
    privileged,
    privileged_dim,
    randomize,
    widening_scale,
)
from training.snapshots import choose_export, snapshot, upgrade

log = logging.getLogger(__name__)
RANDOMIZATION_STREAM = 1  # seeds the randomization generator beside the run's seed
EVAL_COLUMNS = ("step", "wall_s", "return_mean", "return_std", "success_rate", "actor")


@dataclass
class EvalResult:
    mean_return: float
    std_return: float
    success_rate: float | None


class Interrupted(Exception):
    """Training stopped on Ctrl-C after writing its checkpoint: `mu train --resume out`."""

    def __init__(self, out: Path, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint written to {out}")
        self.out, self.step = out, step


def evaluate(agent: AnyAgent, env: FlatObs, episodes: int, seed: int, device: str) -> EvalResult:
    """Deterministic returns of the agent over `episodes` (see `run_episodes`)."""
    low, high = action_bounds(env)

    def act(obs: np.ndarray) -> np.ndarray:
        a = agent.act(torch.as_tensor(obs, device=device).unsqueeze(0))[0].cpu().numpy()
        return to_env_units(a, low, high)

    returns, rate = run_episodes(env, act, episodes, seed)
    return EvalResult(float(np.mean(returns)), float(np.std(returns)), rate)


def train(
    cfg: TrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_eval: Callable[[dict], None] | None = None,
    overwrite: bool = False,
) -> Path:
    """Train per `cfg` into directory `out`; returns the path of the exported policy.onnx.
    `out` must hold no run unless `resume` (continue it) or `overwrite` (replace it).
    `on_eval` gets each evaluation of the deployed actor as a row of evals.csv ({column:
    value}): how a sweep reports to Ray Tune. Raises `Interrupted` on Ctrl-C."""
    with run_dir(Path(out), resume, overwrite) as directory:
        return _train(cfg, directory, resume, progress, on_eval)


def _train(
    cfg: TrainConfig,
    directory: Path,
    resume: bool,
    progress: bool,
    on_eval: Callable[[dict], None] | None = None,
) -> Path:
    """`train` in a directory it holds. A run whose inputs grow (`grow_inputs`) trains its
    nominal stage first, under its own config.json, then grows (training/grow.py) and goes on;
    a Ctrl-C in the stage or while it grows stops the run at the first step after."""
    with _ctrl_c() as stop:
        if cfg.grow_inputs and not (
            resume and checkpoint.load(directory / "checkpoint.pt")[0].grow_inputs
        ):
            stage = Run(cfg.nominal_stage(), directory, on_eval)
            stage.whole = cfg  # config.json (what `--resume` reads) and the export rule: the run's
            _loop(stage, resume, progress, stop, total=cfg.steps)
            stage.writer.close()
            del stage  # its replay, at full capacity, before the grown one is made
            _grow(directory, cfg)
            resume = True
        run = Run(cfg, directory, on_eval)
        _loop(run, resume, progress, stop)
    return run.export()


def _grow(directory: Path, cfg: TrainConfig) -> None:
    """Rewrite checkpoint.pt, the nominal stage's at `cfg.rand_widen_start`, as the checkpoint
    of `cfg` that computes the same functions (training/grow.py)."""
    path = directory / "checkpoint.pt"
    _, old, _, state = checkpoint.load(path, cfg.device)
    run = Run(cfg, directory, None)
    history = run.env.history if run.meta.get("history") else None
    # the stage's steps had nominal dynamics and no sensor noise: its observations are clean
    priv = None
    if cfg.privileged_critic:
        priv = partial(nominal_privileged, cfg.randomization, act_dim=run.act_dim)
    replay = checkpoint.saved_replay(directory, state)
    rows = grow.grow_replay(replay, run.buffer, history, run.low, run.high, priv)
    grow.grow_agent(old, run.agent, rows["obs"], rows.get("priv"))
    if history is not None:
        obs = state["obs"].numpy()
        under_way = state.get("episode", {}).get("length")  # absent: taken at an episode end
        state["obs"] = torch.as_tensor(rows["next_obs"][-1] if under_way else history.reset(obs))
    if state["best"] is not None:
        state["best"] = {
            **state["best"],
            "weights": grow.grow_weights(state["best"]["weights"], run.agent, rows["obs"]),
        }
    state["replay"] = run.buffer.state_dict()
    checkpoint.save(path, cfg, run.agent, run.meta, state)
    joined = [n for n, part in (("history", history), ("privileged", priv)) if part is not None]
    log.info("step %d: %s inputs joined at zero weight", state["step"], " and ".join(joined))


def _loop(
    run: Run, resume: bool, progress: bool, stop: threading.Event, total: int | None = None
) -> None:
    """The training loop, up to `run.cfg.steps`, and its last checkpoint; the progress bar
    counts to `total` (the whole run's steps, where this is its nominal stage)."""
    if resume:
        run.restore()
    else:
        run.obs = run.reset()
    run.start_log()
    cfg = run.cfg
    bar = tqdm(total=total or cfg.steps, initial=run.step, disable=not progress, unit="step")
    while run.step < cfg.steps:
        if stop.is_set():
            run.save()
            raise Interrupted(run.out, run.step)
        done = run.collect()
        run.log_losses(run.schedule.after_step(run.step), every=1000)
        if run.step >= run.next_eval:
            bar.set_postfix_str(run.evaluate())
        if done:
            run.end_episode()
        bar.update(1)
    bar.close()
    if run.saved_at != run.step:
        run.save()


def branch(
    source: str | Path,
    cfg: TrainConfig,
    out: str | Path,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train `cfg` into `out` from the checkpoint of `source`, a run that a run of `cfg` is,
    bit for bit, up to that checkpoint: for a `cfg` whose ranges widen late, a run of
    `cfg.nominal_stage()` at most `rand_widen_start` steps in (`Run._start_randomization`);
    for a `cfg` that randomizes nothing, a shorter run of `cfg`. The result is a straight
    run's, for the cost of the steps after the branch (with `grow_inputs`, grown at
    `rand_widen_start` as the straight run is)."""
    path = Path(source) / "checkpoint.pt"
    if not path.exists():
        raise MissingFile(f"no checkpoint.pt in {source}: nothing to branch from")
    stage = cfg.nominal_stage() if cfg.randomization else cfg
    have, _, _, state = checkpoint.load(path)
    have = dataclasses.replace(have, steps=stage.steps)
    differ = [k for k, v in dataclasses.asdict(stage).items() if getattr(have, k) != v]
    if differ:
        raise UsageError(
            f"{source} is not a run of this one's nominal stage: {', '.join(differ)} differ"
        )
    if state is None or state["step"] > stage.steps:
        raise UsageError(f"{path} is past step {stage.steps}, where this run leaves it")
    with run_dir(Path(out), False, overwrite) as directory:
        atomic_write(directory / "checkpoint.pt", path.read_bytes())
        return _train(cfg, directory, True, progress)


@contextmanager
def run_dir(out: Path, resume: bool, overwrite: bool) -> Iterator[Path]:
    """`out`, checked, then held: a new run goes into a missing or empty directory, or replaces
    a run with `overwrite`; `resume` needs a run's checkpoint. The directory stays locked while
    the run trains, so a second process training into it (a benchmark started again beside a
    running one) is refused instead of racing it over checkpoint.pt and evals.csv."""
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise MissingFile(f"no checkpoint.pt in {out}: nothing to resume")
    elif out.exists() and any(out.iterdir()):
        if not (out / "config.json").exists():
            raise UsageError(f"{out} is not empty and holds no run; choose another --out")
        if not overwrite:
            raise UsageError(
                f"{out} holds a run already: continue it with --resume {out}, replace it with "
                "--overwrite, or choose another --out"
            )
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)  # a lock on the directory itself: nothing to clean up
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            f"another process is training into {out}; wait for it or choose another --out"
        ) from None
    try:
        if not resume:  # emptied only once held: a refused run deletes nothing
            for path in out.iterdir():
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        yield out
    finally:
        os.close(fd)


@contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """The first Ctrl-C sets the event (the loop checkpoints and stops at the next step); a
    second one interrupts at once. Only in the main thread (a Ray worker's trial has none)."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class Run:
    """One training run's state, and each thing the loop does to it."""

    def __init__(self, cfg: TrainConfig, out: Path, on_eval: Callable[[dict], None] | None):
        self.cfg, self.out, self.on_eval = cfg, out, on_eval
        self.whole = cfg  # the whole run's config, where this is a grown run's stage (`_train`)
        torch.set_num_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        # randomization draws from a stream of its own, so that runs without it are unchanged
        self.rand_rng = np.random.default_rng([cfg.seed, RANDOMIZATION_STREAM])
        self.rand_first = self.rand_rng.bit_generator.state  # for `_start_randomization`
        flat = make_env(cfg.env_id, cfg.seed)
        self.widening = Widening(widening_scale(0, cfg.rand_widen_start, cfg.rand_widen_steps))
        base = CleanObs(flat) if cfg.privileged_critic else flat
        randomized = randomize(base, cfg.randomization, self.rand_rng, self.widening)
        self.env = with_history(randomized, cfg.history_obs, cfg.history_actions)
        self.obs_noise = find(self.env, ObsNoise)  # the one randomizer with state of its own
        # evaluations stay at nominal dynamics: the export rule compares policies there
        eval_env = make_env(cfg.env_id, cfg.seed + EVAL_SEED_OFFSET)
        self.eval_env = with_history(eval_env, cfg.history_obs, cfg.history_actions)
        self.low, self.high = action_bounds(self.env)
        obs_dim, self.act_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        priv_dim = (
            privileged_dim(cfg.randomization, flat.observation_space.shape[0], self.act_dim)
            if cfg.privileged_critic
            else 0
        )
        self.meta = {
            "env_id": cfg.env_id,
            "obs_dim": obs_dim,
            "act_dim": self.act_dim,
            "obs_layout": [list(p) for p in flat.layout],
            "action_low": self.low.tolist(),
            "action_high": self.high.tolist(),
            "randomization": cfg.randomization,
            **({"history": self.env.history.spec()} if self.env is not randomized else {}),
            **({"priv_dim": priv_dim} if priv_dim else {}),
        }
        self.agent = create_agent(cfg, obs_dim, self.act_dim, priv_dim)
        self.buffer = create_buffer(cfg, obs_dim, self.act_dim, priv_dim)
        self.schedule = create_schedule(cfg, self.agent, self.buffer, self.rng)
        self.noise = make_noise(cfg.noise, self.act_dim, cfg.noise_std, self.rng)
        self.step, self.saved_at, self.wall_before, self.evaluated_at = 0, -1, 0.0, -1
        self.ep_start = 0  # the step the episode under way began at
        self.evals: list[list] = []
        self.best: dict | None = None  # the best evaluated actor so far (`snapshots`)

    # -- the loop's steps ----------------------------------------------------------------------

    def reset(self) -> np.ndarray:
        """A new episode; remembers how it started, for a checkpoint taken during it."""
        start = self.cfg.rand_widen_start
        if self.ep_start < start <= self.step:
            self._start_randomization()
        self.ep_start = self.step
        self.widening.scale = widening_scale(self.step, start, self.cfg.rand_widen_steps)
        self.episode = {
            "randomization_rng": self.rand_rng.bit_generator.state,
            "obs_noise": self.obs_noise.state_dict() if self.obs_noise else None,
            "seed": int(self.rng.integers(2**31)),
        }
        obs, _ = self.env.reset(seed=self.episode["seed"])
        self.noise.reset()
        self.ep_return, self.ep_len = 0.0, 0
        self.priv = self._privileged()
        return obs

    def _start_randomization(self) -> None:
        """A run whose ranges widen late starts its randomization when they do: the generator
        from its seed, the sensor-noise statistics from nothing. Up to there the run is the
        nominal run, every generator included, so it can branch from a nominal run's
        checkpoint (`branch`) instead of training those steps again."""
        self.rand_rng.bit_generator.state = self.rand_first
        if self.obs_noise:
            self.obs_noise.clear()

    def _privileged(self) -> np.ndarray | None:
        """The privileged critic's inputs now (None without one)."""
        if not self.cfg.privileged_critic:
            return None
        return privileged(self.env, self.cfg.randomization)

    def collect(self) -> bool:
        """One environment step: uniform random until learning starts, then μ(s) + noise, in
        [-1, 1]; stored in the replay. True when the episode ended."""
        cfg = self.cfg
        if self.step < cfg.learning_starts:
            a = self.rng.uniform(-1.0, 1.0, self.act_dim).astype(np.float32)
        else:
            obs = torch.as_tensor(self.obs, device=cfg.device).unsqueeze(0)
            a = np.clip(self.agent.act(obs)[0].cpu().numpy() + self.noise(), -1.0, 1.0)
        next_obs, r, terminated, truncated, _ = self.env.step(to_env_units(a, self.low, self.high))
        next_priv = self._privileged()
        self.buffer.add(self.obs, a, r, next_obs, terminated, truncated, self.priv, next_priv)
        self.agent.normalizer.update(torch.as_tensor(self.obs, device=cfg.device))
        if next_priv is not None:
            self.agent.priv_normalizer.update(torch.as_tensor(self.priv, device=cfg.device))
        self.priv = next_priv
        self.obs, self.ep_return, self.ep_len = next_obs, self.ep_return + float(r), self.ep_len + 1
        self.step += 1
        return bool(terminated or truncated)

    def evaluate(self) -> str:
        """Evaluate every actor (`algos.actors`), log each as a row, keep the best; returns a
        line for the progress bar."""
        self.next_eval += self.cfg.eval_every
        self.evaluated_at = self.schedule.updates  # the actors change with the next update
        text = []
        for name, view in actors(self.agent).items():
            res = self._measure(view)
            self.evals.append([self.step, time.perf_counter() - self.t0, *vars(res).values(), name])
            with open(self.out / "evals.csv", "a", newline="") as f:
                csv.writer(f).writerow(self.evals[-1])
            if self.on_eval is not None and not text:  # the deployed actor's, for sweeps
                self.on_eval(dict(zip(EVAL_COLUMNS, self.evals[-1], strict=True)))
            self._consider(view, name, self.step, res)
            self.writer.add_scalar(f"eval/{name}/return", res.mean_return, self.step)
            if res.success_rate is not None:
                self.writer.add_scalar(f"eval/{name}/success_rate", res.success_rate, self.step)
            text.append(f"{name} {_describe(res)}")
        return "; ".join(text)

    def end_episode(self) -> None:
        """Let the schedule learn, checkpoint when due, and start the next episode."""
        self.writer.add_scalar("train/episode_return", self.ep_return, self.step)
        learned = min(self.ep_len, self.step - self.cfg.learning_starts)
        self.log_losses(self.schedule.after_episode(learned, self.ep_return))
        self.obs = self.reset()
        # at the first episode end past each interval: the next episode has taken no step yet
        if self.step >= self.next_ckpt:
            self.next_ckpt = (
                self.step // self.cfg.checkpoint_every + 1
            ) * self.cfg.checkpoint_every
            self.save()

    def log_losses(self, losses: dict | None, every: int = 1) -> None:
        if losses is not None and self.step % every == 0:
            for k, v in losses.items():
                self.writer.add_scalar(f"train/{k}", float(v), self.step)

    # -- logs, checkpoints, export ---------------------------------------------------------

    def start_log(self) -> None:
        """config.json and evals.csv (on resume, the checkpoint's rows only: a run killed after
        an evaluation but before its next checkpoint evaluates that step again)."""
        (self.out / "config.json").write_text(self.whole.to_json())
        with open(self.out / "evals.csv", "w", newline="") as f:
            f.write(",".join(EVAL_COLUMNS) + "\n")
            csv.writer(f).writerows(self.evals)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out / "tb"))
        self.t0 = time.perf_counter() - self.wall_before
        cfg = self.cfg
        self.next_eval = (self.step // cfg.eval_every + 1) * cfg.eval_every
        self.next_ckpt = (self.step // cfg.checkpoint_every + 1) * cfg.checkpoint_every

    def save(self) -> None:
        """checkpoint.pt: everything a resumed run needs to continue exactly."""
        state = {
            "step": self.step,
            "wall_s": time.perf_counter() - self.t0,
            "evals": self.evals,
            "best": self.best,
            "replay": self.buffer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": self.rng.bit_generator.state,
            "randomization_rng": self.rand_rng.bit_generator.state,
            "obs_noise": self.obs_noise.state_dict() if self.obs_noise else None,
            "noise": self.noise.state_dict(),
            "episode": {**self.episode, "length": self.ep_len, "return": self.ep_return},
            "obs": torch.as_tensor(np.asarray(self.obs, np.float32)),
            **self.schedule.state_dict(),
        }
        checkpoint.save(self.out / "checkpoint.pt", self.cfg, self.agent, self.meta, state)
        self.saved_at = self.step

    def restore(self) -> None:
        """Continue from checkpoint.pt: weights, replay, generators, progress, and the episode
        under way, replayed from its start."""
        path = self.out / "checkpoint.pt"
        _, self.agent, _, state = checkpoint.load(path, self.cfg.device)
        if state is None:
            raise UsageError(f"{path} holds no training state to resume from")
        if state["step"] > self.cfg.steps or (
            state["step"] == self.cfg.steps and (self.out / "policy.onnx").exists()
        ):
            raise UsageError(
                f"{self.out} is at step {state['step']}: resume it with --steps above that"
            )
        self.buffer.load_state_dict(state["replay"])
        self.schedule = create_schedule(self.cfg, self.agent, self.buffer, self.rng)
        self.schedule.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])
        self.step, self.saved_at, self.wall_before = state["step"], state["step"], state["wall_s"]
        self.evals, self.best = state["evals"], upgrade(state.get("best"))
        if "episode" not in state:  # a checkpoint from before episodes were replayed: taken
            self._restore_generators(state)  # at an episode end, before the next reset
            self.obs = self.reset()
        else:
            self._replay_episode(state)
        log.info("resumed %s at step %d", self.out, self.step)

    def _restore_generators(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy_rng"]
        if "randomization_rng" in state:  # absent in checkpoints from before randomization
            self._restore_randomization(state)

    def _restore_randomization(self, saved: dict) -> None:
        """The randomization generator and sensor-noise statistics as `saved` holds them (a
        nominal run's checkpoint holds no statistics: they start from nothing)."""
        self.rand_rng.bit_generator.state = saved["randomization_rng"]
        if self.obs_noise:
            if saved.get("obs_noise") is None:
                self.obs_noise.clear()
            else:
                self.obs_noise.load_state_dict(saved["obs_noise"])

    def _replay_episode(self, state: dict) -> None:
        """Bring the env to where the checkpoint left it: reset it as the episode started and
        step it through the episode's actions, read back from the replay. Replayed exactly,
        the randomization ends where the checkpoint's did, so a run branched from a nominal
        run's checkpoint goes on as a straight run of its own config would."""
        episode = state["episode"]
        self.ep_start = state["step"] - episode["length"]
        cfg = self.cfg
        self.widening.scale = widening_scale(
            self.ep_start, cfg.rand_widen_start, cfg.rand_widen_steps
        )
        self._restore_randomization(episode)
        obs, _ = self.env.reset(seed=episode["seed"])
        for a in self.buffer.newest(episode["length"])["action"] if episode["length"] else []:
            obs = self.env.step(to_env_units(a, self.low, self.high))[0]
        self.rng.bit_generator.state = state["numpy_rng"]
        if not np.array_equal(np.asarray(obs, np.float32), state["obs"].numpy()):
            log.warning(
                "%s did not replay the episode under way identically: it ends here (truncated) "
                "and the run goes on from a new one, no longer bit-identical to a straight run",
                self.cfg.env_id,
            )
            self._restore_randomization(state)
            self.buffer.data["episode_end"][(self.buffer.pos - 1) % self.buffer.capacity] = 1.0
            self.obs = self.reset()
            return
        self.noise.load_state_dict(state["noise"])
        self.episode = {k: v for k, v in episode.items() if k not in ("length", "return")}
        self.obs, self.ep_len, self.ep_return = obs, episode["length"], episode["return"]
        self.priv = self._privileged()

    def _measure(self, view: AnyAgent) -> EvalResult:
        seed = self.cfg.seed + EVAL_SEED_OFFSET
        return evaluate(view, self.eval_env, self.cfg.eval_episodes, seed, self.cfg.device)

    def _consider(self, view: AnyAgent, name: str, step: int, res: EvalResult) -> None:
        best = self._best()
        if self._full(step) and (best is None or res.mean_return > best["eval_return"]):
            self.best = snapshot(view, name, step, res.mean_return, res.success_rate)

    def _full(self, step: int) -> bool:
        """Whether the actor at `step` trained on the full ranges. Where they widen late, the
        best at nominal dynamics is most often an actor from before (the nominal run's), so
        only those after compete for policy.onnx."""
        cfg = self.whole
        return widening_scale(step, cfg.rand_widen_start, cfg.rand_widen_steps) >= 1

    def _best(self) -> dict | None:
        """The best snapshot that competes (`_full`): one from before the ranges were full
        comes with a checkpoint branched from a nominal run, or from a grown run's stage."""
        return self.best if self.best and self._full(self.best["step"]) else None

    def export(self) -> Path:
        """policy.onnx (per the export rule, `snapshots.choose_export`), policy.last.onnx,
        agent.pt (the exported actor with the last critics: what fine-tuning and `mu export`
        start from) and curve.png. Actors not evaluated as they are now (TD7 learns after an
        evaluation at an episode's end) are evaluated now."""
        self.writer.close()
        same = self.evaluated_at == self.schedule.updates
        done = {row[-1]: row for row in self.evals if row[0] == self.step and same}
        last = None
        for name, view in actors(self.agent).items():
            row = done.get(name)
            res = EvalResult(*row[2:5]) if row else self._measure(view)
            if name == "current":
                last = snapshot(view, name, self.step, res.mean_return, res.success_rate)
            elif not row:
                self._consider(view, name, self.step, res)
        meta = {**self.meta, "train_steps": self.cfg.steps}
        pick, export_meta = choose_export(self.cfg.export, self._best(), last, meta)
        _, last_meta = choose_export("last", None, last, meta)
        exported = with_deployed(self.agent, pick["weights"])
        checkpoint.save(self.out / "agent.pt", self.cfg, exported, export_meta)
        from training.export import Exporter, export_policy
        from training.plots import plot_runs

        obs = self.buffer.recent_obs(1000)
        exporter = Exporter()  # one architecture: the second file fills the first one's graph
        export_policy(self.agent, last_meta, self.cfg, self.out / "policy.last.onnx", obs, exporter)
        path = export_policy(
            deployed(exported), export_meta, self.cfg, self.out / "policy.onnx", obs, exporter
        )
        log.info(
            "exported the %s actor of step %d (eval return %.1f) to %s; the last (eval return "
            "%.1f) to %s",
            pick["evaluated"], pick["step"], pick["eval_return"], path, last["eval_return"],
            self.out / "policy.last.onnx",
        )  # fmt: skip
        plot_runs([self.out], self.out / "curve.png")
        return path


def _describe(res: EvalResult) -> str:
    text = f"return {res.mean_return:.1f} ± {res.std_return:.1f}"
    return text if res.success_rate is None else f"{text}, success {res.success_rate:.2f}"
