"""The mu.v1.Controller servicer (grpc.aio).

Every request runs inline on the event loop: one onnxruntime call is ~10 µs, far less than a hop
to a worker thread would cost. Each handler reads `store.current` once and uses that policy to
the end, so a hot swap never splits a request across two versions.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Coroutine, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from controller.decoding import Undecodable
from controller.metrics import Metrics
from controller.pipeline import Pipeline
from controller.policy import ActError, Policy
from controller.proto import controller_pb2 as pb
from controller.proto import controller_pb2_grpc as pb_grpc
from controller.store import PolicyStore, SwapRefused
from controller.transitions import Outcome
from controller.watch import LocalLoops

if TYPE_CHECKING:
    from controller.finetune.manager import Finetuner

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Controller"].full_name


class MicroBatcher:
    """Runs the observations that arrive in one event-loop iteration as one onnxruntime call.

    Used only while several streams are open (a lone client is answered inline, with no added
    latency). The wait is bounded by one loop iteration: `submit` schedules the flush with
    call_soon, so every request the loop reads in the same pass joins the batch.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[Policy, Sequence[float], asyncio.Future[np.ndarray]]] = []
        #: onnxruntime calls made, and the most rows one of them carried (tests check that
        #: batches really form).
        self.calls = 0
        self.largest_batch = 0

    def submit(self, policy: Policy, obs: Sequence[float]) -> asyncio.Future[np.ndarray]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((policy, obs, future))
        return future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        # Requests in flight across a hot swap may name two policies: one call per policy.
        for policy in {id(p): p for p, _, _ in pending}.values():
            group = [(obs, f) for p, obs, f in pending if p is policy]
            self.calls += 1
            self.largest_batch = max(self.largest_batch, len(group))
            try:
                results = policy.act_rows([obs for obs, _ in group])
            except Exception as e:  # noqa: BLE001 - every awaiting handler raises it, as an
                # inline act() would; left in this callback it would hang them all
                for _, future in group:
                    if not future.cancelled():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(group, results, strict=True):
                if future.cancelled():
                    continue
                if isinstance(result, ActError):
                    future.set_exception(result)
                else:
                    future.set_result(result)


class ReadAhead:
    """A coroutine (a stream's `context.read()`) started now and finished by `await get()`;
    `arrived` turns true once what it waits on is done (the next request came).

    It is driven by hand as an asyncio Task would drive it: run to the future it waits on, and
    resumed once that future is done. A Task per request cost ~12 µs of event-loop time per
    message (a task step and a loop pass more); this costs what awaiting the read did. The
    done-callback that sets `arrived` runs in the order the loop completed the futures, so a
    request that came after the reply's write completed is never seen as there before it.
    """

    __slots__ = ("_coro", "_waiting", "_result", "arrived")

    def __init__(self, coro: Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self.arrived = False
        self._result: Any = _RUNNING
        self._step()

    def _step(self) -> None:
        try:
            waiting = self._coro.send(None)
        except StopIteration as e:
            self._waiting, self._result, self.arrived = None, e.value, True
            return
        self._waiting = waiting
        if asyncio.isfuture(waiting):
            waiting.add_done_callback(self._arrive)

    def _arrive(self, _: Any) -> None:
        self.arrived = True

    async def get(self) -> Any:
        """The coroutine's result (or its exception)."""
        while self._result is _RUNNING:
            waiting = self._waiting
            if waiting is None:  # a bare yield: run again on the next loop pass, as a Task does
                await asyncio.sleep(0)
            elif not waiting.done():
                waiting._asyncio_future_blocking = False  # as Task does before waiting on it
                try:
                    await waiting
                except asyncio.CancelledError:
                    if not waiting.cancelled():  # this task is cancelled, not the read
                        raise
                except Exception:  # noqa: BLE001 - the coroutine raises it when resumed
                    pass
            self._step()
        return self._result

    def close(self) -> None:
        """Abandon the read, as cancelling its Task would (the future it waits on included)."""
        if self._result is _RUNNING:
            self._result = None
            waiting = self._waiting
            if asyncio.isfuture(waiting) and not waiting.cancel() and not waiting.cancelled():
                waiting.exception()  # done: retrieved, so an error is not logged as unhandled
            self._coro.close()


_RUNNING = object()


class ControllerService(pb_grpc.ControllerServicer):
    def __init__(
        self,
        store: PolicyStore,
        metrics: Metrics,
        *,
        max_delta: float | None = None,
        admin_token: str | None = None,
        batching: bool = True,
        finetune: Finetuner | None = None,
    ) -> None:
        self._store = store
        self._finetune = finetune
        self._metrics = metrics
        self._max_delta = max_delta
        #: None when batching is off.
        self.batcher = MicroBatcher() if batching else None
        self._open_streams = 0
        #: ActStreams whose last reply was awaited by their client (see ActStream).
        self._lock_step_streams = 0
        #: ActStream pauses of streams writing ahead of their replies (see _run_ahead).
        self.paused_streams = 0
        #: The local-lane loops (WatchPolicy) and what each runs.
        self.local_loops = LocalLoops()
        self._expected_auth = None if admin_token is None else f"Bearer {admin_token}".encode()

    async def Act(
        self, request: pb.ActRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActResponse:
        t0 = perf_counter()
        policy = self._store.current
        try:
            action = policy.act_values(request.obs)
        except ActError as e:
            refused = e.code, e.message  # answered outside the except: see refuse()
        else:
            reply = pb.ActResponse(action=action, seq=request.seq, policy_version=policy.version)
            self._metrics.ok("Act", perf_counter() - t0)
            return reply
        await refuse(context, refused, self._metrics, "Act", t0)

    async def ActStream(
        self, request_iterator: AsyncIterator[pb.ActRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ActResponse]:
        store, metrics, delta, batcher = self._store, self._metrics, self._max_delta, self.batcher
        finetune = self._finetune
        # Experience steers what the robot will do: only a trusted caller's is learned from, and
        # only a trusted stream explores (noise on actions nobody learns from is pure cost).
        trusted = self._token_given(context) is True
        # The same tick as the local lane's (controller.pipeline).
        pipe = Pipeline(None if finetune is None else finetune.stream(trusted, context.peer()))
        explorer = None if finetune is None or not trusted else finetune.explorer
        # The next request is read while this one is answered (context.read, not the iterator):
        # when that read has completed before the reply went out, the client sent the request
        # without waiting for the reply. A lock-step client never does (it cannot have seen the
        # reply yet); a stream that does it MAX_AHEAD times in a row writes ahead of its replies
        # (a client that does not read them, or pipelines) and, while a lock-step stream is
        # open, is paused: see _run_ahead.
        read = context.read
        pending = ReadAhead(read())
        # lock_step: counted in self._lock_step_streams (its replies are awaited, level 0);
        # ahead: replies in a row sent with the next request there; level: how far into its
        # pauses the stream is (0 to _MAX_LEVEL); pauses: how many it took in all.
        lock_step = False
        ahead = level = pauses = 0
        self._open_streams += 1
        try:
            while (request := await pending.get()) is not grpc.aio.EOF:
                pending = ReadAhead(read())
                t0 = perf_counter()
                policy = store.current
                if type(request) is Undecodable:  # in-band, like any refused request
                    metrics.error("ActStream", grpc.StatusCode.INVALID_ARGUMENT, 0.0)
                    pipe.interrupted()
                    reply = pb.ActResponse(
                        policy_version=policy.version,
                        error=pb.Error(code=_INVALID, message=request.message),
                    )
                else:
                    if request.HasField("reward"):
                        pipe.close(request_outcome(request))
                    try:
                        obs = pipe.input(
                            policy,
                            request.obs,
                            request.episode_start or request.terminated or request.truncated,
                            request.applied_action if len(request.applied_action) else None,
                        )
                        if batcher is not None and self._open_streams > 1:
                            action = (await batcher.submit(policy, obs)).tolist()
                        else:
                            action = policy.act_values(obs)
                    except ActError as e:
                        # In-band: this request is refused, the stream stays up for the next one.
                        metrics.error("ActStream", e.code, perf_counter() - t0)
                        pipe.interrupted()
                        reply = pb.ActResponse(
                            seq=request.seq,
                            policy_version=policy.version,
                            error=pb.Error(code=e.code.value[0], message=e.message),
                        )
                    else:
                        explore = explorer if explorer is not None and finetune.learning else None
                        action = pipe.output(policy, policy.version, action, explore, delta)
                        reply = pb.ActResponse(
                            action=action, seq=request.seq, policy_version=policy.version
                        )
                        if explore is not None:
                            reply.explored = True
                        metrics.ok("ActStream", perf_counter() - t0)
                yield reply
                if not pending.arrived:  # lock-step: the client is waiting for this reply
                    if level:  # one step back from the pauses (a flood can lag once)
                        ahead, level = 0, level - 1
                    elif not lock_step:
                        ahead, lock_step = 0, True
                        self._lock_step_streams += 1
                    continue
                if lock_step:
                    lock_step = False
                    self._lock_step_streams -= 1
                ahead += 1
                # MAX_AHEAD, halved by each pause in a row, down to one. With no lock-step stream
                # to protect, the pause is skipped but counted: one that opens later finds this
                # stream already at its longest pause, not at its first.
                if ahead >= MAX_AHEAD >> level:
                    ahead, level = 0, min(level + 1, _MAX_LEVEL)
                    if self._lock_step_streams:
                        pauses += 1
                        await self._run_ahead(context, level, pauses == 1)
        finally:
            self._open_streams -= 1
            if lock_step:
                self._lock_step_streams -= 1
            pending.close()
            if pauses:
                log.info("ActStream from %s ended; it was paused %d times", context.peer(), pauses)

    async def _run_ahead(self, context: grpc.aio.ServicerContext, level: int, first: bool) -> None:
        """Pause a stream that writes ahead of its replies, at `level` (1 to _MAX_LEVEL), while a
        lock-step stream is open: it is not read from meanwhile, so it costs the event loop
        nothing and, once its flow-control window is full, its client blocks. Pauses double from
        FIRST_PAUSE_S to MAX_PAUSE_S, and the replies allowed between two halve from MAX_AHEAD to
        one, while it goes on; each request that waits for its reply takes a level off."""
        self.paused_streams += 1
        self._metrics.run_ahead()
        if first:  # once per stream
            log.warning(
                "ActStream from %s: %d requests in a row arrived before their replies were "
                "sent; pausing it (ActStream is lock-step: read each reply before sending the "
                "next request)",
                context.peer(),
                MAX_AHEAD,
            )
        # A paused stream sends nothing to batch: the others are answered as if it were closed.
        self._open_streams -= 1
        try:
            await asyncio.sleep(min(FIRST_PAUSE_S * 2 ** (level - 1), MAX_PAUSE_S))
        finally:
            self._open_streams += 1

    async def ActBatch(
        self, request: pb.ActBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActBatchResponse:
        t0 = perf_counter()
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the batch ran"
            )
        policy = self._store.current
        try:
            actions = policy.act_batch(request.obs, request.batch_size)
        except ActError as e:
            refused = e.code, e.message  # answered outside the except: see refuse()
        else:
            reply = pb.ActBatchResponse(
                batch_size=request.batch_size,
                act_dim=policy.act_dim,
                seq=request.seq,
                policy_version=policy.version,
            )
            reply.MergeFromString(packed_floats(_ACTIONS_FIELD, actions))
            self._metrics.ok("ActBatch", perf_counter() - t0)
            return reply
        await refuse(context, refused, self._metrics, "ActBatch", t0)

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.PolicyInfo:
        return self._info(self._store.current)

    async def LoadPolicy(
        self, request: pb.LoadPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.PolicyInfo:
        await self._authorize(context, "LoadPolicy")
        source = request.WhichOneof("source")
        try:
            if source == "path":
                policy = await self._store.load_path(request.path)
            elif source == "onnx":
                policy = await self._store.load_bytes(request.onnx)
            else:
                raise SwapRefused(
                    grpc.StatusCode.INVALID_ARGUMENT, "LoadPolicy needs `path` or `onnx`"
                )
        except SwapRefused as e:
            refused = e.code, e.message  # answered outside the except: see refuse()
        else:
            return self._info(policy)
        await refuse(context, refused)

    async def RollbackPolicy(
        self, request: pb.RollbackPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.PolicyInfo:
        await self._authorize(context, "RollbackPolicy")
        try:
            if self._finetune is not None:  # also stops judging, and moves the restart pointer
                policy = await self._finetune.rollback()
            else:
                policy = await self._store.rollback()
        except SwapRefused as e:
            refused = e.code, e.message  # answered outside the except: see refuse()
        else:
            return self._info(policy)
        await refuse(context, refused)

    async def ReportTransitions(
        self, request_iterator: AsyncIterator[pb.Transition], context: grpc.aio.ServicerContext
    ) -> pb.ReportTransitionsResponse:
        finetune = await self._finetuning(context, "ReportTransitions")
        reply = pb.ReportTransitionsResponse()
        dropped_before = finetune.counters.dropped
        async for t in request_iterator:
            if type(t) is Undecodable:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, t.message)
            # The local lane's episode return, for the rollback monitor, on its last transition.
            ended = (
                t.policy_version and t.HasField("episode_return") and (t.terminated or t.truncated)
            )
            error = finetune.report_transition(
                t.obs, t.action, t.reward, t.next_obs, t.terminated, t.truncated,
                episode=(t.policy_version, t.episode_return) if ended else None,
            )  # fmt: skip
            if error is None:
                reply.accepted += 1
            else:
                reply.rejected += 1
                if not reply.first_error:
                    reply.first_error = f"transition {reply.accepted + reply.rejected}: {error}"
        finetune.sink.flush()
        # Drops are counted per chunk, so they may include rows other callers reported.
        reply.dropped = min(finetune.counters.dropped - dropped_before, reply.accepted)
        return reply

    async def PauseFinetuning(
        self, request: pb.FinetuneControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.FinetuneStatus:
        finetune = await self._finetuning(context, "PauseFinetuning")
        finetune.pause()
        return pb.FinetuneStatus(**finetune.status())

    async def ResumeFinetuning(
        self, request: pb.FinetuneControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.FinetuneStatus:
        finetune = await self._finetuning(context, "ResumeFinetuning")
        finetune.resume()
        return pb.FinetuneStatus(**finetune.status())

    async def GetFinetuneStatus(
        self, request: pb.FinetuneControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.FinetuneStatus:
        finetune = await self._finetuning(context, "GetFinetuneStatus")
        return pb.FinetuneStatus(**finetune.status())

    async def WatchPolicy(
        self, request: pb.WatchPolicyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PolicyUpdate]:
        await self._authorize(context, "WatchPolicy")
        if type(request) is Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if not request.client_id:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "WatchPolicy needs a client_id naming the loop (e.g. host and process id)",
            )
        store, loops, finetune = self._store, self.local_loops, self._finetune
        refused = loops.opened(request, context.peer())
        if refused is not None:
            await context.abort(*refused)
        self._metrics.set_local_loops(loops.connected())
        try:
            seen = -1
            while True:
                if store.generation != seen:
                    seen = store.generation
                    exploring = finetune is not None and finetune.learning
                    yield loops.update(
                        store.current,
                        max_delta=self._max_delta,
                        explore_std=finetune.cfg.explore_std if exploring else 0.0,
                        explore_clip=finetune.cfg.explore_clip if finetune is not None else 0.0,
                        finetune=finetune is not None,
                    )
                await store.changed(seen)
        finally:
            loops.closed(request.client_id)
            self._metrics.set_local_loops(loops.connected())

    async def AckPolicy(
        self, request: pb.PolicyAck, context: grpc.aio.ServicerContext
    ) -> pb.AckPolicyResponse:
        await self._authorize(context, "AckPolicy")
        error = self.local_loops.ack(request, context.peer())
        if error is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return pb.AckPolicyResponse()

    async def _finetuning(self, context: grpc.aio.ServicerContext, method: str) -> Finetuner:
        """The fine-tuning RPCs: admin token, and the server must run with --finetune."""
        await self._authorize(context, method)
        if self._finetune is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{method}: fine-tuning is off; start the server with --finetune CHECKPOINT",
            )
        return self._finetune

    def _token_given(self, context: grpc.aio.ServicerContext) -> bool | None:
        """Whether the caller is trusted: it sent `authorization: Bearer <token>` with the admin
        token, or the server has none. None: it sent no authorization metadata at all."""
        if self._expected_auth is None:
            return True
        given = next((v for k, v in context.invocation_metadata() if k == "authorization"), None)
        if given is None:
            return None
        given_bytes = given.encode() if isinstance(given, str) else given
        return hmac.compare_digest(given_bytes, self._expected_auth)

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str) -> None:
        """Admin RPCs need `authorization: Bearer <token>` when the server has a token."""
        trusted = self._token_given(context)
        if trusted is None:
            log.warning("%s from %s refused: no authorization metadata", method, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs metadata 'authorization: Bearer <token>'",
            )
        if not trusted:
            log.warning("%s from %s refused: wrong token", method, context.peer())
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method}: wrong admin token")

    def _info(self, policy: Policy) -> pb.PolicyInfo:
        meta = policy.metadata
        loaded_at = Timestamp()
        loaded_at.FromNanoseconds(int(policy.loaded_at * 1e9))
        previous = self._store.previous
        return pb.PolicyInfo(
            version=policy.version,
            env_id=policy.env_id,
            obs_dim=policy.obs_dim,
            act_dim=policy.act_dim,
            action_low=policy.low.tolist(),
            action_high=policy.high.tolist(),
            obs_layout=[pb.ObsField(name=n, size=s) for n, s in policy.obs_layout],
            algo=meta.get("mu.algo", ""),
            train_steps=_to_int(meta.get("mu.train_steps", "")),
            eval_return=_to_float(meta.get("mu.eval_return", "")),
            created_utc=meta.get("mu.created_utc", ""),
            loaded_at=loaded_at,
            source=policy.source,
            sha256=policy.sha256,
            max_delta=self._max_delta or 0.0,
            previous_version=0 if previous is None else previous.version,
            metadata=meta,
            local_loops=self.local_loops.snapshot(),
        )


_INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]

#: ActStream: replies in a row sent with the stream's next request already there, before the
#: stream is paused; its pauses, doubling from the first to the longest while it goes on (the
#: replies allowed between two pauses halve, down to one).
MAX_AHEAD = 16
FIRST_PAUSE_S = 0.001
MAX_PAUSE_S = 1.0
_MAX_LEVEL = int(MAX_PAUSE_S / FIRST_PAUSE_S).bit_length() + 1  # its pause is MAX_PAUSE_S


def request_outcome(request: pb.ActRequest) -> Outcome:
    """What request t+1 reports about step t (the proto's convention): r_t; s_{t+1}, which is
    `obs` unless the episode ended, then `final_obs` (a termination never uses it: `obs` will
    do; a truncation without it cannot bootstrap: None); terminated, truncated; and the
    applied action when the robot changed the served one."""
    terminated, truncated = request.terminated, request.truncated
    if not (terminated or truncated):
        next_obs: Sequence[float] | None = request.obs
    elif len(request.final_obs):
        next_obs = request.final_obs
    else:
        next_obs = request.obs if terminated else None
    applied = request.applied_action if len(request.applied_action) else None
    return Outcome(request.reward, next_obs, terminated, truncated, applied)


_ACTIONS_FIELD = pb.ActBatchResponse.DESCRIPTOR.fields_by_name["actions"].number


async def refuse(
    context: grpc.aio.ServicerContext,
    error: tuple[grpc.StatusCode, str],
    metrics: Metrics | None = None,
    method: str = "",
    t0: float = 0.0,
) -> NoReturn:
    """End a refused RPC with `error` (code, message), counted in `metrics` under `method`.

    Call it outside any `except` block, with the code and message only: an abort raised inside
    one chains the exception, whose traceback holds the handler's frame and so the request,
    into a reference cycle that only the cyclic collector frees (400 refused 4 MB Acts took a
    server from 95 MB to 1.9 GB that way).
    """
    if metrics is not None:
        metrics.error(method, error[0], perf_counter() - t0)
    await context.abort(*error)


def packed_floats(field: int, values: np.ndarray) -> bytes:
    """`values` as float32 field `field` of a message, in protobuf wire format: a reply merges
    it with MergeFromString, which copies the bytes once in C, where assigning a list made a
    Python float per value (seconds, and tens of MB, for a large batch)."""
    data = np.ascontiguousarray(values, "<f4").tobytes()
    return _varint(field << 3 | 2) + _varint(len(data)) + data  # wire type 2: packed


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _to_int(text: str) -> int:
    try:
        return max(int(float(text)), 0)
    except (ValueError, OverflowError):  # not a number, NaN, or infinite ("1e999")
        return 0


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0
