"""The training loop: collect with exploration noise, update with `td3.update`, evaluate on a
separately seeded env, log, checkpoint, and export at the end the actor with the best
evaluation (`policy.onnx`, or the last with `export="last"`) and the last one
(`policy.last.onnx`).

TD7 (`td7.learn`) trains at episode ends instead, as many updates as steps were collected,
and its checkpoint rule (`td7.CheckpointRule`), not the best evaluation, picks the deployed
actor: evaluations and `policy.onnx` use the checkpoint policy.

Every episode starts with `env.reset(seed=...)` drawn from the trainer's generator and
checkpoints are taken at episode ends, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training import checkpoint, td7
from training.algos import AnyAgent, create_agent, create_buffer, deployed
from training.config import TrainConfig
from training.envs import (
    EVAL_SEED_OFFSET,
    FlatObs,
    action_bounds,
    make_env,
    run_episodes,
    to_env_units,
)
from training.noise import make_noise
from training.randomization import ObsNoise, find, randomize
from training.td3 import update

log = logging.getLogger(__name__)
RANDOMIZATION_STREAM = 1  # seeds the randomization generator beside the run's seed
EVAL_COLUMNS = ("step", "wall_s", "return_mean", "return_std", "success_rate")


@dataclass
class EvalResult:
    mean_return: float
    std_return: float
    success_rate: float | None


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
) -> Path:
    """Train per `cfg` into directory `out`; returns the path of the exported policy.onnx.
    `on_eval` gets each evaluation as a row of evals.csv ({column: value}): how a sweep
    reports to Ray Tune."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    # randomization draws from a stream of its own, so that runs without it are unchanged
    rand_rng = np.random.default_rng([cfg.seed, RANDOMIZATION_STREAM])

    flat = make_env(cfg.env_id, cfg.seed)
    env = randomize(flat, cfg.randomization, rand_rng)
    obs_noise = find(env, ObsNoise)  # the one randomizer with state beyond the generator
    # evaluations stay at nominal dynamics: the export rule compares policies there
    eval_env = make_env(cfg.env_id, cfg.seed + EVAL_SEED_OFFSET)
    low, high = action_bounds(env)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    meta = {
        "env_id": cfg.env_id,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "obs_layout": [list(p) for p in flat.layout],
        "action_low": low.tolist(),
        "action_high": high.tolist(),
        "randomization": cfg.randomization,
    }
    agent = create_agent(cfg, obs_dim, act_dim)
    buffer = create_buffer(cfg, obs_dim, act_dim)
    rule = (
        td7.CheckpointRule(
            cfg.td7_checkpoint_episodes, cfg.td7_checkpoint_switch, cfg.updates_per_step
        )
        if cfg.algo == "td7"
        else None
    )
    noise = make_noise(cfg.noise, act_dim, cfg.noise_std, rng)
    start, updates, wall_before, evals = 0, 0, 0.0, []
    best: dict | None = None  # the best evaluated actor so far (`_snapshot`)
    if resume:
        _, agent, _, state = checkpoint.load(out / "checkpoint.pt", cfg.device)
        if state is None:
            raise ValueError(f"{out / 'checkpoint.pt'} holds no training state to resume from")
        buffer.load_state_dict(state["replay"])
        torch.set_rng_state(state["torch_rng"])
        rng.bit_generator.state = state["numpy_rng"]
        if "randomization_rng" in state:  # absent in checkpoints from before randomization
            rand_rng.bit_generator.state = state["randomization_rng"]
        if obs_noise:
            obs_noise.load_state_dict(state["obs_noise"])
        start, updates, wall_before = state["step"], state["updates"], state["wall_s"]
        evals, best = state["evals"], state.get("best")
        if rule is not None:
            rule.load_state_dict(state["checkpoint_rule"])
        log.info("resumed %s at step %d", out, start)
    (out / "config.json").write_text(cfg.to_json())

    writer = _tensorboard(out)
    csv_path = out / "evals.csv"
    # On resume, the rows of the checkpoint only: a run killed after an evaluation but before
    # its next checkpoint evaluates that step again.
    with open(csv_path, "w", newline="") as f:
        f.write(",".join(EVAL_COLUMNS) + "\n")
        csv.writer(f).writerows(evals)
    t0 = time.perf_counter() - wall_before
    next_eval = (start // cfg.eval_every + 1) * cfg.eval_every
    next_ckpt = (start // cfg.checkpoint_every + 1) * cfg.checkpoint_every
    obs, _ = env.reset(seed=int(rng.integers(2**31)))
    noise.reset()
    ep_return, ep_len = 0.0, 0
    bar = tqdm(
        total=cfg.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True
    )
    for step in range(start, cfg.steps):
        # act: uniform random until learning starts, then μ(s) + noise, in [-1, 1]
        if step < cfg.learning_starts:
            a = rng.uniform(-1.0, 1.0, act_dim).astype(np.float32)
        else:
            a = agent.act(torch.as_tensor(obs, device=cfg.device).unsqueeze(0))[0].cpu().numpy()
            a = np.clip(a + noise(), -1.0, 1.0)
        next_obs, r, terminated, truncated, _ = env.step(to_env_units(a, low, high))
        buffer.add(obs, a, r, next_obs, terminated, truncated)
        agent.normalizer.update(torch.as_tensor(obs, device=cfg.device))
        obs, ep_return, ep_len = next_obs, ep_return + float(r), ep_len + 1

        if step + 1 > cfg.learning_starts and rule is None:
            for _ in range(cfg.updates_per_step):
                updates += 1
                losses = update(
                    agent,
                    buffer.sample(cfg.batch_size, rng, cfg.n_step, cfg.gamma),
                    cfg,
                    updates % cfg.policy_delay == 0,
                )
            if (step + 1) % 1000 == 0:
                for k, v in losses.items():
                    writer.add_scalar(f"train/{k}", float(v), step + 1)

        if step + 1 >= next_eval:
            next_eval += cfg.eval_every
            res = evaluate(
                deployed(agent),
                eval_env,
                cfg.eval_episodes,
                cfg.seed + EVAL_SEED_OFFSET,
                cfg.device,
            )
            evals.append(
                [
                    step + 1,
                    time.perf_counter() - t0,
                    res.mean_return,
                    res.std_return,
                    res.success_rate,
                ]
            )
            with open(csv_path, "a", newline="") as f:
                csv.writer(f).writerow(evals[-1])
            if on_eval is not None:
                on_eval(dict(zip(EVAL_COLUMNS, evals[-1], strict=True)))
            if rule is None and (best is None or res.mean_return > best["eval_return"]):
                best = _snapshot(agent, res, step + 1)
            writer.add_scalar("eval/return", res.mean_return, step + 1)
            if res.success_rate is not None:
                writer.add_scalar("eval/success_rate", res.success_rate, step + 1)
            bar.set_postfix_str(_describe(res))

        if terminated or truncated:
            writer.add_scalar("train/episode_return", ep_return, step + 1)
            learned = min(ep_len, step + 1 - cfg.learning_starts)  # steps past learning_starts
            if rule is not None and learned > 0:
                take, owed = rule.episode_end(learned, ep_return, updates)
                if take:
                    agent.save_checkpoint()
                for _ in range(owed):
                    updates += 1
                    losses = td7.learn(agent, buffer, rng, cfg, updates)
                if owed:
                    for k, v in losses.items():
                        writer.add_scalar(f"train/{k}", float(v), step + 1)
            # checkpoint at the first episode end past each interval, before the next reset
            # draws its seed, so that a resumed run redraws the same one
            if step + 1 >= next_ckpt or step + 1 == cfg.steps:
                next_ckpt = ((step + 1) // cfg.checkpoint_every + 1) * cfg.checkpoint_every
                state = {
                    "step": step + 1,
                    "updates": updates,
                    "wall_s": time.perf_counter() - t0,
                    "evals": evals,
                    "best": best,
                    "replay": buffer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "numpy_rng": rng.bit_generator.state,
                    "randomization_rng": rand_rng.bit_generator.state,
                    "obs_noise": obs_noise.state_dict() if obs_noise else None,
                    "checkpoint_rule": rule.state_dict() if rule else None,
                }
                checkpoint.save(out / "checkpoint.pt", cfg, agent, meta, state)
            obs, _ = env.reset(seed=int(rng.integers(2**31)))
            noise.reset()
            ep_return, ep_len = 0.0, 0
        bar.update(1)
    bar.close()
    writer.close()

    last_eval = evals[-1] if evals and evals[-1][0] == cfg.steps else None
    eval_seed = cfg.seed + EVAL_SEED_OFFSET
    final = (
        EvalResult(*last_eval[2:5])  # just evaluated at the last step
        if last_eval
        else evaluate(deployed(agent), eval_env, cfg.eval_episodes, eval_seed, cfg.device)
    )
    meta = {**meta, "train_steps": cfg.steps}
    if rule is not None:  # TD7: `final` judged the checkpoint policy; the last actor is apart
        final_checkpoint = final
        final = evaluate(agent, eval_env, cfg.eval_episodes, eval_seed, cfg.device)
    last_meta = {
        **meta,
        "eval_return": final.mean_return,
        "eval_success_rate": final.success_rate,
        "export_rule": "last",
    }
    exported, export_meta = agent, {**last_meta, "export_rule": cfg.export}
    if rule is not None and cfg.export == "best":
        exported = agent.checkpointed()
        export_meta = {
            **meta,
            "eval_return": final_checkpoint.mean_return,
            "eval_success_rate": final_checkpoint.success_rate,
            "export_rule": "checkpoint",
        }
    elif cfg.export == "best" and best is not None and best["eval_return"] > final.mean_return:
        exported = _restore(agent, best)
        export_meta = {
            **meta,
            "eval_return": best["eval_return"],
            "eval_success_rate": best["eval_success_rate"],
            "eval_step": best["step"],
            "export_rule": "best",
        }
    # agent.pt holds the exported actor (what fine-tuning starts from) with the last critics;
    # a td7 agent holds its checkpoint policy beside the last actor
    checkpoint.save(out / "agent.pt", cfg, agent if rule else exported, export_meta)
    from training.export import export_policy

    replay_obs = buffer.recent_obs(1000)
    export_policy(agent, last_meta, cfg, out / "policy.last.onnx", replay_obs=replay_obs)
    policy_path = export_policy(
        exported, export_meta, cfg, out / "policy.onnx", replay_obs=replay_obs
    )
    log.info(
        "exported the %s actor (eval return %.1f%s) to %s; the last (eval return %.1f) to %s",
        export_meta["export_rule"],
        export_meta["eval_return"],
        f" at step {export_meta['eval_step']}" if "eval_step" in export_meta else "",
        policy_path,
        final.mean_return,
        out / "policy.last.onnx",
    )
    from training.plots import plot_runs

    plot_runs([out], out / "curve.png")
    return policy_path


def _snapshot(agent: AnyAgent, res: EvalResult, step: int) -> dict:
    """The actor and normalizer weights behind an evaluation, copied (plain tensors, so the
    training checkpoint keeps loading with weights_only)."""
    return {
        "eval_return": res.mean_return,
        "eval_success_rate": res.success_rate,
        "step": step,
        "actor": copy.deepcopy(agent.actor.state_dict()),
        "normalizer": copy.deepcopy(agent.normalizer.state_dict()),
    }


def _restore(agent: AnyAgent, snap: dict) -> AnyAgent:
    """`agent` with the actor and normalizer of `snap` (copies; `agent` is left as it is)."""
    actor, normalizer = copy.deepcopy(agent.actor), copy.deepcopy(agent.normalizer)
    actor.load_state_dict(snap["actor"])
    normalizer.load_state_dict(snap["normalizer"])
    return dataclasses.replace(agent, actor=actor, normalizer=normalizer)


def _describe(res: EvalResult) -> str:
    text = f"eval return {res.mean_return:.1f} ± {res.std_return:.1f}"
    return text if res.success_rate is None else f"{text}, success {res.success_rate:.2f}"


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "tb"))
