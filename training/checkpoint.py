"""Checkpoints: plain tensors and builtins saved with `torch.save`, loaded with
`weights_only=True` (nothing is unpickled as code), written atomically (write, fsync, rename).

Two kinds share one format: the full training state (`checkpoint.pt`: agent, optimizers,
replay buffer, RNG states, progress) and the agent alone (`agent.pt`: weights of actor, critics,
targets and normalizer, plus the config), which is what export and online fine-tuning need.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from controller.errors import MissingFile, UsageError
from training.algos import OPTIMIZERS, AnyAgent, create_agent
from training.atomic import atomic_write
from training.config import TrainConfig
from training.replay import ReplayBuffer


def agent_state(agent: AnyAgent, with_optimizers: bool) -> dict[str, Any]:
    state = {name: m.state_dict() for name, m in agent.modules().items()}
    if with_optimizers:
        for name in OPTIMIZERS:
            if hasattr(agent, name):
                state[name] = getattr(agent, name).state_dict()
    return state


def save(
    path: str | Path,
    cfg: TrainConfig,
    agent: AnyAgent,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """`meta` holds env facts (obs layout, action bounds) and progress; `extra` the training
    state that only `--resume` needs (optimizers are saved whenever `extra` is given)."""
    payload = {
        "format": "mu.checkpoint.v1",
        "config": cfg.to_json(),
        "meta": meta,
        "agent": agent_state(agent, with_optimizers=extra is not None),
        "train_state": extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write(path, buf.getvalue())


def load(
    path: str | Path, device: str = "cpu"
) -> tuple[TrainConfig, AnyAgent, dict[str, Any], dict[str, Any] | None]:
    """Returns (config, agent, meta, train_state or None). A run directory loads its agent.pt
    (the exported actor, with the last critics), or its checkpoint.pt where training did not
    finish."""
    path = Path(path)
    if path.is_dir():
        path = path / "agent.pt" if (path / "agent.pt").exists() else path / "checkpoint.pt"
        if not path.exists():
            raise MissingFile(
                f"no agent.pt or checkpoint.pt in {path.parent}: not a run directory of mu train"
            )
    if not path.exists():
        raise MissingFile(f"no checkpoint at {path}")
    try:
        # on the CPU: the replay and generator states are numpy's and torch's CPU state; the
        # agent's modules and optimizers move what they hold to `device` as they load it
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises a different error for each kind of wrong file
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != "mu.checkpoint.v1":
        raise UsageError(
            f"{path} is not a mu checkpoint: give a run directory of mu train, its agent.pt or "
            "its checkpoint.pt (a policy file holds the actor only, no critic)"
        )
    cfg = TrainConfig.from_dict({**json.loads(payload["config"]), "device": device})
    meta = payload["meta"]
    agent = create_agent(cfg, meta["obs_dim"], meta["act_dim"], meta.get("priv_dim", 0))
    for name, module in agent.modules().items():
        module.load_state_dict(payload["agent"][name])
    for name in OPTIMIZERS:
        if name in payload["agent"]:
            getattr(agent, name).load_state_dict(payload["agent"][name])
    return cfg, agent, meta, payload["train_state"]


def saved_replay(source: str | Path, train_state: dict[str, Any] | None) -> ReplayBuffer | None:
    """The replay buffer saved with a run (`train_state` from `load`, else the run directory's
    checkpoint.pt), rebuilt by the buffer's own code; None where there is none."""
    path = Path(source) / "checkpoint.pt"
    if train_state is None and path.exists():
        train_state = torch.load(path, map_location="cpu", weights_only=True)["train_state"]
    if not train_state or not train_state["replay"]["size"]:
        return None
    return ReplayBuffer.from_state(train_state["replay"])
