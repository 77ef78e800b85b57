"""The one place where kvstore errors become gRPC statuses.

Every handler is wrapped: a :class:`kvstore.errors.KVStoreError` aborts the
call with the status code its class names, its message as the details and the
class name in the ``kvstore-error`` trailing metadata (the SDK maps it back to
the same class). Anything else is a bug: logged with its traceback and
reported as INTERNAL, and the server keeps serving.

Two things happen outside a handler in grpc.aio, so they are wrapped too:

* Request bodies are deserialised before the handler runs, and a body that
  protobuf cannot parse (garbage, invalid UTF-8 in a string field) would end
  as UNKNOWN with an ERROR traceback per call. For every unary request the
  wrapped deserialiser hands the handler an :class:`Undecodable` marker
  instead, which the handler turns into
  :class:`~kvstore.errors.MalformedRequest` (INVALID_ARGUMENT), logged as at
  most one WARNING line per :data:`UNDECODABLE_LOG_SECONDS`. (Put's chunks
  decode in ``kvstore.wire``, which reports bad bytes the same way.)
* Streamed responses are written by the wrapper (grpc's reader-writer API),
  not by grpc iterating the handler: a write that fails because the client
  cancelled or went away ends the call as a cancellation (logged at DEBUG),
  where grpc would log an ERROR traceback whenever the failed write comes
  before it has noticed the cancel.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc

from kvstore.errors import KVStoreError, MalformedRequest
from kvstore.server.auth import Authorizer
from kvstore.server.handler_cache import HandlerWrappingInterceptor

log = logging.getLogger("kvstore.server")

ERROR_METADATA_KEY = "kvstore-error"

#: Undecodable requests are reported at most once per this many seconds (a
#: misbehaving client can send thousands a second).
UNDECODABLE_LOG_SECONDS = 60.0


class Undecodable(NamedTuple):
    """What a wrapped deserialiser returns for bytes it cannot parse."""

    reason: str


class _UndecodableLog:
    """One WARNING line per interval, counting the requests it stood for."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0
        self._suppressed = 0

    def note(self, method: str, peer: str, reason: str) -> None:
        now = time.monotonic()
        if now < self._next:
            self._suppressed += 1
            return
        more = f" (and {self._suppressed} more since the last report)" if self._suppressed else ""
        log.warning("undecodable request to %s from %s: %s%s", method, peer, reason, more)
        self._next = now + self.interval
        self._suppressed = 0


_undecodable_log = _UndecodableLog(UNDECODABLE_LOG_SECONDS)


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # DecodeError, and whatever a hand-written codec raises
            # protobuf says "Error parsing message with type 'X': why"; keep the why.
            return Undecodable(str(exc).rsplit(": ", 1)[-1] or type(exc).__name__)

    return deserialize


def _check_decoded(request: Any, method: str, context: grpc.aio.ServicerContext) -> None:
    if type(request) is Undecodable:
        _undecodable_log.note(method, context.peer(), request.reason)
        raise MalformedRequest(f"request body is not a valid {_request_type(method)}: "
                               f"{request.reason}")


def _request_type(method: str) -> str:
    # "/kvstore.v1.KVStore/Lookup" -> "kvstore.v1.LookupRequest" (the naming
    # every kvstore.v1 method follows; Put's chunks decode in kvstore.wire).
    service, _, name = method.lstrip("/").rpartition("/")
    package = service.rpartition(".")[0]
    return f"{package}.{name}Request"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, KVStoreError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
        await context.abort(code, exc.message)
    log.exception("internal error", exc_info=exc)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, "KVStoreError"),))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _is_grpc_own(exc: BaseException) -> bool:
    # grpc's own errors (context.abort's AbortError, the server stopping) go
    # back to grpc as they are; kvstore code never raises them.
    return isinstance(exc, grpc.aio.BaseError)


def _authorize(auth: Authorizer | None, method: str, request: Any,
               context: grpc.aio.ServicerContext) -> Any:
    """auth.tokens_file: check the caller before the handler sees the request.
    A unary request names its namespace; Put's does in its first chunk, so
    its request stream is checked as it is read. Returns the request (stream)."""
    if auth is None:
        return request
    grant = auth.identify(context.invocation_metadata(), context.auth_context())
    name = method.rpartition("/")[2]
    if not hasattr(request, "__aiter__"):
        auth.authorize(grant, name, getattr(request, "namespace", "") or None)
        return request

    async def checked(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        first = True
        async for chunk in chunks:
            if first:
                first = False
                auth.authorize(grant, name, getattr(chunk, "namespace", "") or None)
            yield chunk

    auth.authorize(grant, name, None)
    return checked(request)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str,
                request_streaming: bool,
                auth: Authorizer | None = None) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if not request_streaming:
                _check_decoded(request, method, context)
            request = _authorize(auth, method, request, context)
            return await behavior(request, context)
        except Exception as exc:
            if _is_grpc_own(exc):
                raise
            await _abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str,
                 request_streaming: bool,
                 auth: Authorizer | None = None) -> Callable[..., Awaitable[None]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        responses: AsyncIterator[Any] | None = None
        try:
            if not request_streaming:
                _check_decoded(request, method, context)
            request = _authorize(auth, method, request, context)
            responses = behavior(request, context)
            async for item in responses:
                try:
                    await context.write(item)
                except grpc.aio.InternalError:
                    # The write batch failed: the client cancelled or is gone
                    # (grpc may not have seen the cancel yet). Nobody is left
                    # to answer; end as the cancellation it is.
                    raise asyncio.CancelledError from None
        except asyncio.CancelledError:
            log.debug("%s: cancelled by the client mid-stream", method)
            raise
        except Exception as exc:
            if _is_grpc_own(exc):
                raise
            await _abort(context, exc)
        finally:
            if responses is not None:
                # Run the handler's clean-up (e.g. closing a block reader) now,
                # not whenever the abandoned generator is collected.
                await responses.aclose()  # type: ignore[attr-defined]

    return handler


class ErrorInterceptor(HandlerWrappingInterceptor):
    """``auth``: when set (auth.tokens_file), every kvstore.v1 call is checked
    against it (kvstore/server/auth.py) inside the error mapping."""

    def __init__(self, auth: Authorizer | None = None) -> None:
        super().__init__()
        self.auth = auth

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not method.startswith("/kvstore.v1."):
            return handler
        return self._wrap(handler, method, self.auth)

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str,
              auth: Authorizer | None = None) -> grpc.RpcMethodHandler:
        # Put's chunks decode in kvstore.wire, which reports bad bytes itself
        # (wire.BadPutChunk); unary requests are protobuf messages.
        deserializer = handler.request_deserializer
        kwargs = {
            "request_deserializer": deserializer if handler.request_streaming
            else _tolerant(deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, False, auth), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, True, auth), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, False, auth), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, True, auth), **kwargs)
        return handler
