"""The local lane: the robot's loop evaluates the policy in-process; the server ships it.

`PolicyWatcher` runs one background thread on a WatchPolicy stream. For each PolicyUpdate it
checks the sha256, loads, validates and warms the file with the server's own code
(`controller.policy.load_policy`), and swaps it in by replacing one reference (`current`); a
tick reads that reference once, so it never waits on the network nor sees half a swap. Every
update is acknowledged (AckPolicy: applied, or refused with the reason). When the stream breaks,
the loop keeps the last verified policy and the watcher reconnects with exponential backoff
and jitter, then applies whatever the (possibly restarted) server serves.

`ExperienceQueue` carries transitions from the loop to the server's learner: a bounded queue
that a tick only `put_nowait`s into (a full queue drops and counts), drained by a background
thread that sends batches with ReportTransitions.

`LocalClient` is what the loop calls: the lane's client (controller.robot.client.Client), whose
act() runs the server's action pipeline (controller/pipeline.py) on the watched policy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import random
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from controller.contract import interface_change
from controller.explore import Explorer
from controller.keepalive import keepalive_options
from controller.pipeline import Pipeline
from controller.policy import ORT_ERRORS, ActError, Policy, PolicyLoadError, load_policy
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.robot.client import ActRefused, Client
from controller.transitions import Outcome, Transition, Transitions

log = logging.getLogger(__name__)

# Calls of a new policy before it is swapped in: the first ticks then find it warm.
WARM_CALLS = 20


def channel_options(keepalive_s: float) -> list[tuple[str, int]]:
    """The local lane's channel. Reconnection: gRPC's own defaults (1 s, growing to 120 s)
    would leave a restarted server unseen for minutes; the watcher adds its own backoff on top.
    Keepalive: a ping every `keepalive_s` on the idle WatchPolicy stream, so a server that
    vanished without closing the connection is noticed within 2 × keepalive_s, not after TCP's
    hours (controller.keepalive.keepalive_options). The server accepts pings down to every 0.5 s
    (controller.server.server_options); LocalClient allows 1 s."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
        *keepalive_options(keepalive_s),
    ]


@dataclass(frozen=True)
class LocalPolicy:
    """What one tick runs: a verified policy and the server's settings that came with it."""

    policy: Policy
    version: int
    sha256: str
    #: Slew limit per tick in action units; None = off.
    max_delta: float | None
    #: Exploration std and clip in [-1, 1] units; std 0 = no exploration.
    explore_std: float
    explore_clip: float
    #: The server fine-tunes: transitions are worth reporting.
    finetune: bool
    server_id: str


class PolicyWatcher:
    """Keeps `current` equal to what the server serves. Thread-safe readers: `current` is
    replaced whole, never mutated."""

    def __init__(
        self,
        channel: grpc.Channel,
        client_id: str,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
        ack_deadline_s: float = 5.0,
        backoff_s: float = 0.05,
        max_backoff_s: float = 0.5,
    ) -> None:
        self.client_id = client_id
        self._stub = pb_grpc.ControllerStub(channel)
        self._metadata = metadata
        self._ack_deadline_s = ack_deadline_s
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        #: The policy ticks use; None until the first update is applied.
        self.current: LocalPolicy | None = None
        self._previous: LocalPolicy | None = None  # a rollback reuses it without a reload
        #: Updates applied and refused, reconnections, and what went wrong last.
        self.applied = 0
        self.refused = 0
        #: Updates applied or refused whose acknowledgement was sent (or failed).
        self.handled = 0
        self.reconnects = 0
        #: (perf_counter_ns, version, sha256) of the latest swaps (benchmarks time them).
        self.history: deque[tuple[int, int, str]] = deque(maxlen=4096)
        self.last_error: str | None = None
        self.connected = False
        #: Why the server refused the credentials (UNAUTHENTICATED / PERMISSION_DENIED), if so.
        self.denied: str | None = None
        self._changed = threading.Condition()
        self._closed = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="mu-watch-policy", daemon=True)
        self._thread.start()

    # -- waiting (outside the ticks) --------------------------------------------------------------

    def wait(
        self, version: int | None = None, *, sha256: str | None = None, timeout: float
    ) -> LocalPolicy:
        """Block until a policy is applied (with `version` and `sha256`, when given);
        TimeoutError naming the watcher's last error otherwise. Before the first policy, a
        server that refuses the credentials raises PermissionError at once."""

        def ready() -> bool:
            current = self.current
            if current is None and self.denied is not None:
                return True
            return (
                current is not None
                and (version is None or current.version == version)
                and (sha256 is None or current.sha256 == sha256)
            )

        with self._changed:
            ok = self._changed.wait_for(ready, timeout)
        if self.current is None and self.denied is not None:
            raise PermissionError(
                f"the server refuses this loop: {self.denied} (pass token=, the admin token)"
            )
        if not ok or self.current is None:
            want = "a policy" if version is None else f"version {version}"
            raise TimeoutError(
                f"no {want} from the server within {timeout:g} s"
                + (f" (last error: {self.last_error})" if self.last_error else "")
            )
        return self.current

    def wait_until(self, predicate: Callable[[LocalPolicy], bool], *, timeout: float) -> None:
        """Block until `predicate(current)` holds (e.g. an exploration setting arrived)."""
        with self._changed:
            ok = self._changed.wait_for(
                lambda: self.current is not None and predicate(self.current), timeout
            )
        if not ok:
            raise TimeoutError(f"the awaited policy settings did not arrive within {timeout:g} s")

    def wait_handled(self, count: int, *, timeout: float) -> None:
        """Block until `count` updates were applied or refused and acknowledged."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.handled >= count, timeout):
                raise TimeoutError(f"fewer than {count} updates handled within {timeout:g} s")

    # -- the watcher thread -----------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._backoff_s
        while not self._closed.is_set():
            current = self.current
            request = pb.WatchPolicyRequest(
                client_id=self.client_id,
                running_version=0 if current is None else current.version,
                running_sha256="" if current is None else current.sha256,
            )
            try:
                call = self._stub.WatchPolicy(request, metadata=self._metadata)
                self._call = call
                for update in call:
                    self.connected = True
                    backoff = self._backoff_s
                    self._handle(update)
                why = "the server ended the WatchPolicy stream"
            except grpc.RpcError as e:
                if self._closed.is_set():
                    break
                why = f"WatchPolicy: {e.code().name}: {e.details()}"
                if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    with self._changed:  # a wait() for the first policy gives up at once
                        self.denied = why
                        self._changed.notify_all()
            self.connected = False
            if why != self.last_error:
                kept = self.current
                log.warning(
                    "%s; keeping %s, reconnecting",
                    why,
                    "no policy yet" if kept is None else f"version {kept.version}",
                )
            self.last_error = why
            self.reconnects += 1
            # Jitter: loops that lost the same server do not all come back at once.
            self._closed.wait(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self._max_backoff_s)

    def _handle(self, update: pb.PolicyUpdate) -> None:
        try:
            local = self._verify(update)
        except PolicyLoadError as e:
            self.refused += 1
            self.last_error = str(e)
            kept = "no policy" if self.current is None else f"version {self.current.version}"
            log.warning("refused version %d (keeping %s): %s", update.version, kept, e)
            self._ack(update, applied=False, error=str(e))
            self._handled()
            return
        current = self.current
        if current is not None and current.policy is not local.policy:
            self._previous = current  # also keeps the retired session alive outside a tick
        self.current = local  # the swap: the next tick reads the new reference
        self.history.append((time.perf_counter_ns(), local.version, local.sha256))
        self.applied += 1
        with self._changed:
            self._changed.notify_all()
        log.info("applied version %d (sha256 %s)", local.version, local.sha256[:12])
        self._ack(update, applied=True)
        self._handled()

    def _handled(self) -> None:
        with self._changed:
            self.handled += 1
            self._changed.notify_all()

    def _verify(self, update: pb.PolicyUpdate) -> LocalPolicy:
        """The LocalPolicy for `update`; PolicyLoadError saying why it is refused."""
        current, previous = self.current, self._previous
        # Always hash what arrived: a matching claim alone must not select a cached policy.
        digest = hashlib.sha256(update.onnx).hexdigest()
        if digest != update.sha256:
            raise PolicyLoadError(
                f"version {update.version}: the received file has sha256 {digest[:16]}, "
                f"the update says {update.sha256[:16]}"
            )
        reuse = next((p for p in (current, previous) if p is not None and p.sha256 == digest), None)
        if reuse is not None:  # the same file (settings changed, or a rollback): no reload
            policy = reuse.policy
        else:
            policy = load_policy(
                update.onnx, source=f"version {update.version} ({update.source})",
                version=update.version,
            )  # fmt: skip
            change = None if current is None else interface_change(policy, current.policy)
            if change is not None:
                what, a, b = change
                raise PolicyLoadError(
                    f"version {update.version} has {what} {a}; this loop runs {b}"
                )
            zeros = [0.0] * policy.obs_dim
            for _ in range(WARM_CALLS):
                policy.act_values(zeros)
        low = np.asarray(update.action_low, np.float32)
        high = np.asarray(update.action_high, np.float32)
        if not (np.array_equal(low, policy.low) and np.array_equal(high, policy.high)):
            raise PolicyLoadError(
                f"version {update.version}: the update's bounds differ from the file's metadata"
            )
        policy.version = update.version  # named in its NaN refusals
        return LocalPolicy(
            policy=policy,
            version=update.version,
            sha256=update.sha256,
            max_delta=update.max_delta or None,
            explore_std=update.explore_std,
            explore_clip=update.explore_clip,
            finetune=update.finetune,
            server_id=update.server_id,
        )

    def _ack(self, update: pb.PolicyUpdate, *, applied: bool, error: str = "") -> None:
        ack = pb.PolicyAck(
            client_id=self.client_id,
            nonce=update.nonce,
            version=update.version,
            sha256=update.sha256,
            applied=applied,
            error=error,
        )
        try:
            self._stub.AckPolicy(ack, timeout=self._ack_deadline_s, metadata=self._metadata)
        except grpc.RpcError as e:  # the next WatchPolicy open reports what runs anyway
            log.warning("AckPolicy for version %d failed: %s", update.version, e.code().name)

    def close(self) -> None:
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._thread.join(5.0)


class ExperienceQueue:
    """Transitions from the loop to the server: `put` never blocks (a full queue drops the
    transition and counts it); a background thread sends batches with ReportTransitions."""

    def __init__(
        self,
        channel: grpc.Channel,
        *,
        maxsize: int = 4096,
        batch: int = 128,  # small: building a batch holds the GIL (~5 µs a transition)
        metadata: tuple[tuple[str, str], ...] | None = None,
        deadline_s: float = 10.0,
        start: bool = True,
    ) -> None:
        if maxsize < 1 or batch < 1:
            raise ValueError("maxsize and batch must be at least 1")
        self._queue: queue.Queue[Transition] = queue.Queue(maxsize)
        self._stub = pb_grpc.ControllerStub(channel)
        self._batch = batch
        self._metadata = metadata
        self._deadline_s = deadline_s
        #: Dropped here because the queue was full; sent and accepted by the server; rejected
        #: (by the loop's own checks, or rows the server refused); dropped by the server (its
        #: queue full); lost in failed calls.
        self.dropped = 0
        self.accepted = 0
        self.rejected = 0
        self.server_dropped = 0
        self.failed = 0
        self.last_error: str | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mu-report", daemon=True)
        if start:
            self._thread.start()

    # The Sink of the loop's controller.transitions.Transitions.

    def put(self, transition: Transition) -> bool:
        """Queue one transition; False (and counted in `dropped`) when the queue is full."""
        try:
            self._queue.put_nowait(transition)
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def reject(self) -> None:
        self.rejected += 1

    def episode(self, version: int, episode_return: float) -> None:
        pass  # the return travels on the episode's last transition

    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        while not self._closed.is_set() or not self._queue.empty():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self._batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._send(batch)

    def _send(self, batch: list[Transition]) -> None:
        messages = []
        for t in batch:
            m = pb.Transition(
                obs=t.obs.tolist(),
                action=t.action.tolist(),
                reward=t.reward,
                next_obs=t.next_obs.tolist(),
                terminated=t.terminated,
                truncated=t.truncated,
                policy_version=t.version,
            )
            if t.episode_return is not None:
                m.episode_return = t.episode_return
            messages.append(m)
        try:
            reply = self._stub.ReportTransitions(
                iter(messages), timeout=self._deadline_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            self.failed += len(batch)
            why = f"ReportTransitions: {e.code().name}: {e.details()}"
            if why != self.last_error:
                log.warning("%s; %d transitions lost", why, len(batch))
            self.last_error = why
            self._closed.wait(0.5)  # the server is away: do not spin on it
            return
        self.accepted += reply.accepted - reply.dropped
        self.server_dropped += reply.dropped
        self.rejected += reply.rejected
        if reply.first_error and reply.first_error != self.last_error:
            log.warning("server rejected transitions: %s", reply.first_error)
            self.last_error = reply.first_error

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to `timeout`), then stop."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout)


class LocalClient(Client):
    """The local lane: the server ships the policy (WatchPolicy), act() evaluates it here with
    the server's action pipeline; no tick touches the network. Not thread-safe."""

    local = True

    def __init__(
        self,
        target: str,
        *,
        client_id: str | None = None,
        queue_size: int = 4096,
        seed: int = 0,
        keepalive_s: float = 5.0,
        **connection: Any,
    ) -> None:
        """Waits (up to call_deadline_s) for the first verified policy. `client_id` names this
        loop on the server (default host-pid-random); `queue_size` bounds the transitions
        waiting to be reported; `seed` seeds exploration; a server that stops answering
        keepalive pings (sent every `keepalive_s`) is dropped and reconnected to within
        2 × keepalive_s, the loop keeping its policy meanwhile. `connection`: Client's
        arguments (fallback, token, TLS, call_deadline_s, max_message_bytes)."""
        if keepalive_s < 1.0:  # the server accepts pings down to every 0.5 s
            raise ValueError(f"keepalive_s must be at least 1 s, got {keepalive_s}")
        super().__init__(target, channel_options=channel_options(keepalive_s), **connection)
        self._explorer: Explorer | None = None
        self._seed = seed
        # Both background threads start here, before any loop: one started from inside a
        # real-time loop would inherit its CPU and SCHED_FIFO priority.
        metadata = self._admin_metadata
        self.experience = ExperienceQueue(self._channel, maxsize=queue_size, metadata=metadata)
        client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.watcher = PolicyWatcher(self._channel, client_id, metadata=metadata)
        try:
            first = self.watcher.wait(timeout=self.call_deadline_s).policy
        except (TimeoutError, PermissionError):
            self.close()
            raise
        # Swaps keep the interface (controller.contract.interface_change): sized once.
        self._pipe = Pipeline(Transitions(self.experience, first.obs_dim, first.act_dim))

    @property
    def policy(self) -> LocalPolicy:
        """What the next tick runs."""
        return self.watcher.current

    @property
    def transitions_dropped(self) -> int:
        """Transitions dropped because the report queue was full."""
        return self.experience.dropped

    def act(self, obs: Sequence[float] | np.ndarray, *, episode_start: bool = False) -> np.ndarray:
        """One tick: ActStream's tick (controller.pipeline) on the policy the watcher holds.
        `episode_start`: `obs` starts an episode (the first act() and the one after report() of
        an episode's end start one anyway)."""
        active = self.watcher.current  # read once: the whole tick uses this version
        policy = active.policy
        pipe = self._pipe
        values = obs.tolist() if isinstance(obs, np.ndarray) else list(obs)
        try:
            action = policy.act_values(pipe.input(policy, values, episode_start))
        except ActError as e:
            pipe.interrupted()
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ActRefused(e.code, e.message) from None
            return self._miss(f"{e.code.name}: {e.message}")
        except ORT_ERRORS as e:
            pipe.interrupted()
            return self._miss(f"onnxruntime: {e}")
        action = pipe.output(
            policy, active.version, action, self._explorer_for(active), active.max_delta
        )
        result = np.array(action, np.float32)
        self._last = result
        self.version = active.version
        return result

    def _explorer_for(self, active: LocalPolicy) -> Explorer | None:
        """The server's exploration settings for this tick (none: std 0)."""
        if active.explore_std <= 0:
            return None
        if self._explorer is None:
            self._explorer = Explorer(
                active.explore_std, active.explore_clip, active.policy.act_dim, self._seed
            )
        self._explorer.std, self._explorer.clip = active.explore_std, active.explore_clip
        return self._explorer

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        policy = self.watcher.current.policy
        return policy.low, policy.high

    def warm(self, obs: Sequence[float] | np.ndarray) -> None:
        """Evaluate the current policy on `obs` and drop the result (no exploration, no slew
        state, nothing counted). `run_loop` calls it in the slack just before a deadline: after
        a millisecond asleep, onnxruntime's weights are out of the cache and the next act()
        costs several times what it costs warm."""
        values = obs.tolist() if isinstance(obs, np.ndarray) else list(obs)
        policy = self.watcher.current.policy
        try:
            policy.act_values(self._pipe.warm_input(policy, values))
        except (ActError, *ORT_ERRORS):  # act() will meet it, and answer it, on the tick
            pass

    def report(
        self,
        reward: float,
        next_obs: Sequence[float] | np.ndarray,
        *,
        terminated: bool = False,
        truncated: bool = False,
        applied_action: Sequence[float] | np.ndarray | None = None,
    ) -> bool:
        """What followed the last act() (reward, next observation, episode end), for the
        server's online fine-tuning. Never blocks: returns False when the transition was not
        queued (the queue is full: counted in `transitions_dropped`; values that cannot form a
        transition, or no act() before it: counted in `experience.rejected`; or the server does
        not fine-tune). `applied_action`: what the robot applied, when it changed the action
        (a policy with history holds it). An episode's end makes the next act() start one."""
        outcome = Outcome(reward, next_obs, terminated, truncated, applied_action)
        return self._pipe.close(outcome, record=self.watcher.current.finetune)

    def close(self) -> None:
        self.experience.close()
        self.watcher.close()
        super().close()
