"""The one place where kvstore errors become gRPC statuses.

Every handler is wrapped: a :class:`kvstore.errors.KVStoreError` aborts the
call with the status code its class names, its message as the details and the
class name in the ``kvstore-error`` trailing metadata (the SDK maps it back to
the same class). Anything else is a bug: logged with its traceback and
reported as INTERNAL, and the server keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from kvstore.errors import KVStoreError

log = logging.getLogger("kvstore.server")

ERROR_METADATA_KEY = "kvstore-error"


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, KVStoreError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        context.set_trailing_metadata(((ERROR_METADATA_KEY, type(exc).__name__),))
        await context.abort(code, exc.message)
    log.exception("internal error", exc_info=exc)
    context.set_trailing_metadata(((ERROR_METADATA_KEY, "KVStoreError"),))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises AbortError; cancellation must propagate as is.
    return isinstance(exc, grpc.aio.AbortError)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in behavior(request, context):
                yield item
        except Exception as exc:
            if _is_abort(exc):
                raise
            await _abort(context, exc)

    return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # Wrapped handlers by method: wrapping costs more than a small call's
        # own work (a Lookup is ~0.5 ms end to end), so it is done once.
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith("/kvstore.v1."):
            return handler
        wrapped = self._wrap(handler)
        self._wrapped[method] = wrapped
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(_wrap_unary(handler.unary_unary), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(_wrap_unary(handler.stream_unary),
                                                        **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(_wrap_stream(handler.unary_stream),
                                                        **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(_wrap_stream(handler.stream_stream),
                                                         **kwargs)
        return handler
