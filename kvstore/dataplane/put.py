"""A data-plane PUT under way: its blocks received into L1 extents, each
checked and committed in turn (docs/dataplane.md, "PUT").

One object, two drivers. The connection's readable callback begins a PUT
when it can (``Session.put_now``: the request decodes and passes its
checks, it is acknowledged at ``memory``, and the first block's extent is
free now) and feeds it the bytes as they come (:meth:`PutProgress.feed`,
SocketIO's payload sink): no task is woken, no coroutine runs, and a
1-block PUT whose bytes are all there is answered in the callback that
read its header. The moment a step would have to wait (L1 room, an
overwrite's L2 delete, a block to verify off the loop, a client that may
have gone, bytes that do not come) the callback stops and hands the object
to the connection's task, which finishes it from where it stands
(:meth:`PutProgress.run`) with the same checks in the same order, as it
does for a PUT it reads itself.

What each block's commit requires does not depend on who drives it: its
bytes all received, their CRC-32C equal to the client's, a block-format
block verified, then ``Placement.commit``. An extent reserved and not
committed is given back whatever ends the PUT (:meth:`abandon`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvstore.checksum import copy_and_checksum
from kvstore.dataplane import frames as f
from kvstore.dataplane.conn import BOUNCE_BYTES, ConnectionClosed
from kvstore.errors import CorruptBlock, KVStoreError
from kvstore.store.index import Entry
from kvstore.store.tiered import all_durable
from kvstore.types import AckLevel, BlockFormat, BlockId, session_or_none

if TYPE_CHECKING:
    from kvstore.dataplane.ops import Session

#: A PUT's block stored more than this long (s) after the previous one (or
#: the request's start) is stored only if its client is still connected (one
#: poll() call): a killed client's PUT may have waited that long, with all
#: its bytes come, while a client after it stored the same key. Within it no
#: client can have started after the death; a small PUT never pays the call.
OPEN_CHECK_AFTER = 0.001
_PUT_RESPONSE = int(f.Op.PUT | f.RESPONSE)
_KV_V1 = int(BlockFormat.KV_V1)


class PutProgress:
    """Where a PUT stands: the block being received (its extent, the bytes
    and CRC so far), what is stored, and the payload bytes still to come."""

    __slots__ = ("ack", "committed", "crc", "deadline", "dest", "error", "index", "left",
                 "namespace", "nbytes", "needs_task", "offset", "on_end", "pos", "req",
                 "request_id", "session", "since", "stored")

    def __init__(self, session: Session, request_id: int, req: f.PutRequest, namespace: str,
                 ack: AckLevel, payload_len: int) -> None:
        self.session = session
        self.request_id = request_id
        self.req = req
        self.namespace = namespace
        self.ack = ack
        self.left = payload_len  # payload bytes not yet received
        self.index = 0  # the block being received
        self.offset = -1  # its L1 extent (-1: none reserved)
        self.dest: memoryview | None = None  # a view of that extent
        self.pos = 0  # its bytes received
        self.crc = 0  # their CRC-32C
        #: the loop's time by which the block's bytes must all be in (the
        #: connection's timeout from its start; 0: not begun by the callback)
        self.deadline = 0.0
        self.stored = 0
        self.nbytes = 0
        self.since = time.monotonic()  # the request's start, then the last commit
        #: the callback's: an error to answer once the rest of the payload
        #: is read and dropped (the block's extent already given back)
        self.error: KVStoreError | None = None
        #: the callback's: a block committed whose overwrite waits for an L2
        #: delete before the answer (store.make_durable: the task's)
        self.committed: tuple[BlockId, Entry] | None = None
        self.needs_task = False  # the callback stopped: the task goes on
        #: called once the PUT is over, whoever ended it (the server's gauge
        #: of PUTs receiving)
        self.on_end: Callable[[], None] | None = None

    # -- the readable callback's part (conn.PayloadSink) ---------------------------------

    def wanted(self) -> int:
        """The most bytes the next receive may bring: the rest of this block,
        at most a bounce buffer (fed at once; a block's bytes are asked for
        only once its extent is reserved); 0 when it stopped (no room now)."""
        if self.offset < 0 and not self.reserve_now():
            return 0
        return min(self.req.blocks[self.index].size - self.pos, BOUNCE_BYTES)

    def block_left(self) -> int:
        """The bytes of block :attr:`index` still to come."""
        return self.req.blocks[self.index].size - self.pos

    def feed(self, data: memoryview) -> int:
        """Copy ``data`` (at most :attr:`left` bytes) into the blocks'
        extents with their checksum, committing each block as its last byte
        comes; the bytes taken. Fewer than offered only when it stopped
        (:attr:`needs_task`): the rest is the task's to read."""
        taken = 0
        total = len(data)
        blocks = self.req.blocks
        while taken < total:
            if self.offset < 0 and not self.reserve_now():
                break
            b = blocks[self.index]
            dest = self.dest
            assert dest is not None
            n = min(total - taken, b.size - self.pos)
            # Streaming stores for a large raw block (as SocketIO.read_into):
            # nothing reads it again soon; a block-format one is verified next.
            self.crc = copy_and_checksum(dest, self.pos, data[taken:taken + n], self.crc,
                                         b.size >= BOUNCE_BYTES and b.format != _KV_V1)
            self.pos += n
            self.left -= n
            taken += n
            if self.pos == b.size:
                self._block_in_now()
                if self.needs_task:
                    break
        return taken

    def reserve_now(self) -> bool:
        """Reserve the extent of block :attr:`index` without waiting (False:
        it would wait for room; the task reserves it)."""
        session = self.session
        b = self.req.blocks[self.index]
        placement = session.store.placement
        offset = placement.reserve_now(b.size, self.namespace)
        if offset < 0:
            self.needs_task = True  # it waits for room
            return False
        self._begin_block(offset)
        io: Any = session.io
        self.deadline = io.loop.time() + io.timeout
        return True

    def _block_in_now(self) -> None:
        """Block ``index`` is all in: checked and committed here, or left to
        the task where that would wait."""
        session = self.session
        store = session.store
        placement = store.placement
        i = self.index
        b = self.req.blocks[i]
        try:
            self._check_bytes(i)
            if b.format == _KV_V1:
                placement.verify_block_now(self.offset, b.size, i)
        except KVStoreError as exc:
            self.error = exc
            self.needs_task = True
            self.abandon()
            return
        block = (self.namespace, b.key)
        if not store.acked_now() or placement.replace_waits(block) or (
                time.monotonic() - self.since > OPEN_CHECK_AFTER and session.io.peer_gone()):
            self.needs_task = True  # (the task commits it, or finds the client gone)
            return
        entry = placement.commit(block, b.size, self.crc, self.offset,
                                 session_or_none(self.req.session_id))
        self._block_committed(b.size)
        if block in placement.replacing:  # (replace_waits said not: the task's wait)
            self.committed = (block, entry)
            self.needs_task = True
            return
        store.make_durable_now()
        if self.index == len(self.req.blocks):
            result = f.Counted(self.stored, self.nbytes).encode()
            session.reply_now(f.encode_header(_PUT_RESPONSE, self.request_id, len(result))
                               + result)
            self._end()

    # -- both ---------------------------------------------------------------------------

    def _begin_block(self, offset: int) -> None:
        b = self.req.blocks[self.index]
        self.offset = offset
        self.dest = self.session.store.l1.slice(offset, b.size)
        self.pos = 0
        self.crc = 0
        self.deadline = 0.0

    def _check_bytes(self, i: int) -> None:
        expected = self.req.blocks[i].crc32c
        if expected is not None and self.crc != expected:
            raise CorruptBlock(
                f"block #{i} failed its CRC-32C check (client said {expected:#010x}, bytes "
                f"received {self.crc:#010x}): it was not stored")

    def _block_committed(self, size: int) -> None:
        """The block's extent is its entry's now: on to the next block."""
        if self.dest is not None:
            self.dest.release()
            self.dest = None
        self.offset = -1
        self.pos = self.crc = 0
        self.stored += 1
        self.nbytes += size
        self.index += 1
        self.since = time.monotonic()

    def _end(self) -> None:
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    def drop(self) -> None:
        """The connection ended with the PUT unfinished (never handed to its task)."""
        self.abandon()
        self._end()

    def abandon(self) -> None:
        """Give back the extent of the block being received (not committed)."""
        if self.dest is not None:
            self.dest.release()
            self.dest = None
        if self.offset >= 0:
            size = self.req.blocks[self.index].size
            offset, self.offset = self.offset, -1
            self.session.store.placement.release(offset, size)

    # -- the task's part ----------------------------------------------------------------

    async def run(self) -> None:
        """Finish the PUT from where it stands, and answer it."""
        try:
            await self._run()
        finally:
            self._end()

    async def _run(self) -> None:
        session = self.session
        io = session.io
        store = session.store
        placement = store.placement
        ack = self.ack
        blocks = self.req.blocks
        durable: list[asyncio.Future[Any]] = []
        try:
            try:
                if self.error is not None:
                    raise self.error
                if self.committed is not None:
                    block, entry = self.committed
                    self.committed = None
                    fut = await store.make_durable(block, entry, ack)
                    if fut is not None and ack >= AckLevel.LOCAL:
                        durable.append(fut)
                while self.index < len(blocks):
                    i = self.index
                    b = blocks[i]
                    if self.offset < 0:
                        self._begin_block(await placement.reserve(b.size,
                                                                  namespace=self.namespace))
                    if self.pos < b.size:
                        assert self.dest is not None
                        self.crc = await io.read_into(self.dest[self.pos:], self.crc,
                                                      b.format != _KV_V1, self.deadline)
                        self.left -= b.size - self.pos
                        self.pos = b.size
                    self._check_bytes(i)
                    if b.format == _KV_V1:
                        await placement.verify_block(self.offset, b.size, i)
                    block = (self.namespace, b.key)
                    written_next = await store.room_for_write(ack, b.size)
                    if time.monotonic() - self.since > OPEN_CHECK_AFTER:
                        session.check_open()
                    entry = placement.commit(block, b.size, self.crc, self.offset,
                                             session_or_none(self.req.session_id), written_next)
                    self._block_committed(b.size)
                    fut = await store.make_durable(block, entry, ack)
                    if fut is not None and ack >= AckLevel.LOCAL:
                        durable.append(fut)
                    if i & 255 == 255:
                        # Blocks whose bytes are buffered and whose room is free
                        # never wait: a PUT of many small blocks lets the other
                        # connections in now and then (40,000 of 1 byte held
                        # the loop ~1 s).
                        await asyncio.sleep(0)
                if durable:
                    await all_durable(durable)
            finally:
                self.abandon()
        except (f.FrameError, ConnectionClosed, asyncio.CancelledError):
            raise  # the connection ends: nothing to keep in step
        except Exception:
            if self.left > 0:
                await io.discard(self.left)  # keep the stream in step; the connection lives
            raise
        result = f.Counted(self.stored, self.nbytes).encode()
        await io.send((f.encode_header(_PUT_RESPONSE, self.request_id, len(result)) + result,))
