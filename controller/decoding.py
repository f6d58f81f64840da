"""Bytes that do not decode as the request message answer INVALID_ARGUMENT, not UNKNOWN.

grpc turns an exception in a request deserializer into UNKNOWN ("Unexpected <DecodeError>").
`DecodeGuard` wraps a server while the generated `add_*Servicer_to_server` registers handlers:
every request deserializer returns an `Undecodable` marker instead of raising. Unary-unary
handlers are wrapped to abort with INVALID_ARGUMENT on it; our streaming handlers check for the
marker themselves (ActStream answers it in-band, as any bad request on that stream), so the
control path gets no extra layer per message. Servicers that are not ours (health,
reflection) know nothing of the marker: `DecodeGuard(server, streams=True)` wraps every kind of
handler, streamed requests included.
"""

from __future__ import annotations

import inspect
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError


def clipped(text: str, limit: int = 200) -> str:
    """`text` cut to `limit` characters, saying how many were cut: what a client sent goes into
    messages, logs and replies no longer than this."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters]"


class Undecodable:
    """Stands in for a request whose bytes did not parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _safe(deserializer: Callable[[bytes], Any] | None, type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)  # type: ignore[misc]
        except DecodeError as e:
            return Undecodable(
                f"the request ({len(data)} bytes) does not decode as {type_name}: {e}"
            )

    return deserialize


async def _checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
    if type(request) is Undecodable:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request


async def _each_checked(requests: Any, context: grpc.aio.ServicerContext) -> Any:
    async for request in requests:
        yield await _checked(request, context)


def _guarded(behavior: Callable[..., Any], streamed: bool) -> Callable[..., Any]:
    """`behavior` aborting on an Undecodable request (each one, for a request stream); keeps
    its kind (coroutine or async generator), which grpc.aio dispatches on."""

    async def requests(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return _each_checked(request, context) if streamed else await _checked(request, context)

    if inspect.isasyncgenfunction(behavior):

        async def each_reply(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async for reply in behavior(await requests(request, context), context):
                yield reply

        return each_reply

    async def reply(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = behavior(await requests(request, context), context)
        del request  # from here only the handler's frame holds it
        try:
            return await call
        except BaseException as e:
            # grpc keeps an abort's exception in a reference cycle with the RPC's state, and the
            # exception's traceback holds the handler's frames and so the request: without
            # this, every refused request stayed in memory until the cyclic collector ran.
            traceback.clear_frames(e.__traceback__)
            raise

    return reply


def guard(handler: grpc.RpcMethodHandler, streams: bool = False) -> grpc.RpcMethodHandler:
    """The same handler with a deserializer that never raises, and unary-unary guarded (with
    `streams`, every kind)."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    owner = getattr(deserializer, "__self__", None)  # a bound Message.FromString
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request message")
    replaced = handler._replace(request_deserializer=_safe(deserializer, type_name))
    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    for kind in kinds if streams else kinds[:1]:
        behavior = getattr(handler, kind)
        if behavior is not None:
            replaced = replaced._replace(**{kind: _guarded(behavior, kind.startswith("stream"))})
    return replaced


class DecodeGuard:
    """Pass this to a generated `add_*Servicer_to_server` in place of the grpc.aio server."""

    def __init__(self, server: grpc.aio.Server, *, streams: bool = False) -> None:
        self._server = server
        self._streams = streams

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the registered handlers below also install the generic ones (the generated
        code calls both with the same table)."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        guarded = {name: guard(h, self._streams) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self._server.add_registered_method_handlers(service, guarded)
