"""The serving benchmark (`make bench`): serving latency against its floors and the serving
targets of docs/targets.md, on this machine, in one run. `mu bench --rate HZ` answers the
narrower question of one robot (controller/bench.py); this is the full table.

Measures back to back: in-process onnxruntime (the compute floor); the bare gRPC echo (bytes
in, pre-serialized bytes out: the transport floor) and an echo servicer (the same plus proto
decoding and encoding) on the same server settings; `mu serve`, unary and stream; a naive sync
server with a torch model (if torch is installed); a 1 kHz loop's deadline misses; latency while
LoadPolicy swaps every 100 ms; the local lane (benchmarks/local_lane.py: 1 kHz and 5 kHz loops,
hot swaps under the loop, the server SIGKILLed under the loop); a concurrency sweep
(micro-batching on vs one inference per request); resident memory of the servers. Servers and
load generators run in separate processes; every variant gets the same number of requests, in
interleaved rounds so that a change in machine load hits all variants alike.
`--soak SECONDS` runs only the soak (both lanes, memory and misses per minute).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import local_lane, report
from benchmarks.load import LoadPool, Swapper
from controller import bench
from controller.errors import UsageError
from controller.harness import POLICY, ServerProcess, serve_command
from controller.policy import load_policy, read_policy_file
from controller.robot.client import PolicyClient
from controller.robot.report import summarize

ROUNDS = 10  # each latency variant runs in this many interleaved slices


@dataclass
class BenchConfig:
    """What the serving benchmark measures and for how long."""

    #: The ONNX policy served by every variant.
    policy: Path = POLICY
    #: Timed requests per latency variant (after `warmup` untimed ones).
    requests: int = 5000
    warmup: int = 500
    #: The control loop: rate and duration (synthetic observations, no simulator).
    loop_rate_hz: float = 1000.0
    loop_seconds: float = 30.0
    #: Concurrency sweep: client counts, and seconds measured per count (after warmup_s).
    clients: tuple[int, ...] = (1, 2, 4, 8, 16)
    sweep_seconds: float = 3.0
    sweep_warmup_s: float = 1.0
    #: Hot swap: LoadPolicy every swap_interval_s during a swap_seconds loop at loop_rate_hz.
    swap_interval_s: float = 0.1
    swap_seconds: float = 6.0
    #: Where the JSON and PNG go.
    out_dir: Path = Path("benchmarks/results")
    #: Include the naive torch server (skipped with a note when torch is missing).
    naive: bool = True
    #: The local lane: the 1 kHz loop's duration, the fast loop's rate and duration, and the
    #: SIGKILL run's duration (the server is killed after a third of it).
    local_seconds: float = 60.0
    fast_rate_hz: float = 5000.0
    fast_seconds: float = 10.0
    kill_seconds: float = 8.0
    #: Real-time settings for the timed loops (both lanes): CPU to pin the loop's thread to,
    #: SCHED_FIFO priority (None = leave as is).
    cpu: int | None = None
    rt_priority: int | None = None

    def __post_init__(self) -> None:
        self.policy = Path(self.policy)
        self.out_dir = Path(self.out_dir)
        if not self.policy.is_file():
            raise UsageError(f"no policy at {self.policy}; pass --policy FILE.onnx")
        for name in ("requests", "warmup"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1")
        for name in ("loop_rate_hz", "loop_seconds", "sweep_seconds", "swap_interval_s"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be positive")
        if not self.clients or min(self.clients) < 1:
            raise UsageError("clients must be positive counts")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A ~30 s smoke run of every part."""
        base = dict(
            requests=600,
            warmup=100,
            loop_seconds=2.0,
            sweep_seconds=0.5,
            sweep_warmup_s=0.5,
            swap_seconds=1.0,
            local_seconds=2.0,
            fast_seconds=1.0,
            kill_seconds=4.0,
        )
        return cls(**{**base, **overrides})


def stats_us(ns: np.ndarray) -> dict[str, float]:
    us = np.asarray(ns, np.float64) / 1e3
    out = {f"p{p:g}": float(np.percentile(us, p)) for p in (50, 90, 99, 99.9)}
    out.update(mean=float(us.mean()), max=float(us.max()), n=int(len(us)))
    return out


def _in_process(policy_path: Path, rows: list[list[float]], cfg: BenchConfig) -> np.ndarray:
    policy = load_policy(read_policy_file(policy_path), source=str(policy_path), version=1)
    clock = time.perf_counter_ns
    for i in range(cfg.warmup):
        policy.act(rows[i % len(rows)])
    out = np.empty(cfg.requests, np.int64)
    for i in range(cfg.requests):
        t0 = clock()
        policy.act(rows[i % len(rows)])
        out[i] = clock() - t0
    return out


def _interleaved(
    clients: dict[str, PolicyClient], rows: list[list[float]], cfg: BenchConfig
) -> dict[str, np.ndarray]:
    """Same requests for every client, in ROUNDS interleaved slices; fallbacks are errors."""
    for client in clients.values():
        for i in range(cfg.warmup):
            client.act(rows[i % len(rows)])
    per_round = max(cfg.requests // ROUNDS, 1)
    out: dict[str, list[int]] = {name: [] for name in clients}
    clock = time.perf_counter_ns
    for _ in range(ROUNDS):
        for name, client in clients.items():
            times = out[name]
            for i in range(per_round):
                t0 = clock()
                client.act(rows[i % len(rows)])
                times.append(clock() - t0)
    for name, client in clients.items():
        if client.misses:
            raise RuntimeError(f"{name}: {client.misses} requests failed ({client.last_error})")
    return {name: np.asarray(v, np.int64) for name, v in out.items()}


def run_bench(cfg: BenchConfig, log: Any = print) -> dict[str, Any]:
    """Run everything; returns the results (also what goes to JSON)."""
    t_start = time.monotonic()
    probe = load_policy(read_policy_file(cfg.policy), source=str(cfg.policy), version=1)
    obs_dim, act_dim = probe.obs_dim, probe.act_dim
    rows = np.random.default_rng(0).normal(0, 1, (64, obs_dim)).astype(np.float32).tolist()
    results: dict[str, Any] = {"machine": bench.machine(), "config": asdict(cfg), "notes": []}
    results["config"].update(policy=str(cfg.policy), out_dir=str(cfg.out_dir))

    log(f"in-process onnxruntime ({probe.env_id}, obs {obs_dim}, act {act_dim}) ...")
    latency = {"in-process onnxruntime": _in_process(cfg.policy, rows, cfg)}

    py = sys.executable
    echo = [py, "-m", "controller.echo", "--listen", "127.0.0.1:0", "--act-dim", str(act_dim)]
    servers = {
        "bare": ServerProcess([*echo, "--bare"]),
        "echo": ServerProcess(echo),
        "ours": ServerProcess(serve_command(cfg.policy, "127.0.0.1:0")),
    }
    has_torch = importlib.util.find_spec("torch") is not None
    if cfg.naive and has_torch:
        servers["naive"] = ServerProcess(
            [
                py,
                "-m",
                "benchmarks.naive",
                "--listen",
                "127.0.0.1:0",
                "--obs-dim",
                str(obs_dim),
                "--act-dim",
                str(act_dim),
            ]  # fmt: skip
        )
    elif cfg.naive:
        results["notes"].append("naive torch baseline skipped: torch is not installed")
    try:
        addr = {name: s.address for name, s in servers.items()}
        clients = {
            "echo unary": PolicyClient(addr["echo"], deadline_s=1.0, stream=False),
            "ours unary": PolicyClient(addr["ours"], deadline_s=1.0, stream=False),
            "bare echo stream": PolicyClient(addr["bare"], deadline_s=1.0, stream=True),
            "echo stream": PolicyClient(addr["echo"], deadline_s=1.0, stream=True),
            "ours stream": PolicyClient(addr["ours"], deadline_s=1.0, stream=True),
        }
        if "naive" in servers:
            clients["naive torch unary"] = PolicyClient(addr["naive"], deadline_s=1.0, stream=False)
        log(f"round trips: {', '.join(clients)}, {cfg.requests} requests each ...")
        latency.update(_interleaved(clients, rows, cfg))
        for client in clients.values():
            client.close()
        results["latency_us"] = {name: stats_us(ns) for name, ns in latency.items()}
        rss = {"ours": local_lane.rss_mb(servers["ours"].process.pid)}
        if "naive" in servers:
            rss["naive torch"] = local_lane.rss_mb(servers["naive"].process.pid)
            servers.pop("naive").stop()  # frees its threads before the timing-sensitive parts
        servers.pop("echo").stop()
        servers.pop("bare").stop()

        log(f"{cfg.loop_rate_hz:g} Hz loop for {cfg.loop_seconds:g} s ...")
        results["loop"] = _loop(addr["ours"], obs_dim, cfg, cfg.loop_seconds)

        log(f"hot swap every {cfg.swap_interval_s * 1e3:g} ms for {cfg.swap_seconds:g} s ...")
        swapper = Swapper(addr["ours"], cfg.policy, cfg.swap_interval_s, cfg.swap_seconds)
        # A failed request is an error or no answer within 100 ms; a reply later than the
        # period is a deadline miss, reported apart.
        swap_loop = _loop(addr["ours"], obs_dim, cfg, cfg.swap_seconds + 0.5, deadline_s=0.1)
        swaps, failed_swaps = swapper.result(timeout=cfg.swap_seconds + 30)
        results["swap"] = {
            "swaps": swaps,
            "failed_swaps": failed_swaps,
            "failed_requests": swap_loop["misses"]["fallbacks"],
            "loop": swap_loop,
        }
        results["local"] = _local(cfg, addr["ours"], obs_dim, act_dim, log)

        servers["ours per-request"] = ServerProcess(
            serve_command(cfg.policy, "127.0.0.1:0") + ["--no-batching"]
        )
        results["sweep"] = _sweep(
            {"micro-batched": addr["ours"], "per-request": servers["ours per-request"].address},
            obs_dim,
            cfg,
            log,
        )
        rss["ours after load"] = local_lane.rss_mb(servers["ours"].process.pid)
        results["rss_mb"] = rss
    finally:
        for server in servers.values():
            server.stop()
    results["latency_ns"] = {k: v.tolist() for k, v in latency.items()}
    results["seconds"] = time.monotonic() - t_start
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return results


def _rt(cfg: BenchConfig) -> dict[str, Any]:
    return {"cpu": cfg.cpu, "rt_priority": cfg.rt_priority}


def _local(cfg: BenchConfig, target: str, obs_dim: int, act_dim: int, log: Any) -> dict[str, Any]:
    """The local lane's measurements (benchmarks/local_lane.py)."""
    rt, rate = _rt(cfg), cfg.loop_rate_hz
    out: dict[str, Any] = {}
    for key, hz, seconds in (("loop", rate, cfg.local_seconds),
                             ("fast", cfg.fast_rate_hz, cfg.fast_seconds)):  # fmt: skip
        # The floor first, the same loop with no policy: the misses this machine causes alone.
        log(f"local lane: {hz:g} Hz loop for {seconds:g} s, with no policy, then with it ...")
        out[f"{key}_floor"] = local_lane.summary(bench.floor(obs_dim, act_dim, hz, seconds, rt))
        out[key] = local_lane.summary(bench.local_lane(target, obs_dim, hz, seconds, rt))
    with tempfile.TemporaryDirectory(prefix="mu-bench-") as tmp:
        other = local_lane.variant_policy(cfg.policy, Path(tmp) / "variant.onnx")
        log(f"local lane: hot swap every {cfg.swap_interval_s * 1e3:g} ms under the loop ...")
        out["swap"] = local_lane.hot_swap(
            target, obs_dim, [other, cfg.policy], rate, cfg.swap_interval_s, cfg.swap_seconds, rt
        )
        log("local lane: SIGKILL of the server under the loop, restart ...")
        out["kill"] = local_lane.kill_restart(
            cfg.policy, other, obs_dim, rate, cfg.kill_seconds, cfg.kill_seconds / 3, rt
        )
    return out


def _loop(
    target: str, obs_dim: int, cfg: BenchConfig, seconds: float, deadline_s: float | None = None
) -> dict[str, Any]:
    """A loop at cfg.loop_rate_hz on synthetic observations; the client holds its last action
    after `deadline_s` (default: one period, as a real loop would)."""
    result = bench.grpc_lane(
        target, obs_dim, cfg.loop_rate_hz, seconds, _rt(cfg), warmup=cfg.warmup,
        deadline_s=deadline_s,
    )  # fmt: skip
    summary = summarize(result)
    summary.pop("returns")
    return summary


def _sweep(
    targets: dict[str, str], obs_dim: int, cfg: BenchConfig, log: Any
) -> dict[str, list[dict[str, Any]]]:
    pool = LoadPool(max(cfg.clients))
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    try:
        for n in cfg.clients:
            log(f"concurrency {n}: {', '.join(targets)} ...")
            order = list(targets.items())
            if n % 2:  # alternate which variant goes first, so warm-up effects even out
                order.reverse()
            for name, target in order:
                ns, fallbacks, seconds = pool.run(
                    target, obs_dim, n, cfg.sweep_seconds, cfg.sweep_warmup_s
                )
                out[name].append(
                    {
                        "clients": n,
                        "throughput_rps": len(ns) / seconds,
                        "fallbacks": fallbacks,
                        **stats_us(ns),
                    }
                )
    finally:
        pool.close()
    return out


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m benchmarks.latency`."""
    parser.add_argument("--policy", type=Path, default=POLICY, help="ONNX policy to serve")
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run of every part")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per variant")
    parser.add_argument("--loop-seconds", type=float, default=None, help="1 kHz loop duration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive torch server")
    parser.add_argument("--cpu", type=int, default=None, help="pin the timed loops to CPU N")
    parser.add_argument(
        "--rt-priority", type=int, default=None, help="SCHED_FIFO priority for the timed loops"
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=None,
        metavar="SECONDS",
        help="run only the soak: both lanes for SECONDS (memory at start and end, misses/minute)",
    )


def latency_from_args(args: argparse.Namespace) -> int:
    """`make bench`: prints the table, writes latency.json and latency.png to --out."""
    overrides: dict[str, Any] = {"policy": args.policy, "out_dir": args.out}
    overrides["naive"] = not args.no_naive
    if args.requests is not None:
        overrides["requests"] = args.requests
    if args.loop_seconds is not None:
        overrides["loop_seconds"] = args.loop_seconds
    overrides.update(cpu=args.cpu, rt_priority=args.rt_priority)
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
    if args.soak is not None:
        return _soak_from_args(cfg, args.soak)
    results = run_bench(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    table = report.table(results)
    print(table)
    results["table"] = table
    png = cfg.out_dir / "latency.png"
    try:
        report.plot(results, png)
        print(f"wrote {png}")
    except ImportError:
        print("no plot: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    results.pop("latency_ns")  # raw samples: for the plot only, too big for the JSON
    json_path = cfg.out_dir / "latency.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {json_path}")
    return 0


def _soak_from_args(cfg: BenchConfig, seconds: float) -> int:
    if seconds <= 0:
        raise UsageError("--soak needs a positive number of seconds")
    probe = load_policy(read_policy_file(cfg.policy), source=str(cfg.policy), version=1)
    load_start = os.getloadavg()[0]
    result = local_lane.soak(
        cfg.policy, probe.obs_dim, seconds, _rt(cfg), segment_s=min(60.0, seconds),
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )  # fmt: skip
    result["machine"] = {**bench.machine(), "load_avg_1m_start": load_start,
                         "load_avg_1m_end": os.getloadavg()[0]}  # fmt: skip
    text = report.soak_table(result)
    print(text)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    path = cfg.out_dir / "soak.json"
    path.write_text(json.dumps({**result, "table": text}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__)
    add_latency_arguments(parser)
    try:
        return latency_from_args(parser.parse_args(argv))
    except UsageError as e:
        print(f"benchmarks.latency: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
