"""Per-method gRPC call counts and latencies, recorded by a server interceptor.

Recording is plain Python on the event loop (no locks, no prometheus_client):
one bisect and three increments per call. The exporter copies the counters
when it is scraped (kvstore/server/metrics.py). Only methods the server has
registered are ever recorded, so the ``method`` label stays bounded.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from kvstore.server.handler_cache import HandlerWrappingInterceptor

#: Upper bounds (seconds) of the latency histogram buckets: from a fast
#: Lookup (~100 µs) to a multi-MiB Get or Put over a slow link.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)

_OK = grpc.StatusCode.OK.name
_CANCELLED = grpc.StatusCode.CANCELLED.name
_UNKNOWN = grpc.StatusCode.UNKNOWN.name


class MethodCalls:
    """Counters of one gRPC method; written on the event loop only."""

    __slots__ = ("buckets", "codes", "method", "service", "sum")

    def __init__(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.service = service
        self.method = method
        # Non-cumulative: buckets[i] counts calls in (bound[i-1], bound[i]];
        # the last one counts calls above the largest bound.
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0
        self.codes: dict[str, int] = {}

    def record(self, seconds: float, code: str) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds
        self.codes[code] = self.codes.get(code, 0) + 1


@dataclass(frozen=True)
class MethodSnapshot:
    service: str
    method: str
    buckets: tuple[int, ...]
    sum: float
    codes: dict[str, int]


class CallRecorder:
    """Every method's counters; :meth:`snapshot` copies them for a scrape."""

    def __init__(self) -> None:
        self._methods: dict[str, MethodCalls] = {}

    def add(self, calls: MethodCalls) -> None:
        self._methods[f"/{calls.service}/{calls.method}"] = calls

    def snapshot(self) -> list[MethodSnapshot]:
        return [MethodSnapshot(c.service, c.method, tuple(c.buckets), c.sum, dict(c.codes))
                for c in list(self._methods.values())]


def _failure_of(exc: BaseException) -> str:
    """What a call that raised ``exc`` is counted as, short of its status:
    kept instead of the error (a local holding the error a call raised is a
    reference cycle through its traceback: its frames, the request stream's
    last message included, waited for the cyclic collector, which the server
    runs rarely)."""
    return _CANCELLED if isinstance(exc, (asyncio.CancelledError, GeneratorExit)) else _UNKNOWN


def _code_of(context: grpc.aio.ServicerContext, failure: str | None) -> str:
    if failure == _CANCELLED:
        return _CANCELLED
    code = context.code()  # set by the error interceptor (kvstore.server.interceptor)
    if isinstance(code, grpc.StatusCode):
        return code.name
    return _OK if failure is None else failure


def _time_unary(behavior: Callable[..., Awaitable[Any]],
                calls: MethodCalls) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = time.perf_counter()
        failure: str | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = _failure_of(exc)
            raise
        finally:
            calls.record(time.perf_counter() - start, _code_of(context, failure))

    return handler


def _time_stream(behavior: Callable[..., AsyncIterator[Any]],
                 calls: MethodCalls) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        start = time.perf_counter()
        failure: str | None = None
        try:
            async for item in behavior(request, context):
                yield item
        except BaseException as exc:
            failure = _failure_of(exc)
            raise
        finally:
            calls.record(time.perf_counter() - start, _code_of(context, failure))

    return handler


def _timed(behavior: Callable[..., Any], calls: MethodCalls) -> Callable[..., Any] | None:
    """The timed form of a handler, or None for a kind this cannot time
    without changing how grpc runs it (plain functions run in grpc's thread
    pool)."""
    if inspect.isasyncgenfunction(behavior):
        return _time_stream(behavior, calls)
    if inspect.iscoroutinefunction(behavior):  # unary, or streaming with context.write
        return _time_unary(behavior, calls)
    return None


class MetricsInterceptor(HandlerWrappingInterceptor):
    """Times every call of a registered method and counts it by status code.

    Put it first in the server's interceptor list so it sees the status the
    error interceptor (kvstore.server.interceptor) turned an exception into.
    Unknown methods are not recorded, so labels stay bounded.
    """

    def __init__(self, recorder: CallRecorder) -> None:
        super().__init__()
        self.recorder = recorder

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        calls = MethodCalls(method)
        wrapped = self._wrap(handler, calls)
        if wrapped is not handler:
            self.recorder.add(calls)
        return wrapped

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, calls: MethodCalls) -> grpc.RpcMethodHandler:
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        for behavior, make in (
            (handler.unary_unary, grpc.unary_unary_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        ):
            if behavior:
                timed = _timed(behavior, calls)
                return handler if timed is None else make(timed, **kwargs)
        return handler
