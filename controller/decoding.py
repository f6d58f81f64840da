"""Bytes that do not decode as the request message answer INVALID_ARGUMENT, not UNKNOWN.

grpc turns an exception in a request deserializer into UNKNOWN ("Unexpected <DecodeError>").
`DecodeGuard` wraps a server while the generated `add_*Servicer_to_server` registers handlers:
every request deserializer returns an `Undecodable` marker instead of raising. Unary handlers
are wrapped to abort with INVALID_ARGUMENT on it; streaming handlers check for the marker
themselves (ActStream answers it in-band, as any bad request on that stream), so the control
path gets no extra layer per message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError


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


def _unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return guarded


def guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler with a deserializer that never raises (and unary-unary guarded)."""
    deserializer = handler.request_deserializer
    if deserializer is None:
        return handler
    owner = getattr(deserializer, "__self__", None)  # a bound Message.FromString
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "the request message")
    replaced = handler._replace(request_deserializer=_safe(deserializer, type_name))
    if handler.unary_unary is not None:
        replaced = replaced._replace(unary_unary=_unary(handler.unary_unary))
    return replaced


class DecodeGuard:
    """Pass this to a generated `add_*Servicer_to_server` in place of the grpc.aio server."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: the registered handlers below also install the generic ones (the generated
        code calls both with the same table)."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        guarded = {name: guard(h) for name, h in handlers.items()}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, guarded),)
        )
        self._server.add_registered_method_handlers(service, guarded)
