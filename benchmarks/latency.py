"""`mu bench`: serving latency against its floors, on this machine, in one run.

Measures back to back: in-process onnxruntime (the compute floor); a gRPC echo servicer on the
same server settings (the transport floor), unary and stream; `mu serve`, unary and stream; a
naive sync server with a torch model (if torch is installed); a 1 kHz loop's deadline misses; a
concurrency sweep (micro-batching on vs one inference per request); latency while LoadPolicy
swaps every 100 ms; resident memory of the servers. Servers and load generators run in separate
processes; every variant gets the same number of requests, in interleaved rounds so that a
change in machine load hits all variants alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.load import LoadPool, Swapper
from controller.client import PolicyClient
from controller.demo import POLICY, ServerProcess, serve_command
from controller.loop import SyntheticPlant, run_loop, summarize
from controller.policy import load_policy, read_policy_file

ROUNDS = 10  # each latency variant runs in this many interleaved slices


@dataclass
class BenchConfig:
    """What `mu bench` measures and for how long."""

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

    def __post_init__(self) -> None:
        self.policy = Path(self.policy)
        self.out_dir = Path(self.out_dir)
        if not self.policy.is_file():
            raise ValueError(f"no policy at {self.policy}; pass --policy FILE.onnx")
        for name in ("requests", "warmup"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("loop_rate_hz", "loop_seconds", "sweep_seconds", "swap_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not self.clients or min(self.clients) < 1:
            raise ValueError("clients must be positive counts")

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
        )
        return cls(**{**base, **overrides})


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "load_avg_1m_start": os.getloadavg()[0]}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


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
    results: dict[str, Any] = {"machine": machine(), "config": asdict(cfg), "notes": []}
    results["config"].update(policy=str(cfg.policy), out_dir=str(cfg.out_dir))

    log(f"in-process onnxruntime ({probe.env_id}, obs {obs_dim}, act {act_dim}) ...")
    latency = {"in-process onnxruntime": _in_process(cfg.policy, rows, cfg)}

    py = sys.executable
    servers = {
        "echo": ServerProcess(
            [py, "-m", "benchmarks.echo", "--listen", "127.0.0.1:0", "--act-dim", str(act_dim)]
        ),
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
        rss = {"ours": rss_mb(servers["ours"].process.pid)}
        if "naive" in servers:
            rss["naive torch"] = rss_mb(servers["naive"].process.pid)
            servers.pop("naive").stop()  # frees its threads before the timing-sensitive parts
        servers.pop("echo").stop()

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

        servers["ours per-request"] = ServerProcess(
            serve_command(cfg.policy, "127.0.0.1:0") + ["--no-batching"]
        )
        results["sweep"] = _sweep(
            {"micro-batched": addr["ours"], "per-request": servers["ours per-request"].address},
            obs_dim,
            cfg,
            log,
        )
        rss["ours after load"] = rss_mb(servers["ours"].process.pid)
        results["rss_mb"] = rss
    finally:
        for server in servers.values():
            server.stop()
    results["latency_ns"] = {k: v.tolist() for k, v in latency.items()}
    results["seconds"] = time.monotonic() - t_start
    results["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    return results


def _loop(
    target: str, obs_dim: int, cfg: BenchConfig, seconds: float, deadline_s: float | None = None
) -> dict[str, Any]:
    """A loop at cfg.loop_rate_hz on synthetic observations; the client holds its last action
    after `deadline_s` (default: one period, as a real loop would)."""
    with PolicyClient(target, deadline_s=1.0, stream=True) as client:
        plant = SyntheticPlant(obs_dim)
        for _ in range(cfg.warmup):
            client.act(plant.reset())
        client.deadline_s = deadline_s or 1.0 / cfg.loop_rate_hz
        summary = summarize(run_loop(client, plant, cfg.loop_rate_hz, seconds=seconds))
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


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The `mu bench` flags."""
    parser.add_argument("--policy", type=Path, default=POLICY, help="ONNX policy to serve")
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run of every part")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per variant")
    parser.add_argument("--loop-seconds", type=float, default=None, help="1 kHz loop duration")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output dir")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive torch server")


def bench_from_args(args: argparse.Namespace) -> int:
    """`mu bench`: prints the table, writes latency.json and latency.png to --out."""
    overrides: dict[str, Any] = {"policy": args.policy, "out_dir": args.out}
    overrides["naive"] = not args.no_naive
    if args.requests is not None:
        overrides["requests"] = args.requests
    if args.loop_seconds is not None:
        overrides["loop_seconds"] = args.loop_seconds
    cfg = BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__)
    add_bench_arguments(parser)
    try:
        return bench_from_args(parser.parse_args(argv))
    except ValueError as e:
        print(f"mu bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
