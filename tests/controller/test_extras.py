"""Each extra alone runs its own commands: the CLI in a process where the other extras' modules
cannot be imported (as on a [train]-only or [serve]-only install), and the error that names
the extra to install. `.ci/extras` checks the same on real single-extra installs."""

import subprocess
import sys
from pathlib import Path

import pytest

from controller.extras import install_hint

ROOT = Path(__file__).resolve().parents[2]
SERVE_ONLY = ["grpc", "grpc_health", "grpc_reflection", "prometheus_client"]
TRAIN_ONLY = ["torch", "onnx", "onnxscript", "tensorboard"]
SIM = ["gymnasium", "pybullet", "pybullet_envs_gymnasium", "panda_gym", "matplotlib", "tqdm"]
CLUSTER = ["ray", "yaml"]


def mu(args: list[str], missing: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`mu ARGS` in a fresh interpreter where importing any of `missing` fails."""
    code = (
        "import sys\n"
        f"for name in {missing!r}:\n"
        "    sys.modules[name] = None  # import raises ModuleNotFoundError\n"
        "from controller.cli import main\n"
        f"sys.exit(main({args!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_train_runs_without_the_serving_extra(tmp_path):
    run = tmp_path / "run"
    small = ["--set", "learning_starts=100", "--set", "batch_size=32", "--set", "eval_every=200"]
    small += ["--set", "eval_episodes=1", "--set", "actor_hidden=[16]"]
    args = ["train", "--env", "InvertedPendulumBulletEnv-v0", "--steps", "200", *small]
    done = mu([*args, "--out", str(run)], SERVE_ONLY + CLUSTER, tmp_path)
    assert done.returncode == 0, done.stderr
    assert (run / "policy.onnx").exists()
    for command in (["serve", "--policy", "p.onnx"], ["loop", "--rate", "100"], ["bench"]):
        done = mu(command, SERVE_ONLY + CLUSTER, tmp_path)
        assert done.returncode == 2, done.stderr
        assert f"mu {command[0]} needs the module 'grpc" in done.stderr
        assert "[serve" in done.stderr and "Traceback" not in done.stderr
    done = mu(["sweep", "s.yaml"], SERVE_ONLY + CLUSTER, tmp_path)
    assert done.returncode == 2 and "mu-control[train,cluster]" in done.stderr, done.stderr


def test_serve_parses_without_the_training_extras(tmp_path):
    missing = TRAIN_ONLY + SIM + CLUSTER
    done = mu(["serve", "--help"], missing, tmp_path)
    assert done.returncode == 0 and "--policy" in done.stdout, done.stderr
    done = mu(["train", "--env", "InvertedPendulumBulletEnv-v0"], missing, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "mu-control[train]" in done.stderr and "Traceback" not in done.stderr


def test_install_hint():
    err = ModuleNotFoundError("No module named 'grpc_health'", name="grpc_health.v1")
    assert "mu-control[serve]" in install_hint("serve", err)
    assert "mu-control[train,serve]" in install_hint("train", err)
    assert install_hint("train", ModuleNotFoundError("x", name="controller.nope")) is None


@pytest.mark.parametrize("env", ["HalfCheetah-v5", "PandaReachDense-v99"])
def test_env_whose_package_is_missing_names_it(env):
    from training.envs import make_env

    hint = "gymnasium[mujoco]" if env.startswith("Half") else "panda-gym"
    try:
        import mujoco  # noqa: F401

        if env.startswith("Half"):
            pytest.skip("mujoco is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=hint.replace("[", r"\[").replace("]", r"\]")):
        make_env(env)
