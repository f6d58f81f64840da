"""`mu`: train, export, explain, eval, plot, sweep, serve, loop, bench.

Each subcommand imports what it needs when it runs, so a serving install (no torch) can run
`mu serve`, `mu loop` and `mu bench`. Bad input (`controller.errors.UsageError`) is one line on
stderr and exit 2, for every command; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from controller.errors import MissingFile, UsageError
from controller.extras import install_hint

# `mu train` flags a resumed run would ignore (it keeps its config.json): refused with --resume
NOT_ON_RESUME = ("env", "seed", "algo", "device", "preset", "preset_file", "set", "out",
                 "overwrite", "export")  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from training.config import TrainConfig
    from training.fields import describe_fields
    from training.trainer import Interrupted, train

    if args.list_fields:
        print(describe_fields(TrainConfig))
        return 0
    if args.resume:
        given = [
            f"--{name.replace('_', '-')}"
            for name in NOT_ON_RESUME
            if getattr(args, name) not in (None, [], False)
        ]
        if given:
            raise UsageError(
                f"--resume continues a run with its own config.json: {', '.join(given)} would "
                "be ignored; only --steps (to train on further) goes with --resume"
            )
        out = args.resume
        saved = json.loads(_run_file(out, "config.json").read_text())
        cfg = TrainConfig.from_dict({**saved, **({"steps": args.steps} if args.steps else {})})
    else:
        from training.resolve import FLAGS, resolve, run_dir

        flags = {name: getattr(args, name) for name in FLAGS}
        cfg = resolve(flags, args.set, args.preset, args.preset_file)
        out = args.out or run_dir(cfg)
    preset = args.preset or (args.preset_file and f"file {args.preset_file}") or "the env's"
    print(
        f"mu train: {cfg.env_id}, {cfg.algo}, seed {cfg.seed}, {cfg.steps} steps, preset "
        f"{preset}{' (resumed)' if args.resume else ''}, into {out}"
    )
    if cfg.steps <= cfg.learning_starts:
        print(
            f"mu train: warning: {cfg.steps} steps <= learning_starts {cfg.learning_starts}: "
            "the actor acts at random throughout and is never trained",
            file=sys.stderr,
        )
    try:
        path = train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite)
    except Interrupted as stop:
        print(f"\nmu train: {stop}; continue with: mu train --resume {out}", file=sys.stderr)
        return 130
    print(f"policy: {path}")
    return 0


def _run_file(run: str, name: str) -> Path:
    """`run`/`name`, or a one-line error that says what `run` should be."""
    path = Path(run) / name
    if not path.is_file():
        raise MissingFile(f"{run} is not a run directory of mu train (no {name})")
    return path


def _export(args: argparse.Namespace) -> int:
    if args.from_sb3:
        from training.sb3_import import SB3ImportConfig, import_sb3

        if not args.env:
            raise SystemExit("mu export --from-sb3: --env is required")
        cfg = SB3ImportConfig(model=args.from_sb3, env_id=args.env, vecnormalize=args.vecnormalize)
        print(f"policy: {import_sb3(cfg, args.out)}")
        return 0
    if not args.source:
        raise SystemExit("mu export: give a run directory or checkpoint (or --from-sb3 MODEL.zip)")
    from training.export import export_checkpoint

    print(f"policy: {export_checkpoint(args.source, args.out)}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from training.explain import explain

    print(explain(args.source, states=args.states))
    if args.plot:
        from training.explain_plot import plot_action_slice

        path, text = plot_action_slice(args.source, args.plot, args.state, args.dims)
        print(f"{text}\nplot: {path}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from controller.config import parse_shifts
    from training.evaluate import evaluate_onnx, report

    if args.sweep:
        if args.shift:
            raise SystemExit("mu eval: --sweep covers every knob; drop --shift")
        from training.robustness import run_sweep

        _, text = run_sweep(args.policy, args.out, args.episodes, args.seed)
        print(text)
        print(f"sweep: {args.out}/sweep.json, {args.out}/sweep.png")
        return 0
    shifts = parse_shifts(args.shift)
    for policy in args.policy:
        print(report(evaluate_onnx(policy, args.episodes, args.seed, shifts=shifts)))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from training.plots import plot_runs

    print(f"curves: {plot_runs(args.runs, args.out)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from training.runner import RunnerConfig
    from training.sweep import SweepConfig, run_sweep

    sweep = SweepConfig.load(args.sweep)
    if args.name:
        sweep = dataclasses.replace(sweep, name=args.name)
    runner = RunnerConfig(
        name=sweep.name, storage=args.storage, address=args.address, workers=args.workers
    )
    try:
        result = run_sweep(sweep, runner)
    except ConnectionError as err:  # --address that does not answer, or refuses us
        print(f"mu sweep: {err}", file=sys.stderr)
        return 2
    print(result.table)
    stopped = any(o["status"] == "stopped" for row in result.rows for o in row["trials"])
    if stopped and not sweep.asha:  # not early stopping: interrupted
        print(f"trials stopped: run the same command again to resume them in {args.storage}")
    print(f"results: {result.out}/results.txt, results.json")
    if result.curves:
        print(f"curves: {result.curves}")
    if result.best_preset:
        print(f"best: {result.best_preset} (mu train --preset-file {result.best_preset})")
    return 1 if result.failed else 0


def _serve(args: argparse.Namespace) -> int:
    from controller.server import serve_from_args

    return serve_from_args(args)


def _loop(args: argparse.Namespace) -> int:
    from controller.robot.loop import loop_from_args

    return loop_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    from controller.bench import bench_from_args

    return bench_from_args(args)


def _arguments(
    p: argparse.ArgumentParser,
    module: str,
    adder: str,
    func: Callable[[argparse.Namespace], int],
) -> None:
    """`module.adder(p)`: a command's arguments from the module that runs it; where this
    install lacks that module's extra, the command says which extra to install instead."""
    try:
        getattr(importlib.import_module(module), adder)(p)
    except ModuleNotFoundError as err:
        hint = install_hint(p.prog.split()[-1], err)
        if hint is None:
            raise
        p.description = hint
        p.set_defaults(func=lambda _: _missing(hint), missing_extra=True)
        return
    p.set_defaults(func=func)


def _missing(hint: str) -> int:
    print(hint, file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train TD3/DDPG/TD7 in a Gymnasium env, export policy.onnx")
    p.description = (
        "Settings resolve in one order: the env's preset, --preset, the algorithm's, "
        "--preset-file, --set, then the flags (each a shortcut for --set of its field; a flag "
        "and a --set that disagree are refused). --list-fields shows every field."
    )
    p.add_argument("--env", help="Gymnasium id, e.g. InvertedPendulumBulletEnv-v0 (env_id)")
    p.add_argument("--steps", type=int, help="environment steps (default: the config's)")
    p.add_argument("--seed", type=int, help="seed (default 0)")
    p.add_argument(
        "--algo", choices=["td3", "ddpg", "td7"], help="default: the preset file's, else td3"
    )
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument(
        "--preset",
        help="named preset (zoo, default, robust, adaptive); default: the env's own",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a TrainConfig field (typed: numbers, true/false, lists like [64,64])",
    )
    p.add_argument(
        "--list-fields", action="store_true", help="list every field with its type, default, doc"
    )
    p.add_argument(
        "--preset-file",
        metavar="FILE",
        help="TrainConfig fields from a JSON file (mu sweep's best_preset.json); "
        "after --preset, before --set",
    )
    p.add_argument("--out", help="run directory (default runs/ENV-ALGO-sSEED)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue the run in RUN from its checkpoint (with --steps to train on further)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument(
        "--export",
        choices=["best", "last"],
        help="actor in policy.onnx: the best evaluated (default) or the last; "
        "policy.last.onnx always holds the last",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="learning curves of runs, mean ± std over seeds")
    p.add_argument("runs", nargs="+", help="run directories of mu train")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.set_defaults(func=_plot)

    p = sub.add_parser("export", help="export a run's actor to the ONNX policy file")
    p.add_argument("source", nargs="?", help="run directory or checkpoint file")
    p.add_argument("--out", required=True, help="policy.onnx to write")
    p.add_argument(
        "--from-sb3",
        metavar="MODEL.zip",
        help="import a Stable-Baselines3 TD3/DDPG/SAC model instead (a pickle: trusted files only)",
    )
    p.add_argument(
        "--vecnormalize", metavar="STATS.pkl", help="with --from-sb3: VecNormalize statistics"
    )
    p.add_argument("--env", help="with --from-sb3: the Gymnasium id the model was trained on")
    p.set_defaults(func=_export)

    p = sub.add_parser("explain", help="show ∂Q/∂u = ∂Q/∂a · ∂μ/∂u on real states of a policy")
    p.add_argument("source", help="run directory or checkpoint file")
    p.add_argument("--states", type=int, default=3)
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw Q(s, ·) over a 2-D action slice with μ(s), ∂Q/∂a and one actor step",
    )
    p.add_argument("--state", type=int, default=0, help="with --plot: which recent state")
    p.add_argument(
        "--dims",
        type=int,
        nargs=2,
        metavar="I",
        help="with --plot: the two action dimensions (default: the largest |∂Q/∂a|)",
    )
    p.set_defaults(func=_explain)

    p = sub.add_parser("eval", help="deterministic return of a policy file in onnxruntime")
    p.add_argument("policy", nargs="+", help="policy.onnx (two to compare them)")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="hold a knob at a shifted value: friction, mass, strength (multipliers), damping, "
        "latency (steps), offset, obs_noise, push (docs/sim_to_real.md)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="sweep every knob, plus friction × mass and strength × offset grids: table, "
        "sweep.json, sweep.png",
    )
    p.add_argument("--out", default="sweep", help="with --sweep: output directory")
    p.set_defaults(func=_eval)

    p = sub.add_parser("sweep", help="seeds and hyperparameter sweeps on Ray Tune")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (training/sweep.py)")
    p.add_argument("--name", help="experiment name (default: the file's name: or its stem)")
    p.add_argument(
        "--storage",
        default="runs/sweeps",
        help="results: a path (shared by every node on a cluster) or a URI; rerunning a sweep "
        "into the same place resumes it",
    )
    p.add_argument("--address", help="join this Ray cluster (default: local Ray)")
    p.add_argument("--workers", type=int, help="trials at once (default: one per CPU)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("serve", help="serve a policy file over gRPC")
    _arguments(p, "controller.server", "add_serve_arguments", _serve)

    p = sub.add_parser("loop", help="drive a simulated robot from a server at a fixed rate")
    _arguments(p, "controller.robot.loop", "add_loop_arguments", _loop)

    p = sub.add_parser(
        "bench", help="at the robot's rate: which lane holds on this machine, against its floor"
    )
    _arguments(p, "controller.bench", "add_bench_arguments", _bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # a command whose extra is missing has no arguments to check: it names the extra instead
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "missing_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(  # a command with --log-level (mu serve) sets it; INFO otherwise
        level=getattr(args, "log_level", logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as err:  # bad input, said in one line; any other exception is a bug
        print(f"mu {args.command}: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:
        hint = install_hint(args.command, err)
        if hint is None:
            raise
        return _missing(hint)


if __name__ == "__main__":
    sys.exit(main())
