"""Online fine-tuning across a reality gap: the PandaReach policy trained on the nominal
simulator serves a "robot" whose motor is weak and miscalibrated (applied action = 0.5 * a +
bias, clipped to the bounds). One run measures, with the same evaluation seeds:

  nominal   the policy on the nominal simulator (what the gap costs is measured against it)
  before    the served policy on the gap simulator, learner paused
  online    N steps of fine-tuning from the robot's reported rewards (learner on, exploring)
  after     the version the server promoted, evaluated deterministically on the gap simulator
  bound     what the motor allows: a controller that moves the end effector as close to the
            goal as the motor can each step (`reach_bound`), at nominal and on the gap. The weak
            motor is slower: no policy gets back to the nominal return, so the share recovered
            is also given of what is achievable (after - before) / (bound - before)

and the ActStream round-trip p99 seen by the loop with the learner paused and on, over N ticks
each, in alternating blocks of the same loop (see `online`), against `mu serve` in its own
process as on a robot computer. The loop runs at a fixed rate (default 100 Hz) like a robot
would, so the learner gets the time between steps.

    python -m benchmarks.finetune_gap [--policy policies/panda_reach] [--steps 12000] [--seed 0]
                                      [--out benchmarks/results]

`--policy DIR` starts from DIR/policy.onnx and fine-tunes DIR/agent.pt (e.g. the bundled
policies/panda_reach_robust, trained with domain randomization); results are named after DIR
unless it is the default.

`--local` runs the online phase on the local lane: the loop evaluates the shipped policy in its
own process (LocalClient), explores with the server's std and reports transitions
through the bounded queue and ReportTransitions; the latency rows are then the in-process policy
cost. Evaluations stay on ActStream (the same versions, deterministic). Results get `_local`.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from controller.finetune.config import FinetuneConfig
from controller.harness import ServerProcess, serve_command
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.robot.client import Client
from controller.robot.local import LocalClient
from training.envs import make_env

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
POLICY_DIR = ROOT / "policies" / "panda_reach"
MOTOR_SCALE = 0.5
MOTOR_BIAS = np.array([0.2, -0.2, 0.2], np.float32)
STEP_M = 0.05  # panda-gym: an action of 1 moves the end-effector target 5 cm
SETTLE_S = 3.0  # longer than a candidate export takes the learner
EVAL_SEED = 10_000  # evaluation episodes reset with EVAL_SEED + i; online episodes elsewhere


class GapEnv:
    """The simulated robot with the gap, in front of the env (a reset seed per episode)."""

    def __init__(self, gap: bool, seed: int) -> None:
        self.env = make_env("PandaReachDense-v3", seed)
        self.gap = gap

    def reset(self, seed: int) -> np.ndarray:
        return self.env.reset(seed=seed)[0]

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool]:
        if self.gap:
            action = np.clip(MOTOR_SCALE * action + MOTOR_BIAS, -1.0, 1.0)
        obs, r, terminated, truncated, _ = self.env.step(action)
        return obs, float(r), bool(terminated), bool(truncated)


class LockStep:
    """One ActStream, one request at a time, timed."""

    def __init__(self, stub: pb_grpc.ControllerStub) -> None:
        self._requests: queue.Queue[pb.ActRequest | None] = queue.Queue()
        self._replies = stub.ActStream(iter(self._requests.get, None))
        self.rtt_us: list[float] = []
        self._first = True

    def step(self, request: pb.ActRequest) -> pb.ActResponse:
        t0 = time.perf_counter()
        self._requests.put(request)
        reply = next(self._replies)
        if not self._first:  # the first step also opens the stream
            self.rtt_us.append((time.perf_counter() - t0) * 1e6)
        self._first = False
        if reply.HasField("error"):
            raise RuntimeError(f"server refused step {request.seq}: {reply.error.message}")
        return reply

    def close(self) -> None:
        self._requests.put(None)


class LocalStep:
    """LockStep's interface on the local lane: what a request reports about the previous step
    goes to client.report(), its observation to client.act() in this process."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.rtt_us: list[float] = []
        self._first = True

    def step(self, request: pb.ActRequest) -> pb.ActResponse:
        client = self.client
        if request.HasField("reward"):
            done = request.terminated or request.truncated
            following = request.final_obs if done and len(request.final_obs) else request.obs
            client.report(request.reward, list(following), terminated=request.terminated,
                          truncated=request.truncated)  # fmt: skip
        t0 = time.perf_counter()
        action = client.act(list(request.obs))
        if not self._first:
            self.rtt_us.append((time.perf_counter() - t0) * 1e6)
        self._first = False
        return pb.ActResponse(action=action.tolist(), policy_version=client.version)

    def close(self) -> None:
        pass


def run_episodes(
    stream: LockStep,
    env: GapEnv,
    seeds: list[int],
    rate_hz: float,
    report: bool,
    max_steps: int | None = None,
) -> tuple[list[float], list[int]]:
    """Episodes reset with `seeds` (stopping early after `max_steps`) at a fixed rate; with
    `report`, rewards go back on the next request (the convention in controller.proto).
    Returns (returns, version that ended each episode)."""
    period, next_tick = 1.0 / rate_hz, time.perf_counter()
    returns, versions = [], []
    seq = 0
    obs = env.reset(seeds[0])
    reply = stream.step(pb.ActRequest(obs=obs.tolist(), seq=seq))
    for k, _ in enumerate(seeds):
        total, done = 0.0, False
        while not done:
            obs, r, terminated, truncated = env.step(np.asarray(reply.action, np.float32))
            total += r
            done = terminated or truncated
            request = pb.ActRequest(seq=(seq := seq + 1))
            if done:
                final = obs
                obs = env.reset(seeds[k + 1]) if k + 1 < len(seeds) else obs
                # A policy with history starts it afresh here (a report's episode end says so too).
                request.episode_start = True
                if report:
                    request.final_obs[:] = final.tolist()
            if report:
                request.reward = r
                request.terminated, request.truncated = terminated, truncated
            request.obs[:] = obs.tolist()
            next_tick += period
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.perf_counter()
            reply = stream.step(request)
        returns.append(total)
        versions.append(reply.policy_version)
        if max_steps is not None and seq >= max_steps:
            break
    return returns, versions


def reach_bound(gap: bool, args: argparse.Namespace) -> dict[str, Any]:
    """What the motor allows: each step, the action that brings the end effector closest to
    the goal, per axis, within what the motor can apply (nominal: [-1, 1]; the gap:
    0.5 * [-1, 1] + bias, so [-0.3, 0.7] on a +0.2 axis). On the same evaluation episodes as
    the policies. At nominal it scores about what the trained policy does; on the gap sim it
    is the return a policy fine-tuned to perfection would reach, within a few percent: the weak
    motor moves the arm slower, and no policy wins that time back."""
    env = GapEnv(gap, args.seed)
    parts = dict(env.env.unwrapped.observation_space.spaces.items())  # the flat obs, in order
    start = {k: sum(int(np.prod(v.shape)) for v in list(parts.values())[:i])
             for i, k in enumerate(parts)}  # fmt: skip
    at, goal = (slice(start[k], start[k] + 3) for k in ("achieved_goal", "desired_goal"))
    scale, bias = (MOTOR_SCALE, MOTOR_BIAS) if gap else (1.0, np.zeros(3, np.float32))
    low, high = np.maximum(bias - scale, -1.0), np.minimum(bias + scale, 1.0)
    returns = []
    for i in range(args.eval_episodes):
        obs, total, done = env.reset(EVAL_SEED + i), 0.0, False
        while not done:
            applied = np.clip((obs[goal] - obs[at]) / STEP_M, low, high)
            obs, r, terminated, truncated = env.step(((applied - bias) / scale).astype(np.float32))
            total, done = total + r, terminated or truncated
        returns.append(total)
    return {"mean_return": float(np.mean(returns)), "returns": returns}


def serve(args: argparse.Namespace, versions: Path) -> ServerProcess:
    """`mu serve --finetune` in its own process, as on a robot computer."""
    command = serve_command(args.policy / "policy.onnx", "127.0.0.1:0")
    command += ["--finetune", str(args.policy / "agent.pt"), "--finetune-dir", str(versions),
                "--explore-std", str(args.explore_std)]  # fmt: skip
    for field, value in (("candidate_every", args.candidate_every),
                         ("actor_lr", args.actor_lr), ("rollback_window", args.window),
                         ("seed", args.seed)):  # fmt: skip
        command += ["--finetune-set", f"{field}={value}"]
    for setting in args.finetune_set:
        command += ["--finetune-set", setting]
    return ServerProcess(command)


def evaluate(stub: pb_grpc.ControllerStub, gap: bool, args: argparse.Namespace) -> dict:
    stream = LockStep(stub)
    eval_seeds = [EVAL_SEED + i for i in range(args.eval_episodes)]
    rets, versions = run_episodes(stream, GapEnv(gap, args.seed), eval_seeds, args.rate, False)
    stream.close()
    return {"mean_return": float(np.mean(rets)), "returns": rets, "version": versions[-1]}


def online(
    stub: pb_grpc.ControllerStub, args: argparse.Namespace, local: LocalClient | None = None
) -> dict[str, Any]:
    """`args.steps` ticks with the learner on, in blocks of `args.block` that alternate with as
    many ticks with it paused (no updates, no exploration): the same loop, stream and reported
    traffic, so the two latency samples differ in the learner alone, and drift on a shared
    machine falls on both."""
    env, control = GapEnv(True, args.seed), pb.FinetuneControlRequest()
    seeds = iter(range(args.seed * 100_000, args.seed * 100_000 + 2 * args.steps))
    rtt: dict[str, list[float]] = {"off": [], "on": []}
    seconds = {"off": 0.0, "on": 0.0}  # the blocks' loop time, for updates per second
    returns: list[float] = []
    versions: list[int] = []
    t0 = time.perf_counter()
    while len(rtt["on"]) < args.steps:
        for side in ("off", "on"):
            if side == "off":
                stub.PauseFinetuning(control, timeout=10)
                time.sleep(SETTLE_S)  # the learner finishes the update or export it is in
            else:
                stub.ResumeFinetuning(control, timeout=10)
            if local is not None:  # the pause/resume reached the loop (exploration off/on)
                on = side == "on"
                local.watcher.wait_until(lambda p, on=on: (p.explore_std > 0) == on, timeout=30)
            stream = LockStep(stub) if local is None else LocalStep(local)
            block_seeds = list(islice(seeds, args.block))  # episodes end before they run out
            start = time.perf_counter()
            rets, vers = run_episodes(stream, env, block_seeds, args.rate, True, args.block)
            seconds[side] += time.perf_counter() - start
            stream.close()
            rtt[side] += stream.rtt_us
            if side == "on":
                returns += rets
                versions += vers
    stub.PauseFinetuning(control, timeout=10)  # evaluated without exploration from here on
    return {
        "steps": len(rtt["on"]),
        "wall_s": time.perf_counter() - t0,
        "seconds": seconds,
        "returns": returns,
        "versions": versions,
        "latency": {side: latency(values) for side, values in rtt.items()},
    }


def latency(rtt_us: list[float]) -> dict[str, float]:
    return {
        "ticks": len(rtt_us),
        "p50_us": float(np.percentile(rtt_us, 50)),
        "p99_us": float(np.percentile(rtt_us, 99)),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "env_id": "PandaReachDense-v3",
        "policy": str(args.policy),
        "gap": {"motor_scale": MOTOR_SCALE, "motor_bias": MOTOR_BIAS.tolist()},
        "seed": args.seed,
        "rate_hz": args.rate,
        "candidate_every": args.candidate_every,
        "lane": "local" if args.local else "grpc",
        "eval_seeds": [EVAL_SEED, EVAL_SEED + args.eval_episodes - 1],
    }
    with tempfile.TemporaryDirectory(prefix="mu-finetune-") as tmp:
        server = serve(args, Path(tmp) / "versions")
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.ControllerStub(channel)
                stub.PauseFinetuning(pb.FinetuneControlRequest(), timeout=10)
                results["nominal"] = evaluate(stub, False, args)
                results["before"] = evaluate(stub, True, args)
                log.info("nominal %.3f, before %.3f", results["nominal"]["mean_return"],
                         results["before"]["mean_return"])  # fmt: skip
                if args.local:
                    with LocalClient(server.address, queue_size=100_000) as client:
                        results["online"] = online(stub, args, client)
                        results["online"]["transitions_dropped_by_loop"] = (
                            client.transitions_dropped
                        )
                else:
                    results["online"] = online(stub, args)
                status = stub.GetFinetuneStatus(pb.FinetuneControlRequest(), timeout=10)
                results["status"] = {
                    k: getattr(status, k)
                    for k in ("updates", "actor_updates", "candidates", "promotions", "refusals",
                              "rollbacks", "transitions_received", "transitions_dropped")
                }  # fmt: skip
                results["status"]["last_refusal"] = status.last_refusal
                results["after"] = evaluate(stub, True, args)
        finally:
            server.stop()
    results["bound"] = {"nominal": reach_bound(False, args), "gap": reach_bound(True, args)}
    nominal, before, after = (results[k]["mean_return"] for k in ("nominal", "before", "after"))
    bound = results["bound"]["gap"]["mean_return"]
    results["recovered_share"] = (after - before) / (nominal - before)
    # Of what any policy could win back on this motor (the bound), not of the nominal return.
    results["recovered_of_achievable"] = (after - before) / (bound - before)
    lat = results["online"]["latency"]
    results["p99_ratio"] = lat["on"]["p99_us"] / lat["off"]["p99_us"]
    # Updates happen only while the learner is on (the blocks between pauses).
    results["updates_per_s"] = results["status"]["updates"] / results["online"]["seconds"]["on"]
    return results


def table(r: dict[str, Any]) -> str:
    s, lat = r["status"], r["online"]["latency"]
    rows = [
        ("nominal sim, served policy", f"{r['nominal']['mean_return']:.3f}"),
        ("gap sim, before fine-tuning", f"{r['before']['mean_return']:.3f}"),
        (
            f"gap sim, after {r['online']['steps']} online steps (version {r['after']['version']})",
            f"{r['after']['mean_return']:.3f}",
        ),
        ("share of the gap recovered", f"{100 * r['recovered_share']:.0f}%"),
        (
            "what the motor allows (nominal / gap sim)",
            f"{r['bound']['nominal']['mean_return']:.3f} / {r['bound']['gap']['mean_return']:.3f}",
        ),
        ("share of the achievable gap recovered", f"{100 * r['recovered_of_achievable']:.0f}%"),
        (
            ("local-lane policy" if r.get("lane") == "local" else "ActStream")
            + " p99 learner paused / on "
            f"({lat['off']['ticks']} / {lat['on']['ticks']} ticks)",
            f"{lat['off']['p99_us']:.0f} / "
            f"{lat['on']['p99_us']:.0f} µs ({r['p99_ratio']:.2f}x, target <= 1.25x)",
        ),  # fmt: skip
        (
            "learner updates per second (while on)",
            f"{r['updates_per_s']:.1f} ({s['updates']} in {r['online']['seconds']['on']:.0f} s)",
        ),
        (
            "updates / candidates / promoted / refused / rolled back",
            f"{s['updates']} / {s['candidates']} / {s['promotions']} / {s['refusals']} / "
            f"{s['rollbacks']}",
        ),  # fmt: skip
    ]
    width = max(len(k) for k, _ in rows)
    bias = [round(float(b), 3) for b in MOTOR_BIAS]
    head = (
        f"PandaReachDense-v3, motor x{MOTOR_SCALE} + bias {bias}, seed {r['seed']}, "
        f"{len(r['before']['returns'])} eval episodes (seeds {r['eval_seeds'][0]}..."
        f"{r['eval_seeds'][1]}), loop at {r['rate_hz']:g} Hz, "
        f"a candidate every {r['candidate_every']} actor updates"
    )
    return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    rets, versions = np.asarray(r["online"]["returns"]), np.asarray(r["online"]["versions"])
    steps = np.arange(1, len(rets) + 1)
    sc = ax.scatter(steps, rets, c=versions, s=8, cmap="viridis", label="online episode")
    k = min(20, len(rets))
    ax.plot(steps[k - 1 :], np.convolve(rets, np.ones(k) / k, "valid"), "k", label=f"mean of {k}")
    for name, style in (("nominal", "g--"), ("before", "r--"), ("after", "b--")):
        ax.axhline(r[name]["mean_return"], color=style[0], ls="--", label=f"{name} (eval)")
    ax.axhline(r["bound"]["gap"]["mean_return"], color="k", ls=":", label="what the motor allows")
    ax.set(xlabel="online episodes", ylabel="episode return", title="Fine-tuning across the gap")
    fig.colorbar(sc, ax=ax, label="policy version")
    ax.legend(fontsize=7, loc="lower right")
    lat = r["online"]["latency"]
    bx.bar(["learner paused", "learner on"], [lat["off"]["p99_us"], lat["on"]["p99_us"]])
    bx.set(ylabel="ActStream p99 (µs)", title="Serving p99")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12_000, help="online steps (control ticks)")
    parser.add_argument(
        "--block", type=int, default=1000, help="ticks per block, learner paused and on in turn"
    )
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--rate", type=float, default=100.0, help="control loop rate, Hz")
    parser.add_argument("--explore-std", type=float, default=0.1)
    parser.add_argument(
        "--candidate-every",
        type=int,
        default=FinetuneConfig.candidate_every,
        help="actor updates between candidates (default: the server's)",
    )
    parser.add_argument("--actor-lr", type=float, default=2e-5)
    parser.add_argument("--window", type=int, default=5, help="rollback window, episodes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--policy", type=Path, default=POLICY_DIR, help="directory with policy.onnx and agent.pt"
    )
    parser.add_argument(
        "--local", action="store_true", help="online phase on the local lane (WatchPolicy)"
    )
    parser.add_argument(
        "--finetune-set", action="append", default=[], metavar="FIELD=VALUE",
        help="a further fine-tuning setting for mu serve (e.g. updates_per_transition=1)",
    )  # fmt: skip
    parser.add_argument(
        "--name", default=None, help="results file name (default: from --policy and --local)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    r = measure(args)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or (
        "finetune_gap"
        if args.policy.resolve() == POLICY_DIR
        else f"finetune_gap_{args.policy.name}"
    ) + ("_local" if args.local else "")
    (args.out / f"{name}.json").write_text(json.dumps(r, indent=2))
    plot(r, args.out / f"{name}.png")
    sys.stdout.write(table(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
