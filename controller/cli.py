"""`mu`: train, export, explain, eval, serve, loop, bench.

Each subcommand imports what it needs when it runs, so a serving install (no torch) can run
`mu serve` and `mu loop`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _train(args: argparse.Namespace) -> int:
    from controller.config import parse_overrides
    from training.config import TrainConfig
    from training.presets import preset
    from training.trainer import train

    if args.resume:
        from pathlib import Path

        saved = json.loads((Path(args.resume) / "config.json").read_text())
        if args.steps:
            saved["steps"] = args.steps
        cfg = TrainConfig.from_dict(saved)
        path = train(cfg, args.resume, resume=True)
    else:
        if not args.env:
            raise SystemExit("mu train: --env is required (or --resume RUN)")
        overrides = {
            **preset(args.env, args.preset),
            **parse_overrides(TrainConfig, args.set, "--set"),
        }
        cfg = TrainConfig.from_dict(
            {
                **overrides,
                "env_id": args.env,
                "algo": args.algo,
                "seed": args.seed,
                "device": args.device,
                "export": args.export,
                **({"steps": args.steps} if args.steps else {}),
            }
        )
        out = args.out or f"runs/{args.env}-{args.algo}-s{args.seed}"
        path = train(cfg, out)
    print(f"policy: {path}")
    return 0


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


def _serve(args: argparse.Namespace) -> int:
    from controller.server import serve_from_args

    return serve_from_args(args)


def _loop(args: argparse.Namespace) -> int:
    from controller.loop import loop_from_args

    return loop_from_args(args)


def _bench(args: argparse.Namespace) -> int:
    from benchmarks.latency import bench_from_args

    return bench_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train TD3/DDPG in a Gymnasium env and export policy.onnx")
    p.add_argument("--env", help="Gymnasium id, e.g. InvertedPendulumBulletEnv-v0")
    p.add_argument("--steps", type=int, help="environment steps (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--algo", choices=["td3", "ddpg"], default="td3")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--preset", help="named preset (zoo, default); default: the env's own")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainConfig field",
    )
    p.add_argument("--out", help="run directory (default runs/ENV-ALGO-sSEED)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in RUN from its checkpoint")
    p.add_argument(
        "--export",
        choices=["best", "last"],
        default="best",
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
        help="sweep every knob and a friction × mass grid: table, sweep.json, sweep.png",
    )
    p.add_argument("--out", default="sweep", help="with --sweep: output directory")
    p.set_defaults(func=_eval)

    p = sub.add_parser("serve", help="serve a policy file over gRPC")
    from controller.server import add_serve_arguments

    add_serve_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("loop", help="drive a simulated robot from a server at a fixed rate")
    from controller.loop import add_loop_arguments

    add_loop_arguments(p)
    p.set_defaults(func=_loop)

    p = sub.add_parser("bench", help="serving latency against its floors (table, JSON, PNG)")
    from benchmarks.latency import add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"mu {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
