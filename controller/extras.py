"""Which extra a missing module belongs to, so that a command names what to install.

Each extra alone runs its own commands (pyproject.toml): a serving install has no torch, a
training install no gRPC; a command that reaches a module its install lacks says which extra
to add instead of a traceback.
"""

from __future__ import annotations

# top-level module -> the extra that brings it (the first of those that do)
MODULE_EXTRA = {
    "torch": "train",
    "onnx": "train",
    "onnxscript": "train",
    "tensorboard": "train",
    "grpc": "serve",
    "grpc_health": "serve",
    "grpc_reflection": "serve",
    "google": "serve",  # protobuf
    "prometheus_client": "serve",
    "onnxruntime": "serve",
    "gymnasium": "sim",
    "pybullet": "sim",
    "pybullet_envs_gymnasium": "sim",
    "panda_gym": "sim",
    "matplotlib": "sim",
    "tqdm": "sim",
    "ray": "cluster",
    "yaml": "cluster",
    "pyarrow": "cluster",
    "stable_baselines3": "dev",
}
# modules that more than one extra brings
ALSO_IN = {
    "onnxruntime": {"train"},
    **{m: {"train"} for m in ("gymnasium", "pybullet", "pybullet_envs_gymnasium", "panda_gym")},
    **{m: {"train"} for m in ("matplotlib", "tqdm")},
}
# what each command needs installed
COMMAND_EXTRAS = {
    "train": "train",
    "export": "train",
    "explain": "train",
    "eval": "serve,sim",
    "plot": "sim",
    "serve": "serve",
    "loop": "serve,sim",
    "bench": "serve",
    "sweep": "train,cluster",
}


def install_hint(command: str, err: ModuleNotFoundError) -> str | None:
    """What to install for `command` when `err` is a module of an extra; None when the module
    is not one of the extras' (a bug, not an install to fix)."""
    top = (err.name or "").split(".")[0]
    if top not in MODULE_EXTRA:
        return None
    extras = COMMAND_EXTRAS.get(command, MODULE_EXTRA[top])
    carriers = ALSO_IN.get(top, set()) | {MODULE_EXTRA[top]}
    if not carriers & set(extras.split(",")):  # the command reached beyond its extras
        extras = f"{extras},{MODULE_EXTRA[top]}"
    hint = (
        f"mu {command} needs the module {top!r}, which this install lacks: "
        f"pip install 'mu-control[{extras}]' (from a checkout: pip install -e '.[{extras}]')"
    )
    if "train" in extras.split(","):  # a plain resolve of torch takes a multi-GB CUDA build
        hint += "; install torch's CPU build first (pip install torch==2.13.0 from a CPU index)"
    return hint
