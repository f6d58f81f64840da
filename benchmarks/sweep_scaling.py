"""`mu sweep` with N workers against the same runs one after another (`mu train` each).

    python -m benchmarks.sweep_scaling [--sweep docs/examples/sweep.yaml] [--workers 2]

Both sides run as fresh `mu` processes from this checkout, the sweep's configurations × seeds
exactly (`mu train --preset-file` with each configuration, `--seed` each seed). The target
(docs/targets.md, Scale): 2 workers finish 4 runs in ≤ 0.6× the sequential wall-clock. The machine's
load average is recorded before and after: a figure taken beside other work means little.
Prints a table, writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.sweep import SweepConfig

MU = [sys.executable, "-m", "controller.cli"]


def sequential(sweep: SweepConfig, work: Path) -> float:
    """Wall-clock of every trial of `sweep` as `mu train`, one after another."""
    t0 = time.perf_counter()
    for i, point in enumerate(sweep.configurations()):
        preset = work / f"c{i}.json"
        preset.write_text(json.dumps(sweep.overrides(point)))
        for seed in sweep.seeds:
            out = work / "sequential" / f"c{i}-s{seed}"
            cmd = [*MU, "train", "--preset-file", str(preset), "--seed", str(seed)]
            subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True)
            print(f"  sequential c{i}-s{seed}: {time.perf_counter() - t0:.1f}s", flush=True)
    return time.perf_counter() - t0


def swept(path: Path, workers: int, work: Path) -> float:
    t0 = time.perf_counter()
    cmd = [*MU, "sweep", str(path), "--workers", str(workers)]
    subprocess.run([*cmd, "--storage", str(work / "sweeps")], check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sweep", default="docs/examples/sweep.yaml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    sweep = SweepConfig.load(args.sweep)
    runs = len(sweep.configurations()) * len(sweep.seeds)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sweep-scaling-") as tmp:
        work = Path(tmp)
        print(f"mu sweep, {args.workers} workers, {runs} runs ...", flush=True)
        t_sweep = swept(Path(args.sweep), args.workers, work)
        print(f"  {t_sweep:.1f}s\nthe same runs one after another ...", flush=True)
        t_seq = sequential(sweep, work)
    load_after = os.getloadavg()
    ratio = t_sweep / t_seq
    table = "\n".join(
        [
            f"{sweep.env}, {runs} runs of {sweep.steps} steps, CPUs: {os.cpu_count()}",
            f"{'sequential (mu train each)':<30} {t_seq:8.1f} s",
            f"{f'mu sweep, {args.workers} workers':<30} {t_sweep:8.1f} s",
            f"{'ratio (target <= 0.6)':<30} {ratio:8.2f}",
            f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)",
        ]
    )
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_scaling.json").write_text(
        json.dumps(
            {
                "sweep": args.sweep,
                "workers": args.workers,
                "runs": runs,
                "sequential_s": t_seq,
                "sweep_s": t_sweep,
                "ratio": ratio,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
                "cpus": os.cpu_count(),
            },
            indent=1,
        )
    )
    (out / "sweep_scaling.txt").write_text(table + "\n")
    print(f"wrote {out}/sweep_scaling.{{json,txt}}")


if __name__ == "__main__":
    main()
