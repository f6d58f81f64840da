"""Our TD3 (and TD7, `--algo td3 td7`) against Stable-Baselines3 TD3 (RL Zoo settings) on the
same env, seeds and budget.

    python -m benchmarks.train_vs_sb3 --env InvertedPendulumBulletEnv-v0 --steps 50000 --seeds 0 1 2
    python -m benchmarks.train_vs_sb3 --env HalfCheetahBulletEnv-v0=150000 --algo td3 td7
    python -m benchmarks.train_vs_sb3 --env PandaReachDense-v3=20000 \
        --env HalfCheetahBulletEnv-v0=150000 --eval-every 10000 --out runs/bench_one
    python -m benchmarks.train_vs_sb3 --updates-only [--device cuda] [--algo td3 td7]

Both are evaluated the same way during training: deterministic actions, `--eval-episodes`
episodes on an env seeded apart from the training env (episode i reset with seed 10^6 + seed + i),
every `--eval-every` steps, wall-clock counted from the start of training including evaluation.
Every run, ours and SB3's, is a trial of `training.runner` (Ray Tune, as `mu sweep`): `--jobs`
at once, one CPU and one torch thread each, on local Ray or on a cluster with `--address`
(then `--out` must be a path every node mounts). Finished runs found in `--out` are reused
(ours only when the config matches) and ours unfinished resume from their last checkpoint
(every 25k steps), so an interrupted benchmark can be rerun cheaply; clear `--out` after
changing the training code. SB3's runs restart. Prints a table, writes JSON and a
PNG of the learning curves against steps and against wall-clock.

`--updates-only` measures the update alone (no simulator): updates per second of each `--algo`
on random transitions held on the device, for the default and the RL Zoo network sizes, with
the FLOPs of one update and the rate they run at; with td7 also the cost of a batch draw,
uniform against LAP's sum-tree (draw + priority write).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from training.envs import EVAL_SEED_OFFSET
from training.presets import ZOO

CURVE_COLUMNS = ("step", "wall_s", "return_mean", "return_std", "success_rate")  # of evals.csv
WIDTHS = [6, 4, 9, 9, 8, 8, 14, 6]


def run_ours(
    env_id: str,
    seed: int,
    steps: int,
    eval_every: int,
    eval_episodes: int,
    out: str,
    algo: str = "td3",
    report: Callable[[list], None] | None = None,
) -> dict:
    """Train ours; `report` gets each evaluation as [step, wall_s, return, std, success]."""
    from training.config import TrainConfig
    from training.presets import preset
    from training.trainer import train

    cfg = TrainConfig.from_dict(
        {
            **preset(env_id, algo=algo),
            "env_id": env_id,
            "seed": seed,
            "steps": steps,
            "eval_every": eval_every,
            "eval_episodes": eval_episodes,
            # Long runs leave a checkpoint every 25k steps: a benchmark stopped (a session's
            # end, a kill) and run again resumes them there, exactly.
            "checkpoint_every": min(steps, 25_000),
            "algo": algo,
        }  # fmt: skip
    )
    run = Path(out) / (f"mu-{env_id}-s{seed}" if algo == "td3" else f"mu-{algo}-{env_id}-s{seed}")
    saved = run / "config.json"
    # A finished run with the same config is reused, not retrained, and an unfinished one
    # resumed from its last checkpoint (training code is not compared: clear --out after
    # changing it).
    same = saved.exists() and saved.read_text() == cfg.to_json()
    reused = same and _finished(run / "evals.csv", steps)
    if not reused:
        on_eval = (lambda row: report(_row(row))) if report else None
        resume = same and (run / "checkpoint.pt").exists()
        train(cfg, run, resume=resume, overwrite=not resume, progress=False, on_eval=on_eval)
    rows = [_row(r) for r in csv.DictReader(open(run / "evals.csv")) if _deployed(r, algo)]
    for row in rows if reused and report else []:
        report(row)
    impl = "mu" if algo == "td3" else f"mu-{algo}"
    return _curve(impl, env_id, seed, rows)


def _deployed(row: dict[str, str], algo: str) -> bool:
    """A row of the actor the curve follows: TD7's checkpoint policy (the paper's), TD3's one
    actor (evals.csv from before the `actor` column has TD3's rows only)."""
    return row.get("actor") in (None, "checkpoint" if algo == "td7" else "current")


def _row(row: dict) -> list[float | None]:
    """The numbers of a row of evals.csv (text, or `train`'s on_eval values)."""
    return [float(row[c]) if row[c] not in ("", "None", None) else None for c in CURVE_COLUMNS]


def _finished(evals_csv: Path, steps: int) -> bool:
    lines = evals_csv.read_text().splitlines() if evals_csv.exists() else []
    return len(lines) > 1 and int(lines[-1].split(",")[0]) == steps


def run_sb3(
    env_id: str,
    seed: int,
    steps: int,
    eval_every: int,
    eval_episodes: int,
    out: str,
    report: Callable[[list], None] | None = None,
) -> dict:
    """Train SB3's TD3; `report` as in `run_ours`."""
    cached = Path(out) / f"sb3-{env_id}-s{seed}.json"
    if cached.exists() and json.loads(cached.read_text())["steps"][-1:] == [steps]:
        curve = json.loads(cached.read_text())
        for i, step in enumerate(curve["steps"] if report else []):
            report([step, curve["wall_s"][i], curve["return"][i], None, curve["success_rate"][i]])
        return curve
    import torch
    from stable_baselines3 import TD3
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.noise import NormalActionNoise

    from training.envs import make_env, run_episodes

    torch.set_num_threads(1)
    env, eval_env = make_env(env_id, seed), make_env(env_id, seed + EVAL_SEED_OFFSET)
    act_dim = env.action_space.shape[0]
    short = steps <= 100_000  # a 10k random warm-up would eat most of a short budget
    model = TD3(
        "MlpPolicy",
        env,
        learning_rate=ZOO["actor_lr"],
        buffer_size=ZOO["buffer_size"],
        learning_starts=1000 if short else ZOO["learning_starts"],
        batch_size=ZOO["batch_size"],
        tau=ZOO["tau"],
        gamma=ZOO["gamma"],
        train_freq=1,
        gradient_steps=1,
        action_noise=NormalActionNoise(np.zeros(act_dim), ZOO["noise_std"] * np.ones(act_dim)),
        policy_delay=ZOO["policy_delay"],
        target_policy_noise=ZOO["target_noise"],
        target_noise_clip=ZOO["target_noise_clip"],
        policy_kwargs={"net_arch": ZOO["actor_hidden"]},
        seed=seed,
        device="cpu",
    )
    rows: list[list] = []

    class Evaluate(BaseCallback):
        def _on_training_start(self) -> None:
            self.t0 = time.perf_counter()

        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                returns, rate = run_episodes(
                    eval_env,
                    lambda obs: self.model.predict(obs, deterministic=True)[0],
                    eval_episodes,
                    seed + EVAL_SEED_OFFSET,
                )
                wall = time.perf_counter() - self.t0
                rows.append(
                    [
                        self.num_timesteps,
                        wall,
                        float(np.mean(returns)),
                        float(np.std(returns)),
                        rate,
                    ]
                )
                if report:
                    report(rows[-1])
            return True

    model.learn(total_timesteps=steps, callback=Evaluate())
    curve = _curve("sb3", env_id, seed, rows)
    cached.write_text(json.dumps(curve))  # a long benchmark that stops can be rerun cheaply
    return curve


def bench_trial(params: dict) -> None:
    """One run, ours or SB3's, as a Ray Tune trial: each evaluation reported as it comes, the
    learning curve (JSON) with the last report."""
    from ray import tune

    spec = params["trial"]
    fn = run_sb3 if spec["impl"] == "sb3" else run_ours
    kw = {} if spec["impl"] == "sb3" else {"algo": spec["impl"]}
    last: dict = {}

    def report(row: list) -> None:
        last.update({"step": int(row[0]), "wall_s": row[1], "return": row[2]})
        if row[4] is not None:
            last["success_rate"] = row[4]
        tune.report(dict(last))

    args = [spec[k] for k in ("env", "seed", "steps", "eval_every", "eval_episodes", "out")]
    curve = fn(*args, report=report, **kw)
    tune.report({**last, "final": True, "curve": json.dumps(curve)})


def run_all(trials: list[dict], args: argparse.Namespace) -> list[dict]:
    """Every run through `training.runner`; their curves, in the order of `trials`."""
    from training.runner import RunnerConfig, run_trials

    digest = hashlib.sha256(json.dumps(trials, sort_keys=True).encode()).hexdigest()[:8]
    runner = RunnerConfig(
        name=f"train_vs_sb3-{digest}",  # the same runs resume, other runs start afresh
        storage=str(Path(args.out, "ray").resolve()),
        address=args.address,
        workers=args.jobs,
    )
    grid = run_trials(bench_trial, trials, runner)
    by_label = {}
    for result in grid:
        if result.error is not None or "curve" not in (result.metrics or {}):
            raise RuntimeError(
                f"run {result.config['trial']['label']} did not finish: {result.error} "
                f"(its error.txt is in {result.path})"
            )
        by_label[result.config["trial"]["label"]] = json.loads(result.metrics["curve"])
    return [by_label[t["label"]] for t in trials]


def _curve(impl: str, env_id: str, seed: int, rows: list[list]) -> dict:
    return {
        "impl": impl,
        "env_id": env_id,
        "seed": seed,
        "steps": [int(r[0]) for r in rows],
        "wall_s": [r[1] for r in rows],
        "return": [r[2] for r in rows],
        "success_rate": [r[4] for r in rows],
    }


def time_to_reach(curve: dict, target: float) -> float | None:
    """Wall-clock of the first evaluation at or above `target`, None if never reached."""
    for wall, ret in zip(curve["wall_s"], curve["return"], strict=True):
        if ret >= target:
            return wall
    return None


def summarize(curves: list[dict]) -> list[dict]:
    """Per env and seed: final returns, wall-clock, and our time to SB3's final return."""
    rows = []
    for ours in (c for c in curves if c["impl"].startswith("mu")):
        sb3 = next(
            c
            for c in curves
            if c["impl"] == "sb3" and (c["env_id"], c["seed"]) == (ours["env_id"], ours["seed"])
        )
        target = sb3["return"][-1]
        t_ours, t_sb3 = time_to_reach(ours, target), time_to_reach(sb3, target)
        rows.append(
            {
                "impl": ours["impl"],
                "env_id": ours["env_id"],
                "seed": ours["seed"],
                "steps": ours["steps"][-1],
                "mu_return": ours["return"][-1],
                "sb3_return": target,
                "mu_success": ours["success_rate"][-1],
                "sb3_success": sb3["success_rate"][-1],
                "mu_wall_s": ours["wall_s"][-1],
                "sb3_wall_s": sb3["wall_s"][-1],
                "mu_time_to_sb3_final_s": t_ours,
                "time_ratio": None if t_ours is None or not t_sb3 else t_ours / t_sb3,
            }
        )
    return rows


def print_table(rows: list[dict], curves: list[dict]) -> str:
    lines = []
    for env_id in dict.fromkeys(r["env_id"] for r in rows):
        lines.append(
            f"\n{env_id}: evaluation return, mean ± std over seeds (success rate where reported)"
        )
        impls = list(dict.fromkeys(c["impl"] for c in curves if c["env_id"] == env_id))
        names = {"mu": "mu TD3", "mu-td7": "mu TD7", "mu-ddpg": "mu DDPG", "sb3": "SB3 TD3 (zoo)"}
        lines.append(f"{'steps':>8} | " + " | ".join(f"{names.get(i, i):>22}" for i in impls))
        by = {
            impl: [c for c in curves if c["env_id"] == env_id and c["impl"] == impl]
            for impl in impls
        }
        for i, step in enumerate(by[impls[0]][0]["steps"]):
            cells = []
            for impl in impls:
                vals = [c["return"][i] for c in by[impl] if i < len(c["return"])]
                succ = [
                    c["success_rate"][i]
                    for c in by[impl]
                    if i < len(c["return"]) and c["success_rate"][i] is not None
                ]
                cell = f"{_num(np.mean(vals)):>8} ± {_num(np.std(vals)):>6}"
                cells.append(cell + (f" ({np.mean(succ):.2f})" if succ else "       "))
            lines.append(f"{step:>8} | " + " | ".join(f"{c:>22}" for c in cells))
        head = ["impl", "seed", "mu final", "sb3 final", "mu wall", "sb3 wall", "mu t→sb3 final"]
        head.append("ratio")
        lines.append(" ".join(f"{h:>{w}}" for h, w in zip(head, WIDTHS, strict=True)))
        for r in (r for r in rows if r["env_id"] == env_id):
            t = (
                "never"
                if r["mu_time_to_sb3_final_s"] is None
                else f"{r['mu_time_to_sb3_final_s']:.0f}s"
            )
            ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
            cells = [r["impl"], r["seed"], _num(r["mu_return"]), _num(r["sb3_return"])]
            cells += [f"{r['mu_wall_s']:.0f}s", f"{r['sb3_wall_s']:.0f}s", t, ratio]
            lines.append(" ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS, strict=True)))
    text = "\n".join(lines)
    print(text)
    return text


def _num(x: float) -> str:
    """Returns near zero (PandaReach: about -0.2) need more decimals than locomotion's."""
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def plot(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(c["env_id"] for c in curves))
    fig, axes = plt.subplots(len(envs), 2, figsize=(11, 3.6 * len(envs)), squeeze=False)
    for row, env_id in enumerate(envs):
        for c in (c for c in curves if c["env_id"] == env_id):
            color = {"mu": "C0", "sb3": "C1"}.get(c["impl"], "C2")
            style = {"color": color, "alpha": 0.8}
            label = f"{c['impl']} s{c['seed']}"
            axes[row, 0].plot(c["steps"], c["return"], label=label, **style)
            axes[row, 1].plot(c["wall_s"], c["return"], label=label, **style)
        axes[row, 0].set(
            title=f"{env_id}: return vs steps", xlabel="env steps", ylabel="eval return"
        )
        axes[row, 1].set(title=f"{env_id}: return vs wall-clock", xlabel="seconds")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _update_setup(device: str, hidden: list[int], algo: str):
    """An agent, a random batch (batch 256, obs 26, act 6: HalfCheetah's sizes) and one update
    step: `step(i)` is update number i (counted from 1), the actor every `policy_delay`, td7's
    target refresh every `td7_target_every`."""
    import torch

    from training import td3, td7
    from training.algos import create_agent
    from training.config import TrainConfig

    torch.manual_seed(0)
    cfg = TrainConfig(algo=algo, device=device, actor_hidden=hidden, critic_hidden=hidden)
    agent = create_agent(cfg, obs_dim=26, act_dim=6)
    n = cfg.batch_size
    batch = {
        "obs": torch.randn(n, 26, device=device),
        "action": torch.rand(n, 6, device=device) * 2 - 1,
        "reward": torch.randn(n, device=device),
        "next_obs": torch.randn(n, 26, device=device),
        "next_obs_1": torch.randn(n, 26, device=device),  # td7's encoder target
        "terminal": torch.zeros(n, device=device),
        "discount": torch.full((n,), cfg.gamma, device=device),
    }

    def step(i: int) -> None:
        if algo == "td7":
            td7.update(agent, batch, cfg, i % cfg.policy_delay == 0)
            if i % cfg.td7_target_every == 0:
                td7.refresh(agent)
        else:
            td3.update(agent, batch, cfg, i % cfg.policy_delay == 0)

    return cfg, step


def update_throughput(
    device: str, hidden: list[int], seconds: float = 10.0, algo: str = "td3"
) -> float:
    """Updates/s of `td3.update` or `td7.update` on random transitions held on `device`."""
    import torch

    _, step = _update_setup(device, hidden, algo)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(1, 21):  # warm-up
        step(i)
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            count += 1
            step(count)
        sync()
    return count / (time.perf_counter() - t0)


def update_flops(hidden: list[int], algo: str = "td3") -> float:
    """FLOPs of one update, averaged over `policy_delay` updates (one of them steps the actor),
    as torch's FlopCounterMode counts them: matmuls forward and backward, which is what the
    update's time goes to on a CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg, step = _update_setup("cpu", hidden, algo)
    with FlopCounterMode(display=False) as counter:
        for i in range(1, cfg.policy_delay + 1):
            step(i)
    return counter.get_total_flops() / cfg.policy_delay


def sampling_cost(size: int, seconds: float = 2.0) -> dict[str, float]:
    """Microseconds per batch of 256 from a buffer holding `size` transitions: a uniform draw,
    and LAP's sum-tree draw plus its priority write (CPU, numpy)."""
    from training.lap import PrioritizedReplay
    from training.replay import ReplayBuffer

    rng = np.random.default_rng(0)
    out = {}
    for name, buffer in (
        ("uniform", ReplayBuffer(size, 26, 6)),
        ("lap", PrioritizedReplay(size, 26, 6)),
    ):
        buffer.size = size  # random contents: the cost does not depend on them
        if isinstance(buffer, PrioritizedReplay):
            buffer.priority.set(np.arange(size), rng.uniform(1, 3, size))
        count, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            batch = buffer.sample(256, rng, n_step=1)
            if isinstance(buffer, PrioritizedReplay):
                buffer.update_priorities(batch["index"].numpy(), rng.uniform(1, 3, 256))
            count += 1
        out[name] = (time.perf_counter() - t0) / count * 1e6
    return out


def updates_only(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for algo in args.algo:
        for hidden in ([256, 256], [400, 300]):
            rate = update_throughput(args.device, hidden, args.seconds, algo)
            flops = update_flops(hidden, algo)
            rows.append(
                {
                    "algo": algo,
                    "device": args.device,
                    "threads": args.threads,
                    "hidden": hidden,
                    "updates_per_s": rate,
                    "gflop_per_update": flops / 1e9,
                    "gflop_per_s": rate * flops / 1e9,
                }
            )
            print(
                f"{algo} {args.device} threads={args.threads} hidden={hidden}: "
                f"{rate:8.1f} updates/s, {flops / 1e9:.2f} GFLOP each, "
                f"{rate * flops / 1e9:5.1f} GFLOP/s"
            )
    if "td7" in args.algo:
        for size in (150_000, 1_000_000):
            cost = sampling_cost(size)
            rows.append({"sampling_buffer_size": size, **{f"{k}_us": v for k, v in cost.items()}})
            print(
                f"batch draw from {size} transitions: uniform {cost['uniform']:.0f} us, "
                f"LAP sum-tree draw + priority write {cost['lap']:.0f} us"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"updates_{args.device.replace(':', '')}_t{args.threads}.json"
    path.write_text(json.dumps(rows, indent=1))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--env",
        action="append",
        metavar="ID[=STEPS]",
        help="env id, optionally with its own step budget (repeat for several)",
    )
    p.add_argument("--steps", type=int, help="step budget of the envs given without one")
    p.add_argument("--updates-only", action="store_true", help="time the update loop alone")
    p.add_argument("--device", default="cpu", help="with --updates-only: cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="with --updates-only: torch threads")
    p.add_argument("--seconds", type=float, default=10.0, help="with --updates-only: per size")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--algo",
        nargs="+",
        choices=["td3", "ddpg", "td7"],
        default=["td3"],
        help="our algorithms to run beside SB3 (and to time with --updates-only)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=5000,
        help="steps between evaluations (at least 10 per run)",
    )
    p.add_argument("--eval-episodes", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--address", help="Ray cluster to run on (default: local Ray)")
    p.add_argument("--out", default="runs/bench_train")
    args = p.parse_args(argv)
    if args.updates_only:
        return updates_only(args)
    budgets = {}
    for item in args.env or []:
        env, _, steps = item.partition("=")
        budgets[env] = int(steps) if steps else args.steps
    if not budgets or None in budgets.values():
        p.error("give --env ID=STEPS, or --env ID with --steps (or --updates-only)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # each run a trial in a fresh worker process: no state, and no stale module, shared
    trials = [
        {
            "label": f"{'sb3' if impl == 'sb3' else 'mu-' + impl}-{env}-s{seed}",
            "impl": impl,
            "env": env,
            "seed": seed,
            "steps": steps,
            "eval_every": min(args.eval_every, steps // 10),
            "eval_episodes": args.eval_episodes,
            "out": str(out.resolve()),
        }
        for env, steps in budgets.items()
        for seed in args.seeds
        for impl in [*args.algo, "sb3"]
    ]
    curves = run_all(trials, args)
    rows = summarize(curves)
    table = print_table(rows, curves)
    tag = "_".join(f"{env.split('-')[0]}_{steps}" for env, steps in budgets.items())
    (out / f"train_vs_sb3_{tag}.json").write_text(
        json.dumps({"args": vars(args), "summary": rows, "curves": curves}, indent=1)
    )
    (out / f"train_vs_sb3_{tag}.txt").write_text(table + "\n")
    plot(curves, out / f"train_vs_sb3_{tag}.png")
    print(f"\nwrote {out}/train_vs_sb3_{tag}.{{json,txt,png}}")


if __name__ == "__main__":
    main()
