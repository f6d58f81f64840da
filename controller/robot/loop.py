"""`mu loop`: a simulated robot gets its actions from the control service at a fixed rate and
reports timing.

Connects (gRPC lane: ActStream round trips; `--local`: the local lane, the policy the service
ships evaluated in this process), checks the served policy against the env, warms up, then runs
the loop engine (engine.py) on the PyBullet plant (plants.py) and prints the report (report.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import grpc

from controller.contract import history_spec
from controller.errors import UsageError
from controller.robot.client import Client, PolicyClient
from controller.robot.engine import LoopResult, run_loop
from controller.robot.local import LocalClient
from controller.robot.plants import SimPlant
from controller.robot.report import format_summary, summarize, write_plot

# Local lane: untimed calls before the loop (the policy's first calls fill the caches).
WARM_TICKS = 200


def check_policy(client: Client, env_id: str, obs_dim: int) -> None:
    """The served policy must be for this env (GetPolicy, or the shipped policy on the local
    lane); UsageError otherwise."""
    info = client.policy.policy if client.local else client.get_policy()
    # a policy with history takes one observation per tick (the lane builds the rest)
    history = info.history if client.local else history_spec(dict(info.metadata))
    expected = history["obs_dim"] if history else info.obs_dim
    if info.env_id != env_id:
        raise UsageError(
            f"the server at {client.target} serves a policy for {info.env_id!r}, "
            f"not {env_id!r}; serve a policy trained on {env_id} or pass --env {info.env_id}"
        )
    if expected != obs_dim:
        raise UsageError(
            f"{env_id} gives {obs_dim} observation values; the served policy expects {expected}"
        )


def add_loop_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mu loop` flags."""
    parser.add_argument("--env", required=True, help="Gymnasium id the policy was trained on")
    parser.add_argument("--target", required=True, help="server address, HOST:PORT or unix:PATH")
    parser.add_argument("--rate", type=float, required=True, help="control rate in Hz")
    parser.add_argument("--episodes", type=int, default=None, help="stop after N episodes")
    parser.add_argument("--seconds", type=float, default=None, help="stop after S seconds")
    parser.add_argument("--ticks", type=int, default=None, help="stop after N ticks")
    parser.add_argument(
        "--deadline-ms",
        type=float,
        default=None,
        help="per-step client deadline; after it the last action is held (default: the period)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="local lane: the server ships the policy (WatchPolicy), this process evaluates it",
    )
    parser.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="admin token for WatchPolicy/ReportTransitions (--local; when the server has one)",
    )
    parser.add_argument("--cpu", type=int, default=None, help="pin the loop's thread to CPU N")
    parser.add_argument(
        "--rt-priority",
        type=int,
        default=None,
        help="run the loop's thread SCHED_FIFO at this priority (1-99) where permitted",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    parser.add_argument("--plot", type=Path, default=None, help="PNG of latency (matplotlib)")


def run_sim_loop(
    env_id: str,
    target: str,
    rate_hz: float,
    *,
    episodes: int | None = None,
    seconds: float | None = None,
    ticks: int | None = None,
    deadline_s: float | None = None,
    seed: int = 0,
    local: bool = False,
    token: str | None = None,
    cpu: int | None = None,
    rt_priority: int | None = None,
) -> LoopResult:
    """Connect, check the policy against the env, warm the stream up, run the loop."""
    if episodes is None and seconds is None and ticks is None:
        episodes = 5
    plant = SimPlant(env_id, seed)
    try:
        deadline = deadline_s if deadline_s is not None else 1.0 / rate_hz
        # gRPC lane: the first call opens the stream, not a control tick: a long deadline.
        client: Client = (
            LocalClient(target, token=token, seed=seed)
            if local
            else PolicyClient(target, deadline_s=5.0, stream=True, token=token)
        )
        with client:
            check_policy(client, env_id, plant.obs_dim)
            warm = plant.reset()
            for _ in range(WARM_TICKS if local else 1):
                client.act(warm)
            if not local:
                client.deadline_s = deadline
            return run_loop(
                client, plant, rate_hz, episodes=episodes, seconds=seconds, ticks=ticks,
                cpu=cpu, rt_priority=rt_priority,
            )  # fmt: skip
    finally:
        plant.close()


def loop_from_args(args: argparse.Namespace) -> int:
    """`mu loop`: prints the summary; returns the exit code. Raises UsageError for a policy
    that does not fit the env (or bad flags)."""
    for flag in ("rate", "episodes", "seconds", "ticks", "deadline_ms"):
        value = getattr(args, flag)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {value:g}")
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as e:
            raise UsageError(f"cannot read --token-file {args.token_file}: {e.strerror}") from e
    try:
        result = run_sim_loop(
            args.env,
            args.target,
            args.rate,
            episodes=args.episodes,
            seconds=args.seconds,
            ticks=args.ticks,
            deadline_s=None if args.deadline_ms is None else args.deadline_ms / 1e3,
            seed=args.seed,
            local=args.local,
            token=token,
            cpu=args.cpu,
            rt_priority=args.rt_priority,
        )
    except (TimeoutError, PermissionError) as e:  # --local: no policy arrived, or refused
        print(f"mu loop: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:  # GetPolicy before the loop: the server is not there
        print(f"mu loop: no answer from {args.target}: {e.code().name}", file=sys.stderr)
        return 1
    summary = summarize(result)
    print(format_summary(summary))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        try:
            write_plot(result, args.plot)
        except ImportError:
            print(
                "--plot needs matplotlib, which is not installed: pip install matplotlib",
                file=sys.stderr,
            )
            return 1
        print(f"wrote {args.plot}")
    return 0
