"""The serving side of fine-tuning (torch-free): the learner process, the queues, promotion and
rollback. Everything here runs on the server's event loop except the gates (a worker thread).

Data path: each ActStream's transitions (controller.transitions) feed a LearnerSink; rows
gather into chunks that `put_nowait` into a bounded multiprocessing queue (a full queue drops
the chunk and counts it).
Control path: a pump task flushes partial chunks and reads the learner's messages every 50 ms;
a candidate passes the gates, then the PolicyStore hot-swaps it with a new version number, the
RollbackMonitor judges it by reported returns, and every swap is sent to the learner, which
commits the restart pointer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import queue
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from controller.contract import fill_row, row_width, to_unit
from controller.errors import UsageError
from controller.explore import Explorer
from controller.finetune.config import FinetuneConfig, check_algo
from controller.finetune.experience import (
    Counters,
    LearnerSink,
    TransitionSink,
    UntrustedExperience,
)
from controller.finetune.gates import check_candidate
from controller.finetune.monitor import RollbackMonitor, Verdict
from controller.finetune.versions import Pointer, agent_for, read_pointer, write_pointer
from controller.metrics import Metrics
from controller.policy import Policy, PolicyLoadError, load_policy, read_policy_file
from controller.store import PolicyStore, SwapRefused
from controller.transitions import Transitions

log = logging.getLogger(__name__)

PUMP_INTERVAL_S = 0.05


def resume_policy(cfg: FinetuneConfig) -> tuple[Policy, int] | None:
    """The policy the last run committed to (versions pointer), with its version number, and
    the highest version number that run gave out; None when there is no pointer. Raises
    UsageError when the pointed file is not the one recorded."""
    assert cfg.versions_dir is not None
    pointer = read_pointer(cfg.versions_dir)
    if pointer is None:
        return None
    data = read_policy_file(pointer.policy)
    policy = load_policy(data, source=pointer.policy, version=pointer.version)
    if policy.sha256 != pointer.sha256:
        raise UsageError(
            f"{pointer.policy} has sha256 {policy.sha256[:12]}, but the versions pointer in "
            f"{cfg.versions_dir} recorded {pointer.sha256[:12]}; refusing to guess what to serve"
        )
    log.info("resuming fine-tuned version %d from %s", pointer.version, pointer.policy)
    return policy, pointer.max_version


def _learner_main(*args: Any) -> None:
    """Entry point of the spawned learner process (imports torch there, never here)."""
    from controller.finetune.learner import run

    run(*args)


@dataclass
class _Stats:
    updates: int = 0
    actor_updates: int = 0
    candidates: int = 0
    promotions: int = 0
    refusals: int = 0
    rollbacks: int = 0
    last_refusal: str = ""


class Finetuner:
    """Owns the learner process and decides promotions and rollbacks for one server."""

    def __init__(
        self, cfg: FinetuneConfig, store: PolicyStore, log_level: int, metrics: Metrics
    ) -> None:
        self.cfg = cfg
        self._store = store
        self._metrics = metrics
        #: Why the learner process died; None while it runs (or starts).
        self.learner_error: str | None = None
        assert cfg.versions_dir is not None
        cfg.versions_dir.mkdir(parents=True, exist_ok=True)
        pointer = read_pointer(cfg.versions_dir)
        # The highest version number given out, kept in the pointer: never reused.
        self._max_version = store.current.version if pointer is None else pointer.max_version
        store.before_swap = self.commit
        policy = store.current
        check_algo(policy.metadata.get("mu.algo", ""), policy.source)  # before any process starts
        self.obs_dim, self.act_dim = policy.obs_dim, policy.act_dim
        self.counters = Counters()
        self.stats = _Stats()
        self.paused = cfg.start_paused
        self.monitor = RollbackMonitor(
            cfg.rollback_window, cfg.rollback_margin, cfg.rollback_margin_abs
        )
        self.explorer = (
            Explorer(cfg.explore_std, cfg.explore_clip, self.act_dim, cfg.seed)
            if cfg.explore_std > 0
            else None
        )
        ctx = mp.get_context("spawn")
        self._inbox = ctx.Queue(cfg.queue_chunks)
        self._commands = ctx.Queue()
        self._outbox = ctx.Queue()
        self.sink = TransitionSink(
            row_width(self.obs_dim, self.act_dim), cfg.chunk_size, self._put_nowait, self.counters
        )
        # The last gate_states served observations: what the gates compare actions on.
        self._recent = np.zeros((cfg.gate_states, self.obs_dim), np.float32)
        self._recent_n = 0
        self._process = ctx.Process(
            target=_learner_main,
            args=(cfg, self._inbox, self._commands, self._outbox, log_level),
            name="mu-learner",
            daemon=True,
        )
        self._pump_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rolling_back = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the learner process and the pump (inside the event loop). Serving does not
        wait for the learner: it starts learning once torch has loaded."""
        self._process.start()
        self._metrics.set_learner_alive(True)
        self._pump_task = asyncio.create_task(self._pump())
        log.info(
            "fine-tuning from %s (versions in %s, exploration std %g)",
            self.cfg.checkpoint,
            self.cfg.versions_dir,
            self.cfg.explore_std,
        )

    async def stop(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
        for task in self._tasks:
            task.cancel()
        if self._process.is_alive():
            self._commands.put(("stop",))
            await asyncio.get_running_loop().run_in_executor(None, self._process.join, 10.0)
            if self._process.is_alive():
                log.warning("learner did not stop in 10 s; killing it")
                self._process.kill()
        for q in (self._inbox, self._commands, self._outbox):
            q.cancel_join_thread()  # queued chunks are not worth waiting for at shutdown
            q.close()

    # -- data path (called by the ActStream handler) ------------------------------------------

    def stream(self, trusted: bool, peer: str) -> Transitions:
        """What one ActStream's reports feed: the learner and the rollback monitor when the
        caller is trusted (admin token, or the server has none); nothing otherwise."""
        sink: LearnerSink | UntrustedExperience = (
            LearnerSink(self.sink, self._episode, row_width(self.obs_dim, self.act_dim))
            if trusted
            else UntrustedExperience(self.counters, peer)
        )
        return Transitions(sink, self.obs_dim, self.act_dim)

    def _record_states(self, obs: np.ndarray) -> None:
        obs = obs[-len(self._recent) :]
        idx = (self._recent_n + np.arange(len(obs))) % len(self._recent)
        self._recent[idx] = obs
        self._recent_n += len(obs)

    def recent_states(self) -> np.ndarray:
        n = min(self._recent_n, len(self._recent))
        idx = (self._recent_n - n + np.arange(n)) % len(self._recent)
        return self._recent[idx]

    def _put_nowait(self, chunk: np.ndarray) -> bool:
        self._record_states(chunk[:, : self.obs_dim])  # the gates compare actions on these
        try:
            self._inbox.put_nowait(chunk)
        except queue.Full:
            return False
        return True

    def report_transition(
        self,
        obs: Sequence[float],
        action: Sequence[float],
        reward: float,
        next_obs: Sequence[float],
        terminated: bool,
        truncated: bool,
        episode: tuple[int, float] | None = None,
    ) -> str | None:
        """A transition logged elsewhere (env units), and with `episode` (version, return) the
        episode it ended; returns why it was rejected, or None."""
        if episode is not None and not math.isfinite(episode[1]):
            return self._reject("episode_return is not finite")
        policy = self._store.current
        o = np.asarray(obs, np.float32)
        a = np.asarray(action, np.float32)
        o2 = np.asarray(next_obs, np.float32)
        for name, value, n in (("obs", o, self.obs_dim), ("action", a, self.act_dim),
                               ("next_obs", o2, self.obs_dim)):  # fmt: skip
            if value.shape != (n,):
                return self._reject(f"{name} has {value.size} values; the policy expects {n}")
            if not np.isfinite(value).all():
                return self._reject(f"{name} contains NaN or infinite values")
        if not math.isfinite(reward):
            return self._reject("reward is not finite")
        row = np.empty(row_width(self.obs_dim, self.act_dim), np.float32)
        fill_row(row, o, to_unit(a, policy.low, policy.high), reward, o2, terminated, truncated)
        self.sink.add(row)
        if episode is not None:
            self._episode(*episode)
        return None

    def _reject(self, reason: str) -> str:
        self.counters.rejected += 1
        return reason

    # -- control path -----------------------------------------------------------------------

    @property
    def learning(self) -> bool:
        """Not paused, and the learner has not died: exploration is worth its cost."""
        return not self.paused and self.learner_error is None

    async def _pump(self) -> None:
        while self.learner_error is None:
            await asyncio.sleep(PUMP_INTERVAL_S)
            self.sink.flush()
            # Checked before reading: a learner that died has already sent its last message.
            dead = not self._process.is_alive()
            while True:
                try:
                    message = self._outbox.get_nowait()
                except queue.Empty:
                    break
                await self._handle(message)
            if dead:
                self._died(f"exit code {self._process.exitcode}")

    def _died(self, why: str) -> None:
        """The learner is gone: say so everywhere, and stop exploring (nothing learns from it)."""
        if self.learner_error is not None:
            return
        self.learner_error = why
        self._metrics.set_learner_alive(False)
        self._store.notify()  # local-lane loops stop exploring
        log.error(
            "fine-tuning learner died (%s): exploration is off and no candidates will come "
            "until the server restarts; the served version (%d) keeps serving",
            why,
            self._store.current.version,
        )

    async def _handle(self, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "stats":
            self.stats.updates = message["updates"]
            self.stats.actor_updates = message["actor_updates"]
        elif kind == "ready":
            log.info("learner ready (%s)", message["env_id"])
        elif kind == "died":
            self._died(message["error"])
        elif kind == "refused":
            self.stats.candidates += 1
            self._refuse(message["index"], message["reason"])
        elif kind == "candidate":
            self.stats.candidates += 1
            await self._consider(message["index"], Path(message["path"]))

    def _refuse(self, index: int, reason: str) -> None:
        self.stats.refusals += 1
        self.stats.last_refusal = f"candidate {index}: {reason}"
        log.warning("candidate %d refused: %s", index, reason)

    async def _consider(self, index: int, path: Path) -> None:
        current = self._store.current
        if self.paused or not self.monitor.ready_to_promote(current.version):
            log.info(
                "candidate %d kept on disk, not promoted: %s",
                index,
                "paused"
                if self.paused
                else f"version {current.version} is still being judged or has too few episodes",
            )
            return
        log.info("promoting candidate %d (gates on %s)", index, path.name)
        # One onnxruntime session per promotion, gated then served: a load holds the GIL for
        # milliseconds, and each one costs the serving loop's tail.
        try:
            candidate = await asyncio.to_thread(
                lambda: load_policy(read_policy_file(path), source=str(path), version=0)
            )
        except PolicyLoadError as e:
            self._refuse(index, f"candidate does not load: {e}")
            return
        result = await asyncio.to_thread(
            check_candidate,
            candidate,
            current,
            self.recent_states(),
            self.cfg.gate_max_change,
            self.cfg.gate_mean_change,
            self.cfg.gate_states,
        )
        if not result.passed:
            self._refuse(index, result.reason)
            return
        try:
            policy = await self._store.load_loaded(candidate)
        except SwapRefused as e:
            self._refuse(index, e.message)
            return
        self.stats.promotions += 1
        self.monitor.promoted(policy.version, current.version)
        log.info(
            "promoted candidate %d as version %d (action change max %.3f, mean %.3f)",
            index,
            policy.version,
            result.max_change,
            result.mean_change,
        )

    def commit(self, policy: Policy) -> None:
        """Record `policy` in the versions pointer as what a restart serves, before anyone can
        see it: the store calls this in its loader thread, between validating a policy and
        swapping it in. Raises SwapRefused when the pointer cannot be written."""
        assert self.cfg.versions_dir is not None
        self._max_version = max(self._max_version, policy.version)
        if policy.source == "<bytes>":
            log.warning(
                "version %d was uploaded as bytes: a restart will not resume it", policy.version
            )
            return
        source = Path(policy.source).resolve()
        snapshot = agent_for(source)
        agent = None if snapshot is None else str(snapshot)
        pointer = Pointer(policy.version, str(source), policy.sha256, agent, self._max_version)
        try:
            write_pointer(self.cfg.versions_dir, pointer)
        except OSError as e:
            raise SwapRefused(
                grpc.StatusCode.UNAVAILABLE,
                f"version {policy.version} not served: it cannot be recorded in "
                f"{self.cfg.versions_dir} ({e.strerror or e}), so a restart would not serve it",
            ) from None

    def on_swap(self, policy: Policy) -> None:
        """Every swap (promotion, rollback, LoadPolicy): after a rollback the learner continues
        from the agent of the version served again."""
        if policy.source != "<bytes>":
            self._commands.put(("served", str(Path(policy.source).resolve()), self._rolling_back))

    def _episode(self, version: int, episode_return: float) -> None:
        """An episode served wholly by `version`, with a finite return (callers check)."""
        verdict = self.monitor.episode(version, episode_return)
        if verdict is None:
            return
        if not verdict.rollback:
            log.info(
                "version %d accepted: mean return %.3f vs %.3f under version %d",
                verdict.version,
                verdict.mean,
                verdict.previous_mean,
                verdict.previous,
            )
            return
        task = asyncio.get_running_loop().create_task(self._auto_rollback(verdict))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _auto_rollback(self, verdict: Verdict) -> None:
        previous = self._store.previous
        if (
            self._store.current.version != verdict.version
            or previous is None
            or (previous.version != verdict.previous)
        ):
            log.warning("regression of version %d seen, but the store moved on", verdict.version)
            return
        log.warning(
            "version %d regressed: mean return %.3f < %.3f under version %d; rolling back",
            verdict.version,
            verdict.mean,
            verdict.previous_mean,
            verdict.previous,
        )
        await self.rollback()

    async def rollback(self) -> Policy:
        """Serve the previous version again (admin or automatic). Raises SwapRefused."""
        self._rolling_back = True
        try:
            policy = await self._store.rollback()
        finally:
            self._rolling_back = False
        self.monitor.rolled_back()
        self.stats.rollbacks += 1
        return policy

    def pause(self) -> None:
        self.paused = True
        self._commands.put(("pause",))
        self._store.notify()  # local-lane loops stop exploring

    def resume(self) -> None:
        self.paused = False
        self._commands.put(("resume",))
        self._store.notify()

    def status(self) -> dict[str, Any]:
        current = self._store.current.version
        judged = self.monitor.returns(current)
        judging = self.monitor.judging
        return {
            "paused": self.paused,
            "learner_alive": self.learner_error is None and self._process.is_alive(),
            "transitions_received": self.counters.received,
            "transitions_rejected": self.counters.rejected,
            "transitions_dropped": self.counters.dropped,
            "updates": self.stats.updates,
            "actor_updates": self.stats.actor_updates,
            "candidates": self.stats.candidates,
            "promotions": self.stats.promotions,
            "refusals": self.stats.refusals,
            "last_refusal": self.stats.last_refusal,
            "rollbacks": self.stats.rollbacks,
            "judging_version": 0 if judging is None else judging[0],
            "judging_episodes": 0 if judging is None else len(self.monitor.returns(judging[0])),
            "current_mean_return": float(np.mean(judged)) if judged else float("nan"),
            "current_episodes": len(judged),
            "explore_std": self.cfg.explore_std,
            "versions_dir": str(self.cfg.versions_dir),
            "learner_error": self.learner_error or "",
        }
