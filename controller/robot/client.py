"""The robot's clients of a mu control server, one class per lane behind one interface
(`act`, `version`, `misses`, `last_error`, `close`, and the admin calls), docs/serving.md.

`PolicyClient` (the gRPC lane): `act(obs)` asks the server and always returns within about
`deadline_s`: if the server does not answer in time (or is down), it returns a fallback action
(hold the last action, or zeros clamped into the bounds) and counts a miss, the way ros2_control
reuses the previous command when an update overruns. `controller.robot.local.LocalClient` (the
local lane): the server ships the policy (WatchPolicy) and `act(obs)` evaluates it in this
process with the server's own action pipeline; no tick touches the network. Requests the policy
refuses as invalid raise ActRefused: those are bugs to fix, not to paper over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.safety import Fallback, fallback_action

if TYPE_CHECKING:
    from typing import Self

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


class Client:
    """What both lanes share: the channel (TLS, token), the fallback, and the calls beside the
    control path. Not thread-safe: use one client per control loop."""

    #: Whether this is the local lane (run_loop reports experience and warms the policy there).
    local = False

    def __init__(
        self,
        target: str,
        *,
        fallback: Fallback = "hold",
        token: str | None = None,
        root_certificates: str | os.PathLike[str] | bytes | None = None,
        client_cert: str | os.PathLike[str] | bytes | None = None,
        client_key: str | os.PathLike[str] | bytes | None = None,
        server_name: str | None = None,
        call_deadline_s: float = 10.0,
        max_message_bytes: int = 4 * 1024 * 1024,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        """target: "HOST:PORT" or "unix:PATH". call_deadline_s bounds the calls beside act().
        TLS is on when root_certificates is given (PEM path or bytes); client_cert/client_key
        add a client certificate (mutual TLS); server_name overrides the name checked against
        the server certificate. token is sent on admin calls (and on the local lane's
        WatchPolicy/ReportTransitions: a policy file is sensitive)."""
        if call_deadline_s <= 0:
            raise ValueError("deadlines must be positive")
        if fallback not in ("hold", "zeros"):
            raise ValueError(f"fallback must be 'hold' or 'zeros', got {fallback!r}")
        if (client_cert is None) != (client_key is None):
            raise ValueError("client_cert and client_key go together")
        self.target = target
        self.call_deadline_s = call_deadline_s
        self.fallback = fallback
        #: act() calls answered with the fallback action (deadline missed or server failing).
        self.misses = 0
        #: What caused the latest miss.
        self.last_error: str | None = None
        #: The policy version that produced the last action.
        self.version = 0
        self._admin_metadata = (("authorization", f"Bearer {token}"),) if token else None
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *channel_options,
        ]
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
        self._seq = 0
        self._last: np.ndarray | None = None
        self._info: pb.PolicyInfo | None = None

    def act(self, obs: Sequence[float] | np.ndarray, *, episode_start: bool = False) -> np.ndarray:
        """The action for one observation, or the fallback action (a miss). `episode_start`:
        `obs` starts an episode (a policy with history starts it afresh, docs/serving.md)."""
        raise NotImplementedError

    def _miss(self, why: str) -> np.ndarray:
        self.misses += 1
        if self.last_error != why:
            log.warning("act() fell back to %s: %s", self.fallback, why)
        self.last_error = why
        if self.fallback == "hold" and self._last is not None:
            return self._last.copy()
        return fallback_action(self.fallback, self._last, *self._bounds())

    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """The policy's bounds, for the zeros fallback."""
        raise NotImplementedError

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
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PolicyClient(Client):
    """The gRPC lane: every act() asks the server, within `deadline_s`. With stream=True
    (ActStream), act() drives a private asyncio loop: call it from plain (non-async) code."""

    def __init__(
        self, target: str, *, deadline_s: float = 0.05, stream: bool = True, **connection: Any
    ) -> None:
        """deadline_s bounds every act(); stream=False uses unary Act. `connection`: Client's
        arguments (fallback, token, TLS, call_deadline_s, max_message_bytes)."""
        if "local" in connection:  # the one lane switch there was before LocalClient
            raise TypeError("the local lane is LocalClient(target, ...) (controller.robot.local)")
        if deadline_s <= 0:
            raise ValueError("deadlines must be positive")
        super().__init__(target, **connection)
        self.deadline_s = deadline_s
        self.use_stream = stream
        self._stream: _LockStepStream | None = None

    def act(self, obs: Sequence[float] | np.ndarray, *, episode_start: bool = False) -> np.ndarray:
        """The action for one observation, or the fallback action if the deadline is missed.
        `episode_start`: `obs` starts an episode (a policy with history starts it afresh; a
        stream's first request starts one anyway)."""
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

    def close(self) -> None:
        self._drop_stream()
        super().close()


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _status(number: int) -> grpc.StatusCode:
    return _CODES.get(number, grpc.StatusCode.UNKNOWN)
