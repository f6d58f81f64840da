"""The learner process: replay buffer, TD3 updates (training.td3.learn, the training step
itself) and candidate export. The only fine-tuning code that imports torch.

It runs at the lowest priority (SCHED_IDLE) on one CPU with one torch thread, takes chunks from
a queue the server fills without ever waiting, and reports candidates back; it never touches the
serving path. It writes the candidates and their agent snapshots; the server writes the pointer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import queue
import signal
import sys
import time
from multiprocessing.queues import Queue
from typing import Any

import numpy as np
import torch

from controller.contract import split_rows
from controller.finetune.config import FinetuneConfig, check_algo
from controller.finetune.versions import (
    agent_for,
    candidate_paths,
    next_candidate_index,
    read_pointer,
)
from training import checkpoint
from training.export import Exporter, ParityError, export_policy
from training.randomization import nominal_privileged
from training.replay import ReplayBuffer
from training.td3 import learn

log = logging.getLogger(__name__)

STATS_EVERY_S = 1.0


class Learner:
    """TD3 on reported transitions; usable in-process (tests) or as the learner process."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        self.cfg = cfg
        assert cfg.versions_dir is not None
        cfg.versions_dir.mkdir(parents=True, exist_ok=True)
        pointer = read_pointer(cfg.versions_dir)
        source = pointer.agent if pointer is not None and pointer.agent else cfg.checkpoint
        train_cfg, self.agent, self.meta, state = checkpoint.load(source, "cpu")
        check_algo(train_cfg.algo, source)
        # Fine-tuning settings on top of the training run's (same network sizes, γ, TD3 noise).
        self.train_cfg = dataclasses.replace(
            train_cfg,
            actor_lr=cfg.actor_lr,
            critic_lr=cfg.critic_lr,
            batch_size=cfg.batch_size,
            buffer_size=cfg.buffer_size,
            learning_starts=cfg.batch_size,
        )
        self._set_learning_rates()
        # The normalizer stays frozen: it is baked into every exported graph, and moving it
        # would move every action at once.
        self.agent.normalizer.eval()
        obs_dim, act_dim = self.meta["obs_dim"], self.meta["act_dim"]
        self.buffer = ReplayBuffer(
            cfg.buffer_size, obs_dim, act_dim, priv_dim=self.meta.get("priv_dim", 0)
        )
        offline = checkpoint.saved_replay(source, state)
        if offline is not None:
            self._seed_offline(offline)
        self.rng = np.random.default_rng(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.online_seen = 0
        self.updates = 0
        self.actor_updates = 0
        self.candidates = 0
        # The first candidate's graph, refilled with each later candidate's weights: the actor's
        # architecture never changes here, and a full torch.onnx.export costs seconds of CPU.
        self.exporter = Exporter()
        self.paused = cfg.start_paused
        log.info(
            "learner: %s from %s, buffer %d transitions",
            self.meta["env_id"],
            source,
            self.buffer.size,
        )

    def _set_learning_rates(self) -> None:
        for opt, lr in (
            (self.agent.actor_opt, self.cfg.actor_lr),
            (self.agent.critic_opt, self.cfg.critic_lr),
        ):
            for group in opt.param_groups:
                group["lr"] = lr

    def _seed_offline(self, offline: ReplayBuffer) -> None:
        # the newest transitions of the training run, leaving room for online data
        self.buffer.extend(offline.newest(self.buffer.capacity // 2))
        log.info("learner: replay seeded with %d offline transitions", self.buffer.size)

    def add(self, rows: np.ndarray) -> None:
        """Store a chunk of transition rows (controller.contract.row_width)."""
        cols = split_rows(rows, self.meta["obs_dim"], self.meta["act_dim"])
        for i in range(len(rows)):
            self.buffer.add(
                cols["obs"][i],
                cols["action"][i],
                float(cols["reward"][i]),
                cols["next_obs"][i],
                bool(cols["terminated"][i]),
                bool(cols["truncated"][i]),
                *(self._nominal_privileged(cols[k][i]) for k in ("obs", "next_obs") if self.priv),
            )
        self.online_seen += len(rows)

    @property
    def priv(self) -> bool:
        return self.agent.priv_normalizer is not None

    def _nominal_privileged(self, obs: np.ndarray) -> np.ndarray:
        """A robot reports no randomization draws: a privileged critic fine-tunes with every
        knob at its nominal value and the observation as the noise-free one (the current
        observation, the first block of a history input)."""
        history = self.meta.get("history") or {"obs_dim": self.meta["obs_dim"]}
        clean = obs[: history["obs_dim"]]
        return nominal_privileged(self.meta["randomization"], clean, self.meta["act_dim"])

    def can_update(self) -> bool:
        """Not paused, a batch is available, and the update-to-data budget is not spent."""
        budget = int(self.online_seen * self.cfg.updates_per_transition)
        return not self.paused and self.buffer.size >= self.cfg.batch_size and self.updates < budget

    def step(self) -> dict[str, torch.Tensor]:
        """One TD3 update; the actor follows once the critic has seen `actor_warmup` transitions."""
        self.updates += 1
        ready = self.online_seen >= self.cfg.actor_warmup
        losses = learn(self.agent, self.buffer, self.rng, self.train_cfg, self.updates, ready)
        if "actor_loss" in losses:
            self.actor_updates += 1
        return losses

    def candidate_due(self) -> bool:
        return self.actor_updates >= (self.candidates + 1) * self.cfg.candidate_every

    def export_candidate(self) -> dict[str, Any]:
        """Write the agent snapshot, then the ONNX actor (refused on a parity failure)."""
        assert self.cfg.versions_dir is not None
        self.candidates += 1
        index = next_candidate_index(self.cfg.versions_dir)
        onnx_path, agent_path = candidate_paths(self.cfg.versions_dir, index)
        meta = {
            **self.meta,
            "train_steps": int(self.meta.get("train_steps", 0)) + self.online_seen,
            "finetune_updates": self.updates,
        }
        checkpoint.save(agent_path, self.train_cfg, self.agent, meta)
        try:
            export_policy(
                self.agent,
                meta,
                self.train_cfg,
                onnx_path,
                replay_obs=self.buffer.recent_obs(1000),
                exporter=self.exporter,
            )
        except ParityError as e:
            log.warning("candidate %d refused: %s", index, e)
            return {"kind": "refused", "index": index, "reason": f"ONNX parity: {e}"}
        return {
            "kind": "candidate",
            "index": index,
            "path": str(onnx_path),
            "updates": self.updates,
        }

    def served(self, policy: str, rolled_back: bool) -> None:
        """The server now serves `policy` (and has recorded it in the versions pointer): after a
        rollback, continue from that version's agent (the actor that regressed is abandoned;
        the replay buffer stays)."""
        if rolled_back:
            snapshot = agent_for(policy)
            _, self.agent, _, _ = checkpoint.load(snapshot or self.cfg.checkpoint, "cpu")
            self._set_learning_rates()
            self.agent.normalizer.eval()
            log.info("continuing from the agent of %s", policy)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the server dies, even by kill -9."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _lowest_priority() -> None:
    """SCHED_IDLE, on one CPU: the learner runs only on CPU time nothing else wants, so a waking
    server thread preempts it at once. On 2 cores with the loop at 100 Hz, nice 10 doubled
    ActStream p99; a busy SCHED_IDLE TD3 loop tripled it unpinned and left it unchanged pinned
    (docs/finetuning.md)."""
    if hasattr(os, "sched_setscheduler"):
        # Per thread on Linux: threads started before this call (by the spawn bootstrap and
        # torch's import) keep their policy and CPUs unless set one by one.
        cpu = max(os.sched_getaffinity(0))  # the server's last CPU: `taskset` on it chooses
        for tid in os.listdir("/proc/self/task"):
            os.sched_setscheduler(int(tid), os.SCHED_IDLE, os.sched_param(0))
            os.sched_setaffinity(int(tid), {cpu})
    else:
        os.nice(19)


def run(cfg: FinetuneConfig, inbox: Queue, commands: Queue, outbox: Queue, log_level: int) -> None:
    """The learner process's main loop; ends on a "stop" command."""
    _die_with_parent()
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(name)s[learner]: %(message)s"
    )
    if cfg.learner_idle_priority:
        _lowest_priority()
    torch.set_num_threads(1)
    try:
        _serve_learner(cfg, inbox, commands, outbox)
    except Exception as e:  # the server logs it and shows it in GetFinetuneStatus
        outbox.put({"kind": "died", "error": f"{type(e).__name__}: {e}"[:1000]})
        raise


def _serve_learner(cfg: FinetuneConfig, inbox: Queue, commands: Queue, outbox: Queue) -> None:
    learner = Learner(cfg)
    outbox.put({"kind": "ready", "env_id": learner.meta["env_id"]})
    last_stats = 0.0
    while True:
        while True:
            try:
                command = commands.get_nowait()
            except queue.Empty:
                break
            kind = command[0]
            if kind == "stop":
                return
            if kind in ("pause", "resume"):
                learner.paused = kind == "pause"
            elif kind == "served":
                learner.served(*command[1:])
        # Take what arrived; wait briefly only when there is nothing to do.
        timeout = None if learner.can_update() else 0.05
        while True:
            try:
                chunk = inbox.get_nowait() if timeout is None else inbox.get(timeout=timeout)
            except queue.Empty:
                break
            learner.add(chunk)
            timeout = None
        if learner.can_update():
            learner.step()
            if learner.candidate_due():
                outbox.put(learner.export_candidate())
        now = time.monotonic()
        if now - last_stats >= STATS_EVERY_S:
            last_stats = now
            outbox.put(
                {
                    "kind": "stats",
                    "updates": learner.updates,
                    "actor_updates": learner.actor_updates,
                    "online_seen": learner.online_seen,
                    "paused": learner.paused,
                }
            )
