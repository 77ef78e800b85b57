"""The sync client's Put streams, driven by a private grpc.aio event loop.

grpc's sync stream-unary call starts two threads per call (one consumes the
request iterator, one spins the channel) and hands every message between
them through condition variables: two context switches per 1 MiB message on
the client. Here one daemon thread per client runs an asyncio loop with a
grpc.aio channel to the same target; ``put`` hands it the whole stream and
waits for the result, so each message is one ``await call.write`` in that
loop. Measured on the development machine (docs/performance.md, six same-run
A/B runs of bench.peers): +1 to +35 % Put throughput for 1 MiB blocks, and
less client CPU per GB in five of the six runs; a tie for 4 MiB blocks. The
loop and its channel start at the first Put, so a client that never puts has
no extra thread or connection.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
import grpc.aio

from kvstore.client import _convert as conv
from kvstore.client._base import open_channel
from kvstore.client._common import MetadataPairs
from kvstore.client._errors import closed_in_flight
from kvstore.errors import InvalidArgument

#: How often a Put waiting for its answer looks whether close() ended the loop.
_CLOSE_POLL_S = 0.25

#: A forked child's references to its parent's loops and grpc.aio channels,
#: never released: grpc.aio's teardown of a channel made before the fork hung
#: or crashed the child (SIGSEGV at its close(), its exit, or a collection).
parents_objects: list[tuple[Any, ...]] = []

#: grpc.aio channels of this process not closed yet (AsyncClients', Clients'
#: Put loops'); one dropped or collected unclosed leaves it.
_open_aio_channels: weakref.WeakSet[Any] = weakref.WeakSet()
#: How many its parent had open when it forked this process: grpc.aio then
#: hangs or crashes in this one, new channels included (seen on grpcio 1.85).
_open_at_fork = 0


def aio_channel_opened(channel: Any) -> None:
    _open_aio_channels.add(channel)


def aio_channel_closed(channel: Any) -> None:
    _open_aio_channels.discard(channel)


def _forked() -> None:
    global _open_at_fork
    _open_at_fork = _open_at_fork or len(_open_aio_channels)
    _open_aio_channels.clear()


os.register_at_fork(after_in_child=_forked)


def check_aio_after_fork(target: str) -> None:
    """Refuse grpc.aio in a process forked while a channel was open (a clear
    error instead of a call that hangs for ever or a crash)."""
    if _open_at_fork:
        raise InvalidArgument(
            f"AsyncClient to {target}: this process was forked while an AsyncClient (or a "
            "Client's Put loop) had a gRPC channel open, and grpc.aio does not work in such a "
            "child: use a kvstore.Client here, or close the AsyncClient before forking (or "
            "start workers with the 'spawn' method)")


class AioPutter:
    def __init__(self, target: str, options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None) -> None:
        self._target = target
        self._options = options
        self._credentials = credentials
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._channel: grpc.aio.Channel | None = None
        self._rpc: Any = None
        self._closed = False
        # Puts whose caller was interrupted while they were under way (see put)
        self._settling: list[concurrent.futures.Future[None]] = []

    def forked(self) -> bool:
        """Whether its loop was started in another process (this one was forked
        since): grpc.aio does not survive a fork once used (the child crashed
        or hung), so a child puts through the sync channel instead."""
        return self._pid != 0 and self._pid != os.getpid()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise ValueError("the client is closed")
            if self._loop is None:
                # First Put: start the loop.
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=_run, args=(loop,), daemon=True,
                                          name="kvstore-put-loop")
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._channel = self._rpc = None
            return self._loop

    def put(self, messages: Iterator[bytes], timeout: float | None,
            metadata: MetadataPairs | None = None) -> tuple[int, int]:
        """Send one Put stream; raises grpc.RpcError as the sync call would,
        and ConnectionFailed when :meth:`close` ends the loop under it."""
        loop = self._running_loop()
        # Made before the Put is scheduled: an interrupt (KeyboardInterrupt)
        # can land anywhere from here on, the scheduling itself included.
        ended: concurrent.futures.Future[None] = concurrent.futures.Future()
        try:
            try:
                fut = asyncio.run_coroutine_threadsafe(
                    self._put_recorded(messages, timeout, metadata, ended), loop)
            except RuntimeError:  # the loop closed between the two: close() came
                _resolve(ended)
                raise closed_in_flight(self._target) from None
            while True:
                try:
                    result: tuple[int, int] = fut.result(timeout=_CLOSE_POLL_S)
                    return result
                except concurrent.futures.TimeoutError:
                    # A Put scheduled as close() stopped the loop never runs:
                    # waiting on it without end hung the caller's thread.
                    if self._closed and not loop.is_running():
                        raise closed_in_flight(self._target) from None
        except concurrent.futures.CancelledError:
            if self._closed:
                raise closed_in_flight(self._target) from None
            raise
        except BaseException as exc:
            if not isinstance(exc, Exception) and not ended.done():
                # Interrupted (KeyboardInterrupt) with the stream under way:
                # it is not cancelled but goes on to its answer, and this
                # client's next write waits for it (settle). Cancelled, its
                # last blocks could still be stored after a Delete made next
                # (this connection is the Puts' own: the Delete travels on
                # another), and the deleted block was served again (a review:
                # 12 of 196 abandoned Puts). Other Puts under way, another
                # thread's, are not waited for.
                with self._lock:
                    self._settling.append(ended)
            raise

    async def _put_recorded(self, messages: Iterator[bytes], timeout: float | None,
                            metadata: MetadataPairs | None,
                            ended: concurrent.futures.Future[None]) -> tuple[int, int]:
        try:
            return await self._put(messages, timeout, metadata)
        finally:
            _resolve(ended)

    def settle(self, timeout: float | None) -> None:
        """Wait (at most ``timeout``) for the Puts interrupted under way to be
        answered: a write made next must not be overtaken by one of them."""
        with self._lock:
            if self.forked():  # (the loop that would answer them is the parent's)
                self._settling = []
            pending = [f for f in self._settling if not f.done()]
            self._settling = pending
        if pending:
            concurrent.futures.wait(pending, timeout=timeout)
            # Waited for once: a Put that never got scheduled (interrupted
            # inside run_coroutine_threadsafe) would make every later write
            # wait out its timeout again.
            with self._lock:
                self._settling = [f for f in self._settling if f not in pending]

    async def _put(self, messages: Iterator[bytes], timeout: float | None,
                   metadata: MetadataPairs | None) -> tuple[int, int]:
        if self._closed:  # (scheduled as close() ran: no new channel on a loop ending)
            raise closed_in_flight(self._target)
        if self._rpc is None:
            self._channel = open_channel(grpc.aio, self._target, self._options,
                                         self._credentials)
            aio_channel_opened(self._channel)
            self._rpc = self._channel.stream_unary(
                conv.PUT, request_serializer=conv.identity,
                response_deserializer=conv.decode_put_response)
        return await put_stream(self._rpc, messages, timeout, metadata)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
            channel, self._channel, self._rpc = self._channel, None, None
            pid = self._pid
            settling, self._settling = self._settling, []
        for ended in settling:  # (nothing is left to answer them)
            _resolve(ended)
        if loop is None or thread is None:
            return
        if pid != os.getpid():
            parents_objects.append((loop, thread, channel))  # (see parents_objects)
            return  # a forked child: the loop's thread is the parent's
        if not thread.is_alive():
            return
        if channel is not None:
            aio_channel_closed(channel)
            try:
                asyncio.run_coroutine_threadsafe(channel.close(), loop).result(timeout=10)
            except Exception:  # closing is best effort; the loop goes anyway
                pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


def _resolve(ended: concurrent.futures.Future[None]) -> None:
    try:
        ended.set_result(None)
    except concurrent.futures.InvalidStateError:
        pass  # (close() or the Put, whichever came second)


async def put_stream(rpc: Any, messages: Iterable[bytes], timeout: float | None,
                     metadata: MetadataPairs | None) -> tuple[int, int]:
    """One Put stream on a grpc.aio ``rpc``, message by message, with the
    server's status when the server ends it early (the sync client's loop
    and AsyncClient both put through here). Raises grpc.RpcError. A
    CancelledError that grpc.aio raises for a call it ended itself (the
    task was not cancelled: the channel closed) becomes the call's status,
    or CANCELLED.

    The writes go in a task of their own and the answer is awaited here: a
    write blocked on flow control (a server that stopped reading) wakes
    neither at the deadline nor when the channel closes; the answer does."""
    call = rpc(timeout=timeout, metadata=metadata)
    first: list[grpc.aio.AioRpcError | None] = []
    call.add_done_callback(lambda done: first.append(_first_status(done)))
    failed: list[Exception] = []  # what producing the messages raised

    async def send() -> None:
        source = iter(messages)
        try:
            while True:
                try:
                    message = next(source)
                except StopIteration:
                    break
                except Exception as exc:
                    # The messages could not be made (their iterator raised):
                    # end the call, which the caller raises as this. Swallowed
                    # here, the call waited for the rest of the stream until
                    # its deadline (without one, for ever) and the error went
                    # to "Task exception was never retrieved".
                    failed.append(exc)
                    call.cancel()
                    return
                await call.write(message)
            await call.done_writing()
        except (Exception, asyncio.CancelledError):
            # The call ended early (an error from the server, possibly before
            # it read a message: a write then fails with a local "Internal
            # error from Core"; its deadline; close(), which can fail the
            # half-close with grpc's own ExecuteBatchError: seen in CI, raised
            # to the caller as that): its status says why. (Cancelled here in
            # case it did not end: then the caller gets CANCELLED, not a wait.)
            call.cancel()

    sender = asyncio.ensure_future(send())
    try:
        result: tuple[int, int] = await call
    except grpc.aio.AioRpcError as err:
        if failed:
            raise failed[0] from None
        if status_lost(err) and first and first[0] is not None:
            raise first[0] from None  # the server's, which grpc.aio overwrote
        raise
    except asyncio.CancelledError:
        if task_cancelled():
            call.cancel()
            raise
        if failed:
            raise failed[0] from None
        if first and first[0] is not None:
            raise first[0] from None
        raise grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "the call was cancelled") from None
    finally:
        if not sender.done():
            sender.cancel()  # (it swallows what its writes raise)
    return result


def task_cancelled() -> bool:
    """Whether the running task is being cancelled (by its caller), rather
    than grpc.aio raising CancelledError for a call it ended itself (a
    deadline, the channel closed)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _first_status(call: Any) -> grpc.aio.AioRpcError | None:
    """The call's status as first set (a done callback runs then), as the
    error a failed call raises; None if OK or unreadable. grpc.aio may set it
    a second time, over the server's (:func:`status_lost`); the attribute
    read here is grpc's own, so anything unexpected gives None (the caller
    then sends the Put again instead)."""
    try:
        status = call._cython_call._status
        code = _STATUS_CODES[status.code()]
        if code == grpc.StatusCode.OK:
            return None
        return grpc.aio.AioRpcError(
            code, grpc.aio.Metadata(), grpc.aio.Metadata.from_tuple(status.trailing_metadata()),
            status.details(), status.debug_error_string())
    except Exception:
        return None


def status_lost(err: grpc.RpcError) -> bool:
    """A Put whose final status grpc.aio made up: when the server ends the
    call while a write is in flight, the write fails and grpc.aio sets the
    call's status to its own INTERNAL "Internal error from Core", over the
    server's (seen for 1 Put in 5 to 3 in 5 that the server refuses
    mid-stream). The status set first is the server's: raised instead."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    return callable(code) and code() == grpc.StatusCode.INTERNAL and callable(details) \
        and details() == "Internal error from Core"


def _run(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()
