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

The wrapper also bounds what a streamed response can make the server hold
for a client that does not read it (docs/reliability.md section 1):

* A write the client does not take within the idle limit
  (``server.put_idle_ms``, the limit a Put's half-sent block has) ends the
  call: the handler's generator is closed at once (a Get's block reader, which
  pins the block, is released) and the call ends DEADLINE_EXCEEDED, which the
  client reads after the messages grpc already holds for it.
* A handler yields :class:`Reserve` to say how many bytes its next messages
  may hold; they are taken from one server-wide :class:`ResponseBudget`
  before the messages are made, waiting while other calls hold it all, and
  given back when the call has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc

from kvstore.budget import BUDGET_WAIT_SECONDS, ResponseBudget, request_budget
from kvstore.errors import CapacityExhausted, DeadlineExceeded, KVStoreError, MalformedRequest
from kvstore.server.auth import Authorizer
from kvstore.server.handler_cache import HandlerWrappingInterceptor
from kvstore.server.runtime import note_abandoned_stream

log = logging.getLogger("kvstore.server")

ERROR_METADATA_KEY = "kvstore-error"

#: Undecodable requests are reported at most once per this many seconds (a
#: misbehaving client can send thousands a second).
UNDECODABLE_LOG_SECONDS = 60.0


#: The bytes that the messages of streamed responses (Get's chunks) may hold
#: in the server at once, all calls together. The promise is own memory under
#: l1.capacity + 300 MiB (docs/reliability.md section 1); the interpreter, the
#: index and gRPC's buffers take 65-80 MiB of that headroom at rest (RssAnon
#: beside one stored block), so these messages get 128 MiB of it: 64 Gets
#: streaming at once at the default 1 MiB chunk (21 at the 3 MiB largest),
#: more than the CPUs feed at full speed, and ~90 MiB left for the rest. A Get
#: reserves 2 x its chunk for a block: the message grpc is sending (grpc's
#: copy of it, and its bytes object, which grpc holds until the write is
#: done); measured, unread Gets held 6 MiB each at 3 MiB chunks, 2 MiB at 1.
RESPONSE_BUDGET_BYTES = 128 * 1024**2


class Reserve(int):
    """Yielded by a streaming handler in place of a message: the messages it
    yields next may hold this many bytes in the server until the client has
    taken them (the call's whole reservation, replacing the one before; 0:
    none). The wrapper takes the bytes from the :class:`ResponseBudget`
    before the handler goes on (a handler yields it before it pins or reads
    what those messages carry) and gives them back when the call ends."""

    __slots__ = ()


#: The bytes of requests that may wait for room in the request budget, all
#: calls together, a caller a quarter (HoldRequest): a waiting call holds
#: its request counted nowhere.
REQUESTS_WAITING_BYTES = 16 * 1024**2


class HoldRequest(int):
    """Yielded by a streaming handler before anything else: its request holds
    this many bytes in the server for the whole call (grpc's parsed copy of a
    Get's keys), taken from the server's budget for requests of many keys
    (kvstore.budget.request_budget, shared with the data plane; not the
    responses' budget, where a caller's held requests kept its own responses
    from room). It waits for room only while the requests so waiting stay
    within REQUESTS_WAITING_BYTES, else the call fails CapacityExhausted at
    once: a call waiting for room holds its request with nothing counting it
    (a review: 300 waiting Gets of 9,300 keys each, +590 MiB). Given back
    when the call ends."""

    __slots__ = ()


class CallLimit:
    """kvstore.v1 calls in progress (server.max_calls), all callers together,
    and under auth.tokens_file one identity's at most half of them: past
    either a call is refused RESOURCE_EXHAUSTED at once. (grpc's own limit
    counted the health checks too: one tenant holding every call failed the
    probes, and the orchestrator restarted the server.) Without auth there
    is no caller to tell: grpc names every unix-socket peer alike, so a
    share per peer made every local client one caller."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.share = max(1, total // 2)
        self.open = 0
        self._of: dict[str, int] = {}

    def enter(self, who: str, shared: bool = True) -> None:
        """Count a call of ``who``; ``shared``: within its share too."""
        mine = self._of.get(who, 0)
        if self.open >= self.total:
            raise CapacityExhausted(f"the server has {self.open} calls in progress, its limit "
                                    "(server.max_calls): retry later")
        if shared and mine >= self.share:
            raise CapacityExhausted(f"this caller has {mine} calls in progress, its share of "
                                    f"the server's {self.total} (server.max_calls): end some "
                                    "(a Put stream that sends nothing ends after "
                                    "server.put_idle_ms)")
        self.open += 1
        self._of[who] = mine + 1

    def leave(self, who: str) -> None:
        self.open -= 1
        left = self._of[who] - 1
        if left:
            self._of[who] = left
        else:
            del self._of[who]


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


def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, KVStoreError):
        code = getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
        message = exc.message
        trailer = type(exc).__name__
    else:
        log.exception("internal error", exc_info=exc)
        code = grpc.StatusCode.INTERNAL
        message = f"internal error: {type(exc).__name__}: {exc}"
        trailer = "KVStoreError"
    # The status is set and the handler returns (grpc sends no response with
    # a status that is not OK): context.abort raises an error that grpc keeps
    # in a reference cycle with the call's state, chaining this error and the
    # handler's frames, freed only by the cyclic collector, which the server
    # runs rarely (kvstore.server.runtime): 8,000 failed Puts left 8,000 of
    # each, and with each failed Put's last message, up to
    # server.max_message_bytes, 4,000 failed 1 MiB Puts took the server 3.9 GB
    # past its memory bound.
    exc.__traceback__ = None
    del exc
    context.set_trailing_metadata(((ERROR_METADATA_KEY, trailer),))
    context.set_code(code)
    context.set_details(message)


def _is_grpc_own(exc: BaseException) -> bool:
    # grpc's own errors (context.abort's AbortError, the server stopping) go
    # back to grpc as they are; kvstore code never raises them.
    return isinstance(exc, grpc.aio.BaseError)


def _authorize(auth: Authorizer | None, method: str, request: Any,
               context: grpc.aio.ServicerContext) -> Any:
    """auth.tokens_file: check the caller before the handler sees the request.
    A unary request names its namespace; Put's does in its first chunk, so
    its request stream is checked as it is read. Returns the request (stream)."""
    return _authorized(auth, method, request, context)[0]


def _authorized(auth: Authorizer | None, method: str, request: Any,
                context: grpc.aio.ServicerContext) -> tuple[Any, str]:
    """:func:`_authorize`, and who the caller is for a share of what calls
    hold together: its identity under auth.tokens_file, else the namespace
    its request names."""
    if auth is None:
        return request, getattr(request, "namespace", "") or ""
    grant = auth.identify(context.invocation_metadata(), context.auth_context())
    name = method.rpartition("/")[2]
    if not hasattr(request, "__aiter__"):
        auth.authorize(grant, name, getattr(request, "namespace", "") or None)
        return request, grant.identity

    async def checked(chunks: AsyncIterator[Any]) -> AsyncIterator[Any]:
        first = True
        namespace: str | None = None
        grants = auth.grants
        async for chunk in chunks:
            if first:
                first = False
                namespace = getattr(chunk, "namespace", "") or None
                auth.authorize(grant, name, namespace)
            elif auth.grants is not grants:
                # SIGHUP reread the grants while this stream was open: a
                # revoked credential must not go on writing through a stream
                # it opened before (one identity comparison per chunk else).
                grants = auth.grants
                auth.authorize(auth.identify(context.invocation_metadata(),
                                             context.auth_context()), name, namespace)
            yield chunk

    auth.authorize(grant, name, None)
    return checked(request), grant.identity


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str,
                request_streaming: bool, auth: Authorizer | None = None,
                limit: CallLimit | None = None) -> Callable[..., Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        caller: str | None = None
        answered = False
        try:
            if not request_streaming:
                _check_decoded(request, method, context)
            request, who = _authorized(auth, method, request, context)
            if limit is not None:
                entering = who if auth is not None else ""
                limit.enter(entering, auth is not None)
                caller = entering
            response = await behavior(request, context)
            answered = True
            return response
        except Exception as exc:
            if _is_grpc_own(exc):
                raise
            _abort(context, exc)
        finally:
            if caller is not None:
                assert limit is not None
                limit.leave(caller)
            if request_streaming and not answered:
                note_abandoned_stream()

    return handler


class _WriteWatch:
    """One call's watch on its writes: ``on_stall`` runs (once) when a write
    has waited ``idle`` seconds for the client to take it. One timer per
    call, moved on as writes go (a timer per write cost ~3 us each)."""

    __slots__ = ("_idle", "_loop", "_on_stall", "_timer", "started", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, idle: float,
                 on_stall: Callable[[], None]) -> None:
        self._loop = loop
        self._idle = idle
        self._on_stall: Callable[[], None] | None = on_stall
        self._timer: asyncio.TimerHandle | None = None
        self.started = 0.0  # when the write in progress began
        self.writing = False

    def begin(self) -> None:
        self.started = self._loop.time()
        self.writing = True
        if self._timer is None and self._on_stall is not None:
            self._timer = self._loop.call_at(self.started + self._idle, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.writing and now + 0.001 >= self.started + self._idle:
            on_stall, self._on_stall, self._timer = self._on_stall, None, None
            assert on_stall is not None
            on_stall()
            return
        when = (self.started if self.writing else now) + self._idle
        self._timer = self._loop.call_at(when, self._check)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._on_stall = None


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str,
                 request_streaming: bool, auth: Authorizer | None = None,
                 idle: float = 30.0, budget: ResponseBudget | None = None,
                 limit: CallLimit | None = None, requests: ResponseBudget | None = None
                 ) -> Callable[..., Awaitable[None]]:
    """``idle``: how long one write may wait for the client to take it
    (server.put_idle_ms); ``budget``: where :class:`Reserve` takes its bytes
    (None: reservations are not counted); ``requests``: where
    :class:`HoldRequest` takes its bytes (None: not counted)."""
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> None:
        responses: AsyncIterator[Any] | None = None
        watch: _WriteWatch | None = None
        # The close of the handler's generator begun when a write stalled.
        closing: asyncio.Task[None] | None = None
        held = 0  # bytes of the budget this call holds for its responses
        request_held = 0  # and for its request (HoldRequest)
        who = ""  # whose share of the budget it holds them in
        caller: str | None = None  # whose share of server.max_calls it holds

        def stalled() -> None:
            # The write stays pending in grpc, which holds its bytes until the
            # client takes them, cancels or goes: it is not cancelled (its end
            # is how this call learns that; grpc.aio cannot end the stream
            # itself), but the generator is closed now, so what it holds (a
            # block's pin) is let go.
            nonlocal closing
            assert responses is not None
            closing = asyncio.get_running_loop().create_task(
                responses.aclose())  # type: ignore[attr-defined]
            log.debug("%s: %s took no message for %g s: ended", method, context.peer(), idle)

        try:
            if not request_streaming:
                _check_decoded(request, method, context)
            request, who = _authorized(auth, method, request, context)
            if limit is not None:
                entering = who if auth is not None else ""
                limit.enter(entering, auth is not None)
                caller = entering
            responses = behavior(request, context)
            watch = _WriteWatch(asyncio.get_running_loop(), idle, stalled)
            async for item in responses:
                if type(item) is HoldRequest:
                    if requests is not None and item:
                        if request_held or not await requests.take_held(
                                item, BUDGET_WAIT_SECONDS, who, REQUESTS_WAITING_BYTES):
                            raise CapacityExhausted(
                                f"this Get's request holds {item / 1024**2:.1f} MiB in the "
                                f"server, the {requests.capacity // 1024**2} MiB that requests "
                                "of many keys may hold (a caller a quarter) has no room now "
                                "(their answers are not read yet), and other requests wait for "
                                "it already: retry, split it, or read over the data plane")
                        request_held = int(item)
                    continue
                if type(item) is Reserve:
                    if budget is not None:
                        want = min(item, budget.capacity)
                        if want <= held:
                            budget.give(held - want, who)
                        elif not budget.take_now(want - held, who):
                            # Wait holding nothing: calls that wait to grow
                            # could otherwise hold all of it between them.
                            budget.give(held, who)
                            held = 0
                            await budget.take(want, BUDGET_WAIT_SECONDS, who)
                        held = want
                    continue
                watch.begin()
                try:
                    await context.write(item)
                except grpc.aio.InternalError:
                    # The write batch failed: the client cancelled or is gone
                    # (grpc may not have seen the cancel yet). Nobody is left
                    # to answer; end as the cancellation it is.
                    raise asyncio.CancelledError from None
                watch.writing = False
                if closing is not None:
                    # The client took the stalled message at last: the call
                    # has ended all the same (its generator is closed).
                    await closing
                    raise DeadlineExceeded(
                        f"the client read nothing of this response for {idle:g} s "
                        "(server.put_idle_ms): the call was ended and what it held let go")
        except asyncio.CancelledError:
            log.debug("%s: cancelled by the client mid-stream", method)
            raise
        except Exception as exc:
            if _is_grpc_own(exc):
                raise
            _abort(context, exc)
        finally:
            if watch is not None:
                watch.close()
            try:
                if closing is not None:
                    await closing
                elif responses is not None:
                    # Run the handler's clean-up (e.g. closing a block reader)
                    # now, not whenever the abandoned generator is collected.
                    await responses.aclose()  # type: ignore[attr-defined]
            finally:
                # Only now: until the call has ended grpc may still hold the
                # bytes of a message the client never took.
                if held and budget is not None:
                    budget.give(held, who)
                if request_held and requests is not None:
                    requests.give(request_held, who)
                if caller is not None:
                    assert limit is not None
                    limit.leave(caller)

    return handler


class ErrorInterceptor(HandlerWrappingInterceptor):
    """``auth``: when set (auth.tokens_file), every kvstore.v1 call is checked
    against it (kvstore/server/auth.py) inside the error mapping.
    ``stream_idle``: server.put_idle_ms in seconds, how long a streamed
    response's write may wait for the client; ``budget``: the bytes streamed
    responses may hold (None: :data:`RESPONSE_BUDGET_BYTES`); ``max_calls``:
    kvstore.v1 calls in progress at once (:class:`CallLimit`; 0: no limit).
    The health and reflection services are not counted: they must answer
    whatever the callers hold."""

    def __init__(self, auth: Authorizer | None = None, stream_idle: float = 30.0,
                 budget: ResponseBudget | None = None, max_calls: int = 0,
                 requests: ResponseBudget | None = None) -> None:
        super().__init__()
        self.auth = auth
        self.stream_idle = stream_idle
        self.budget = budget if budget is not None else ResponseBudget(RESPONSE_BUDGET_BYTES)
        #: requests of many keys (HoldRequest), shared with the data plane
        self.requests = requests if requests is not None else request_budget()
        self.limit = CallLimit(max_calls) if max_calls > 0 else None

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if not method.startswith("/kvstore.v1."):
            return handler
        return self._wrap(handler, method, self.auth, self.stream_idle, self.budget,
                          self.limit, self.requests)

    @staticmethod
    def _wrap(handler: grpc.RpcMethodHandler, method: str,
              auth: Authorizer | None = None, idle: float = 30.0,
              budget: ResponseBudget | None = None,
              limit: CallLimit | None = None,
              requests: ResponseBudget | None = None) -> grpc.RpcMethodHandler:
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
                _wrap_unary(handler.unary_unary, method, False, auth, limit), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, method, True, auth, limit), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, False, auth, idle, budget, limit,
                             requests), **kwargs)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method, True, auth, idle, budget, limit,
                             requests), **kwargs)
        return handler
