"""PolicyClient: what a robot loop calls to get actions from a mu control server.

Two lanes (docs/serving.md). The gRPC lane (default): `act(obs)` asks the server and always
returns within about `deadline_s`: if the server does not answer in time (or is down), it returns
a fallback action (hold the last action, or zeros clamped into the bounds) and counts a miss, the
way ros2_control reuses the previous command when an update overruns. The local lane
(`local=True`): the server ships the policy (WatchPolicy) and `act(obs)` evaluates it in this
process with the server's own validation and safety code; no tick touches the network.
Requests the policy refuses as invalid raise ActRefused: those are bugs to fix, not to paper over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from controller.explore import Explorer
from controller.pipeline import Pipeline
from controller.policy import ORT_ERRORS, ActError
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.robot.local import ExperienceQueue, LocalPolicy, PolicyWatcher, channel_options
from controller.safety import Fallback, fallback_action
from controller.transitions import Outcome, Transitions

log = logging.getLogger(__name__)
# A stream that misses this many deadlines in a row is torn down and opened again.
MAX_STREAM_MISSES = 3


class ActRefused(ValueError):
    """The server refused the observation (INVALID_ARGUMENT): wrong length, NaN, empty."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _StreamClosed(Exception):
    """The server ended the ActStream."""


class _StepTimeout(Exception):
    """No reply to this step within its deadline."""


class _LockStepStream:
    """One ActStream call: write a request, wait (bounded) for the reply with the same seq.

    The call lives on a grpc.aio channel driven by a private event loop that runs only inside
    roundtrip(), in the caller's thread: the per-step deadline costs a timer on that loop, not a
    hop through a reader thread (~80 µs on 2 cores). A read still pending when a step times out
    is kept and awaited by the next step, so late replies are matched by seq and dropped.
    """

    def __init__(self, target: str, options: list[tuple[str, Any]], credentials: Any) -> None:
        self._loop = _thread_loop()
        self._channel, self._call = self._loop.run_until_complete(
            self._open(target, options, credentials)
        )
        self._pending: asyncio.Future[Any] | None = None
        self.misses_in_a_row = 0

    @staticmethod
    async def _open(
        target: str, options: list[tuple[str, Any]], credentials: Any
    ) -> tuple[grpc.aio.Channel, Any]:
        if credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options)
        else:
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        return channel, pb_grpc.ControllerStub(channel).ActStream()

    def roundtrip(self, request: pb.ActRequest, timeout: float) -> pb.ActResponse:
        """Raises _StepTimeout on a missed deadline, grpc.RpcError / _StreamClosed when broken."""
        return self._loop.run_until_complete(self._roundtrip(request, timeout))

    async def _roundtrip(self, request: pb.ActRequest, timeout: float) -> pb.ActResponse:
        loop = self._loop
        deadline = loop.time() + timeout
        # Post the read before the write: the reply then completes an operation already waiting,
        # instead of one started only after the write's own completion came back to this loop.
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._call.read())
        await self._call.write(request)
        while True:
            if self._pending is None:
                self._pending = asyncio.ensure_future(self._call.read())
            done, _ = await asyncio.wait((self._pending,), timeout=max(deadline - loop.time(), 0))
            if not done:
                raise _StepTimeout
            reply, self._pending = self._pending.result(), None
            if reply is grpc.aio.EOF:
                raise _StreamClosed("the server ended the stream")
            if reply.seq == request.seq:
                return reply

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
        self._call.cancel()
        self._loop.run_until_complete(self._channel.close())


_local = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's private event loop for ActStream calls, kept for the thread's lifetime:
    gRPC's poller may still deliver events for a closed channel, and would fail on a closed loop.
    """
    loop = getattr(_local, "loop", None)
    if loop is None:
        loop = _local.loop = asyncio.new_event_loop()
    return loop


def _read(value: str | os.PathLike[str] | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class PolicyClient:
    """A connection to one control server. Not thread-safe: use one client per control loop.

    With stream=True, act() drives a private asyncio loop: call it from plain (non-async) code.
    """

    def __init__(
        self,
        target: str,
        *,
        deadline_s: float = 0.05,
        stream: bool = True,
        fallback: Fallback = "hold",
        token: str | None = None,
        root_certificates: str | os.PathLike[str] | bytes | None = None,
        client_cert: str | os.PathLike[str] | bytes | None = None,
        client_key: str | os.PathLike[str] | bytes | None = None,
        server_name: str | None = None,
        call_deadline_s: float = 10.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        local: bool = False,
        client_id: str | None = None,
        queue_size: int = 4096,
        seed: int = 0,
        keepalive_s: float = 5.0,
    ) -> None:
        """target: "HOST:PORT" or "unix:PATH". deadline_s bounds every act(); call_deadline_s
        bounds the other calls. TLS is on when root_certificates is given (PEM path or bytes);
        client_cert/client_key add a client certificate (mutual TLS); server_name overrides the
        name checked against the server certificate. token is sent on admin calls only (and on
        WatchPolicy/ReportTransitions in the local lane: a policy file is sensitive).

        local=True: the local lane. The constructor waits (up to call_deadline_s) for the first
        verified policy; `client_id` names this loop on the server (default host-pid-random);
        `queue_size` bounds the transitions waiting to be reported; `seed` seeds exploration;
        a server that stops answering keepalive pings (sent every `keepalive_s`) is dropped and
        reconnected to within 2 × keepalive_s, the loop keeping its policy meanwhile.
        """
        if deadline_s <= 0 or call_deadline_s <= 0:
            raise ValueError("deadlines must be positive")
        if fallback not in ("hold", "zeros"):
            raise ValueError(f"fallback must be 'hold' or 'zeros', got {fallback!r}")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        self.target = target
        self.deadline_s = deadline_s
        self.call_deadline_s = call_deadline_s
        self.use_stream = stream
        self.fallback = fallback
        #: act() calls answered with the fallback action (deadline missed or server failing).
        self.misses = 0
        #: What caused the latest miss.
        self.last_error: str | None = None
        self._admin_metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if local:
            if keepalive_s < 1.0:  # the server accepts pings down to every 0.5 s
                raise ValueError(f"keepalive_s must be at least 1 s, got {keepalive_s}")
            options += channel_options(keepalive_s)
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        self._options = options
        self._credentials: grpc.ChannelCredentials | None = None
        if root_certificates is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(root_certificates),
                private_key=_read(client_key),
                certificate_chain=_read(client_cert),
            )
            self._channel = grpc.secure_channel(target, self._credentials, options=options)
        self._stub = pb_grpc.ControllerStub(self._channel)
        self._stream: _LockStepStream | None = None
        self._seq = 0
        self._last: np.ndarray | None = None
        self._info: pb.PolicyInfo | None = None
        #: The policy version that produced the last action.
        self.version = 0
        # The local lane.
        self.local = local
        self._metadata = self._admin_metadata
        self._watcher: PolicyWatcher | None = None
        self._explorer: Explorer | None = None
        self._seed = seed
        self._pipe = Pipeline()
        # Both background threads start here, before any loop: one started from inside a
        # real-time loop would inherit its CPU and SCHED_FIFO priority.
        self._experience: ExperienceQueue | None = None
        if local:
            self._experience = ExperienceQueue(
                self._channel, maxsize=queue_size, metadata=self._metadata
            )
            client_id = client_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
            self._watcher = PolicyWatcher(self._channel, client_id, metadata=self._metadata)
            try:
                first = self._watcher.wait(timeout=call_deadline_s).policy
            except (TimeoutError, PermissionError):
                self.close()
                raise
            # Swaps keep the interface (controller.contract.interface_change): sized once.
            self._pipe = Pipeline(Transitions(self._experience, first.obs_dim, first.act_dim))

    # -- the control path -------------------------------------------------------------------------

    def act(self, obs: Sequence[float] | np.ndarray, *, episode_start: bool = False) -> np.ndarray:
        """The action for one observation, or the fallback action if the deadline is missed.
        `episode_start`: `obs` starts an episode (a policy with history starts it afresh; the
        first act() and the one after report() of an episode's end start one anyway)."""
        if self._watcher is not None:
            return self._local_act(obs, episode_start)
        self._seq += 1
        values = obs.tolist() if isinstance(obs, np.ndarray) else obs
        request = pb.ActRequest(obs=values, seq=self._seq, episode_start=episode_start)
        try:
            reply = self._stream_act(request) if self.use_stream else self._unary_act(request)
        except _StepTimeout:
            return self._miss(f"no reply within {self.deadline_s * 1e3:.3g} ms")
        except _StreamClosed as e:
            return self._miss(str(e))
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ActRefused(code, e.details()) from None
            return self._miss(f"{code.name}: {e.details()}")
        if reply.HasField("error"):
            code = _status(reply.error.code)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ActRefused(code, reply.error.message)
            return self._miss(f"{code.name}: {reply.error.message}")
        action = np.asarray(reply.action, dtype=np.float32)
        self._last = action
        self.version = reply.policy_version
        return action

    def _local_act(self, obs: Sequence[float] | np.ndarray, episode_start: bool) -> np.ndarray:
        """One tick of the local lane: ActStream's tick (controller.pipeline) on the policy the
        watcher holds. No network."""
        active = self._watcher.current  # read once: the whole tick uses this version
        policy = active.policy
        pipe = self._pipe
        values = obs.tolist() if isinstance(obs, np.ndarray) else list(obs)
        try:
            action = policy.act_values(pipe.input(policy, values, episode_start))
        except ActError as e:
            pipe.interrupted()
            if e.code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ActRefused(e.code, e.message) from None
            return self._miss(f"{e.code.name}: {e.message}", active)
        except ORT_ERRORS as e:
            pipe.interrupted()
            return self._miss(f"onnxruntime: {e}", active)
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

    def warm(self, obs: Sequence[float] | np.ndarray) -> None:
        """Local lane: evaluate the current policy on `obs` and drop the result (no exploration,
        no slew state, nothing counted). `run_loop` calls it in the slack just before a deadline:
        after a millisecond asleep, onnxruntime's weights are out of the cache and the next
        act() costs several times what it costs warm."""
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
        """Local lane: what followed the last act() (reward, next observation, episode end), for
        the server's online fine-tuning. Never blocks: returns False when the transition was not
        queued (the queue is full: counted in `transitions_dropped`; values that cannot form a
        transition, or no act() before it: counted in `experience.rejected`; or the server does
        not fine-tune). `applied_action`: what the robot applied, when it changed the action
        (a policy with history holds it). An episode's end makes the next act() start one."""
        if self._watcher is None:
            raise RuntimeError(
                "report() is the local lane's; on ActStream, send the reward on the next request"
            )
        outcome = Outcome(reward, next_obs, terminated, truncated, applied_action)
        return self._pipe.close(outcome, record=self._watcher.current.finetune)

    @property
    def transitions_dropped(self) -> int:
        """Local lane: transitions dropped because the report queue was full."""
        return 0 if self._experience is None else self._experience.dropped

    @property
    def experience(self) -> ExperienceQueue | None:
        """Local lane: the report queue (its counters); None on the gRPC lane."""
        return self._experience

    @property
    def watcher(self) -> PolicyWatcher:
        """Local lane: the policy watcher (applied / refused counts, wait())."""
        if self._watcher is None:
            raise RuntimeError("watcher: this client is on the gRPC lane (local=False)")
        return self._watcher

    @property
    def policy(self) -> LocalPolicy:
        """Local lane: what the next tick runs."""
        return self.watcher.current

    def _unary_act(self, request: pb.ActRequest) -> pb.ActResponse:
        return self._stub.Act(request, timeout=self.deadline_s)

    def _stream_act(self, request: pb.ActRequest) -> pb.ActResponse:
        if self._stream is None:
            self._stream = _LockStepStream(self.target, self._options, self._credentials)
        stream = self._stream
        try:
            reply = stream.roundtrip(request, self.deadline_s)
        except _StepTimeout:
            stream.misses_in_a_row += 1
            if stream.misses_in_a_row >= MAX_STREAM_MISSES:
                self._drop_stream()
            raise
        except (grpc.RpcError, _StreamClosed):
            self._drop_stream()  # reconnect on the next act()
            raise
        stream.misses_in_a_row = 0
        return reply

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def _miss(self, why: str, active: LocalPolicy | None = None) -> np.ndarray:
        self.misses += 1
        if self.last_error != why:
            log.warning("act() fell back to %s: %s", self.fallback, why)
        self.last_error = why
        if active is not None:
            low, high = active.policy.low, active.policy.high
        elif self.fallback == "hold" and self._last is not None:
            return self._last.copy()
        else:
            low, high = self._bounds()
        return fallback_action(self.fallback, self._last, low, high)

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The bounds for the zeros fallback. They come from get_policy(): call it before the
        control loop starts, so that a fallback never has to ask a server that is not answering."""
        if self._info is None:
            try:
                self._info = self._stub.GetPolicy(pb.GetPolicyRequest(), timeout=self.deadline_s)
            except grpc.RpcError as e:
                raise RuntimeError(
                    "no fallback action: the policy's bounds are unknown and the server does not "
                    f"answer ({e.code().name}); call get_policy() before the control loop"
                ) from e
        info = self._info
        return np.asarray(info.action_low, np.float32), np.asarray(info.action_high, np.float32)

    # -- everything else --------------------------------------------------------------------------

    def get_policy(self) -> pb.PolicyInfo:
        """What the server serves (and the bounds the fallback uses). Raises grpc.RpcError."""
        self._info = self._stub.GetPolicy(pb.GetPolicyRequest(), timeout=self.call_deadline_s)
        return self._info

    def act_batch(self, obs: np.ndarray, *, deadline_s: float | None = None) -> np.ndarray:
        """Actions (n, act_dim) for observations (n, obs_dim). Raises grpc.RpcError."""
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2:
            raise ValueError(f"act_batch needs observations of shape (n, obs_dim), got {obs.shape}")
        self._seq += 1
        reply = self._stub.ActBatch(
            pb.ActBatchRequest(obs=obs.ravel().tolist(), batch_size=len(obs), seq=self._seq),
            timeout=deadline_s or self.call_deadline_s,
        )
        return np.asarray(reply.actions, dtype=np.float32).reshape(reply.batch_size, reply.act_dim)

    def load_policy(
        self, source: str | os.PathLike[str] | bytes, *, upload: bool = False
    ) -> pb.PolicyInfo:
        """Hot-swap the served policy: bytes, a path the *server* reads, or (upload=True) a local
        file sent as bytes. Needs the admin token. Raises grpc.RpcError."""
        if isinstance(source, bytes):
            request = pb.LoadPolicyRequest(onnx=source)
        elif upload:
            request = pb.LoadPolicyRequest(onnx=Path(source).read_bytes())
        else:
            request = pb.LoadPolicyRequest(path=os.fspath(source))
        self._info = self._stub.LoadPolicy(
            request, timeout=self.call_deadline_s, metadata=self._admin_metadata
        )
        return self._info

    def rollback(self) -> pb.PolicyInfo:
        """Serve the previous policy again. Needs the admin token. Raises grpc.RpcError."""
        self._info = self._stub.RollbackPolicy(
            pb.RollbackPolicyRequest(), timeout=self.call_deadline_s, metadata=self._admin_metadata
        )
        return self._info

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected; grpc.FutureTimeoutError otherwise."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def close(self) -> None:
        if self._experience is not None:
            self._experience.close()
        if self._watcher is not None:
            self._watcher.close()
        self._drop_stream()
        self._channel.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
