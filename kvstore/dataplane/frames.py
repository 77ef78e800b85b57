"""The data plane's frames (docs/dataplane.md): encode and decode, no I/O.

Used by the server and the SDK alike. A frame is a 24-byte little-endian
header, ``meta_len`` bytes of metadata (this module's job) and
``payload_len`` bytes of payload (block bytes; never touched here, so the
caller can receive them straight into their destination).

Metadata is a sequence of fixed-width little-endian integers and
length-prefixed byte strings (``u16`` length); a decoder that runs short, or
finds bytes left over, raises :class:`FrameError`.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

MAGIC = b"KVDP"
VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")  # magic, version, opcode, flags, request id, meta, payload
HEADER_SIZE = HEADER.size  # 24

#: Header flags. MORE: another response frame to the same request follows
#: (GET: one frame per key). CLOSING: the sender closes the connection after
#: this frame (a fatal ERROR).
FLAG_MORE = 0x0001
FLAG_CLOSING = 0x0002
#: SHM_NEXT (issue 14, one round trip per shared-memory Put): on a
#: SHM_RESERVE or SHM_COMMIT answer, the server accepts the extended
#: SHM_COMMIT; on a SHM_COMMIT request, its metadata carries the extension
#: (:class:`ShmCommitRequest` with ``extended``) and the answer is a
#: :class:`ShmCommitResult`. Older servers never set it (and a client sends it
#: only after a server did); older clients ignore it, as any unknown bit.
FLAG_SHM_NEXT = 0x0004
#: SHM_VOUCHED (on a SHM_COMMIT request): the client computed each block's
#: CRC-32C from the bytes it left in the slot, and takes an answer before the
#: server's check of them. A server may then answer a commit it stores on the
#: spot first and check after: a commit failing that check is not stored, the
#: keys it named lose their earlier blocks, and it is counted and logged, but
#: its client is not told. Without the flag every commit is checked before
#: its answer (DATA_LOSS on a bad checksum). Older servers ignore it.
FLAG_SHM_VOUCHED = 0x0008

RESPONSE = 0x80  # a response's opcode: the request's | RESPONSE
#: The send buffer both ends give a unix-socket connection (not a frame
#: field: a transport setting the SDK and the server share). On a unix stream
#: socket the sender's buffer is all there is between the two: with the
#: default (208 KiB) a 1 MiB Put or GET answer waits for the reader five
#: times (the kernel doubles the value, up to net.core.wmem_max; TCP grows
#: its own buffers). Measured: a 1 MiB Put 0.49 -> 0.37 ms (AsyncClient);
#: a 1 MiB get_into (sync Client) 472-501 -> 304-334 µs with the server's
#: buffer set too (docs/performance.md, "The unix data plane's send buffer").
UNIX_SEND_BUFFER = 2 * 1024 * 1024


class Op(enum.IntEnum):
    HELLO = 0x01
    PING = 0x02
    LOOKUP = 0x03
    GET = 0x04
    PUT = 0x05
    SHM_RESERVE = 0x06
    SHM_COMMIT = 0x07
    SHM_ACQUIRE = 0x08
    SHM_RELEASE = 0x09
    SESSION_EVENT = 0x0A
    ERROR = 0xFF  # responses only


#: Every opcode a client may send.
REQUESTS = frozenset(op for op in Op if op is not Op.ERROR)

#: SESSION_EVENT kinds.
EVENT_TURN_END = 1
EVENT_SESSION_END = 2

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_MAX_STR = 0xFFFF


class FrameError(Exception):
    """Bytes that are not a valid frame (the server answers MalformedRequest)."""


class Header(NamedTuple):
    opcode: int
    flags: int
    request_id: int
    meta_len: int
    payload_len: int


def encode_header(opcode: int, request_id: int, meta_len: int, payload_len: int = 0,
                  flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, VERSION, opcode, flags, request_id, meta_len, payload_len)


def decode_header(buf: bytes | bytearray | memoryview) -> Header:
    """The header in the first 24 bytes of ``buf``; FrameError for a bad
    magic or version (the opcode is the caller's to check)."""
    if len(buf) < HEADER_SIZE:
        raise FrameError(f"a frame header is {HEADER_SIZE} bytes, got {len(buf)}")
    magic, version, opcode, flags, request_id, meta_len, payload_len = HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise FrameError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}): not a kvstore "
                         "data plane frame")
    if version != VERSION:
        raise FrameError(f"protocol version {version} is not supported (this side speaks "
                         f"{VERSION})")
    return Header(opcode, flags, request_id, meta_len, payload_len)


def frame(opcode: int, request_id: int, meta: bytes = b"", payload_len: int = 0,
          flags: int = 0) -> bytes:
    """Header and metadata of one frame (the payload, if any, follows it)."""
    return encode_header(opcode, request_id, len(meta), payload_len, flags) + meta


# -- metadata primitives --------------------------------------------------------------------


class MetaWriter:
    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def u8(self, v: int) -> MetaWriter:
        self.parts.append(_U8.pack(v))
        return self

    def u16(self, v: int) -> MetaWriter:
        self.parts.append(_U16.pack(v))
        return self

    def u32(self, v: int) -> MetaWriter:
        self.parts.append(_U32.pack(v))
        return self

    def u64(self, v: int) -> MetaWriter:
        self.parts.append(_U64.pack(v))
        return self

    def bytes_(self, v: bytes) -> MetaWriter:
        if len(v) > _MAX_STR:
            raise ValueError(f"a string field holds at most {_MAX_STR} bytes, got {len(v)}")
        self.parts.append(_U16.pack(len(v)))
        self.parts.append(bytes(v))
        return self

    def str_(self, v: str) -> MetaWriter:
        return self.bytes_(v.encode("utf-8"))

    def keys(self, keys: Sequence[bytes]) -> MetaWriter:
        self.u32(len(keys))
        for key in keys:
            self.bytes_(key)
        return self

    def u64s(self, values: Sequence[int]) -> MetaWriter:
        self.u32(len(values))
        self.parts.append(struct.pack(f"<{len(values)}Q", *values))
        return self

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


class MetaReader:
    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | bytearray | memoryview) -> None:
        self.buf = bytes(buf)
        self.pos = 0

    def _take(self, s: struct.Struct, what: str) -> int:
        end = self.pos + s.size
        if end > len(self.buf):
            raise FrameError(f"metadata truncated: {what} needs {s.size} bytes at offset "
                             f"{self.pos}, {len(self.buf) - self.pos} left")
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos = end
        return int(v)

    def u8(self, what: str = "u8") -> int:
        return self._take(_U8, what)

    def u16(self, what: str = "u16") -> int:
        return self._take(_U16, what)

    def u32(self, what: str = "u32") -> int:
        return self._take(_U32, what)

    def u64(self, what: str = "u64") -> int:
        return self._take(_U64, what)

    def bytes_(self, what: str = "bytes") -> bytes:
        n = self._take(_U16, f"{what} length")
        end = self.pos + n
        if end > len(self.buf):
            raise FrameError(f"metadata truncated: {what} is {n} bytes at offset {self.pos}, "
                             f"{len(self.buf) - self.pos} left")
        v = self.buf[self.pos:end]
        self.pos = end
        return v

    def str_(self, what: str = "string") -> str:
        raw = self.bytes_(what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"{what} is not valid UTF-8") from None

    def count(self, what: str, least_bytes_each: int) -> int:
        """A u32 element count, checked against the bytes left (so a forged
        count cannot make a decoder loop or allocate for long)."""
        n = self._take(_U32, f"{what} count")
        if n * least_bytes_each > len(self.buf) - self.pos:
            raise FrameError(f"metadata truncated: {n} {what} need at least "
                             f"{n * least_bytes_each} bytes, {len(self.buf) - self.pos} left")
        return n

    def keys(self, what: str = "keys") -> list[bytes]:
        return [self.bytes_(f"{what}[{i}]") for i in range(self.count(what, 2))]

    def u64s(self, what: str) -> list[int]:
        n = self.count(what, 8)
        values = list(struct.unpack_from(f"<{n}Q", self.buf, self.pos))
        self.pos += 8 * n
        return values

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise FrameError(f"metadata has {len(self.buf) - self.pos} unexpected bytes after "
                             f"offset {self.pos}")


# -- messages -------------------------------------------------------------------------------
# Each has encode() -> metadata bytes and decode(metadata) -> instance.


@dataclass(slots=True)
class Hello:
    ticket: bytes

    def encode(self) -> bytes:
        return MetaWriter().bytes_(self.ticket).getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> Hello:
        r = MetaReader(meta)
        v = cls(r.bytes_("ticket"))
        r.end()
        return v


@dataclass(slots=True)
class HelloOk:
    session_id: int
    max_meta_bytes: int
    max_payload_bytes: int
    timeout_ms: int

    def encode(self) -> bytes:
        return (MetaWriter().u64(self.session_id).u32(self.max_meta_bytes)
                .u64(self.max_payload_bytes).u32(self.timeout_ms).getvalue())

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> HelloOk:
        r = MetaReader(meta)
        v = cls(r.u64(), r.u32(), r.u64(), r.u32())
        r.end()
        return v


@dataclass(slots=True)
class LookupRequest:
    namespace: str
    keys: list[bytes]
    lease_ms: int = 0
    session_id: str = ""

    def encode(self) -> bytes:
        return (MetaWriter().str_(self.namespace).str_(self.session_id).u32(self.lease_ms)
                .keys(self.keys).getvalue())

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> LookupRequest:
        r = MetaReader(meta)
        namespace, session, lease = r.str_("namespace"), r.str_("session_id"), r.u32()
        v = cls(namespace, r.keys(), lease, session)
        r.end()
        return v


@dataclass(slots=True)
class LookupResult:
    found: int
    tiers: list[int]  # per key: 0 not stored, 1 L1, 2 L2, 3 L3

    def encode(self) -> bytes:
        return _U32.pack(self.found) + _U32.pack(len(self.tiers)) + bytes(self.tiers)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> LookupResult:
        r = MetaReader(meta)
        found = r.u32()
        n = r.count("tiers", 1)
        tiers = list(r.buf[r.pos:r.pos + n])
        r.pos += n
        r.end()
        return cls(found, tiers)


def encode_lookup_result(found: int, tiers: bytes | bytearray) -> bytes:
    """LookupResult(found, list(tiers)).encode() without the list."""
    return _U32.pack(found) + _U32.pack(len(tiers)) + bytes(tiers)


@dataclass(slots=True)
class GetRequest:
    namespace: str
    keys: list[bytes]
    session_id: str = ""

    def encode(self) -> bytes:
        return MetaWriter().str_(self.namespace).str_(self.session_id).keys(self.keys).getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> GetRequest:
        # The hot path (every GET), unrolled; anything odd is parsed again
        # by the general reader, whose FrameError names what is wrong.
        buf = bytes(meta)
        u16 = _U16.unpack_from
        try:
            end = 2 + u16(buf, 0)[0]
            namespace = buf[2:end].decode("utf-8")
            pos = end + 2
            end = pos + u16(buf, end)[0]
            session = buf[pos:end].decode("utf-8")
            pos = end + 4
            count = _U32.unpack_from(buf, end)[0]
            if count * 2 <= len(buf) - pos:
                keys = []
                for _ in range(count):
                    end = pos + 2 + u16(buf, pos)[0]
                    keys.append(buf[pos + 2:end])
                    pos = end
                if pos == len(buf):
                    return cls(namespace, keys, session)
        except (struct.error, UnicodeDecodeError):
            pass
        r = MetaReader(buf)
        namespace, session = r.str_("namespace"), r.str_("session_id")
        v = cls(namespace, r.keys(), session)
        r.end()
        return v


_GET_BLOCK = struct.Struct("<IBB")


@dataclass(frozen=True, slots=True)
class GetBlock:
    """One GET response frame's metadata: the key's index, hit, tier. The
    block's bytes are the frame's payload (payload_len = its size)."""

    index: int
    hit: bool
    tier: int

    def encode(self) -> bytes:
        return _GET_BLOCK.pack(self.index, int(self.hit), self.tier)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> GetBlock:
        if len(meta) != _GET_BLOCK.size:
            raise FrameError(f"GET response metadata is {_GET_BLOCK.size} bytes, got "
                             f"{len(meta)}")
        index, hit, tier = _GET_BLOCK.unpack_from(meta)
        return cls(index, bool(hit), tier)


def encode_get_block(index: int, hit: bool, tier: int) -> bytes:
    return _GET_BLOCK.pack(index, 1 if hit else 0, tier)


_GET_FRAME = struct.Struct("<4sBBHIIQIBB")  # a GET answer's header and metadata


def encode_get_frame(request_id: int, index: int, tier: int, size: int, flags: int) -> bytes:
    """A GET answer's header and metadata in one go (tier 0: a miss, size 0)."""
    return _GET_FRAME.pack(MAGIC, VERSION, Op.GET | RESPONSE, flags, request_id,
                           _GET_BLOCK.size, size, index, 1 if tier else 0, tier)


PUT_HAS_CRC = 0x01  # PutBlock.flags: crc32c is set; the server checks the bytes against it
#: A PUT block's fields after its key: size, format, flags, crc32c.
_PUT_FIELDS = struct.Struct("<QBBI")


@dataclass(slots=True)
class PutBlock:
    key: bytes
    size: int
    format: int = 0  # 0 raw, 1 kvstore block format v1
    crc32c: int | None = None

    def write(self, w: MetaWriter) -> None:
        w.bytes_(self.key).u64(self.size).u8(self.format)
        w.u8(PUT_HAS_CRC if self.crc32c is not None else 0).u32(self.crc32c or 0)


@dataclass(slots=True)
class PutRequest:
    namespace: str
    blocks: list[PutBlock]
    ack: int = 0  # 0/1 memory, 2 local, 3 remote
    session_id: str = ""

    def encode(self) -> bytes:
        w = MetaWriter().str_(self.namespace).u8(self.ack).str_(self.session_id)
        w.u32(len(self.blocks))
        for b in self.blocks:
            b.write(w)
        return w.getvalue()

    @property
    def payload_len(self) -> int:
        return sum(b.size for b in self.blocks)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> PutRequest:
        r = MetaReader(meta)
        namespace, ack, session = r.str_("namespace"), r.u8(), r.str_("session_id")
        blocks = []
        # A block whose bytes are all there is read in two unpacks (a Put of
        # many small blocks decoded at ~1.3 µs a block field by field); one
        # that is cut short is read field by field, for the error naming it.
        buf, limit = r.buf, len(r.buf)
        for i in range(r.count("blocks", 16)):
            pos = r.pos
            fields = pos + 2 + _U16.unpack_from(buf, pos)[0] if pos + 2 <= limit else limit
            if fields + _PUT_FIELDS.size <= limit:
                key = buf[pos + 2:fields]
                size, fmt, flags, crc = _PUT_FIELDS.unpack_from(buf, fields)
                r.pos = fields + _PUT_FIELDS.size
            else:
                key = r.bytes_(f"blocks[{i}].key")
                size, fmt, flags, crc = r.u64(), r.u8(), r.u8(), r.u32()
            blocks.append(PutBlock(key, size, fmt, crc if flags & PUT_HAS_CRC else None))
        r.end()
        return cls(namespace, blocks, ack, session)


@dataclass(slots=True)
class Counted:
    """PUT's and SHM_COMMIT's answer: blocks stored and their bytes."""

    stored: int
    nbytes: int

    def encode(self) -> bytes:
        return _U32.pack(self.stored) + _U64.pack(self.nbytes)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> Counted:
        r = MetaReader(meta)
        v = cls(r.u32(), r.u64())
        r.end()
        return v


@dataclass(slots=True)
class ShmReserveRequest:
    namespace: str
    blocks: list[tuple[bytes, int]]  # (key, size)
    session_id: str = ""

    def encode(self) -> bytes:
        w = MetaWriter().str_(self.namespace).str_(self.session_id).u32(len(self.blocks))
        for key, size in self.blocks:
            w.bytes_(key).u64(size)
        return w.getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmReserveRequest:
        r = MetaReader(meta)
        namespace, session = r.str_("namespace"), r.str_("session_id")
        blocks = [(r.bytes_(f"blocks[{i}].key"), r.u64()) for i in range(r.count("blocks", 10))]
        r.end()
        return cls(namespace, blocks, session)


_SLOT = struct.Struct("<QQQQ")
#: Bytes of one slot in a SHM_RESERVE answer (or a commit's next slots).
SLOT_BYTES = _SLOT.size


@dataclass(slots=True)
class ShmReserveResult:
    open_ms: int
    slots: list[tuple[int, int, int, int]]  # (slot_id, offset, size, generation)

    def encode(self) -> bytes:
        return _U32.pack(self.open_ms) + _U32.pack(len(self.slots)) + \
            b"".join(_SLOT.pack(*s) for s in self.slots)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmReserveResult:
        r = MetaReader(meta)
        open_ms = r.u32()
        slots = []
        for _ in range(r.count("slots", _SLOT.size)):
            slots.append(_SLOT.unpack_from(r.buf, r.pos))
            r.pos += _SLOT.size
        r.end()
        return cls(open_ms, slots)


_COMMIT = struct.Struct("<QQQIB")
#: Bytes of one block in a SHM_COMMIT, and of its key's length when it names one.
COMMIT_BLOCK_BYTES = _COMMIT.size + 2


@dataclass(slots=True)
class ShmCommitRequest:
    """SHM_COMMIT's metadata. ``extended`` (header flag FLAG_SHM_NEXT) adds,
    after the version-1 fields: the session of the anonymous slots committed,
    one key per block (b"" for a slot reserved with its key; an anonymous
    slot's key is bound here) and the sizes of anonymous slots to reserve for
    the next Puts (``reserve_next``, answered in ShmCommitResult)."""

    namespace: str
    blocks: list[tuple[int, int, int, int, int]]  # (slot_id, offset, size, crc32c, format)
    abandon: list[int] = field(default_factory=list)
    ack: int = 0
    extended: bool = False
    session_id: str = ""
    keys: list[bytes] = field(default_factory=list)  # extended: one per block
    reserve_next: list[int] = field(default_factory=list)

    def encode(self) -> bytes:
        return encode_shm_commit(self.namespace, self.ack, self.blocks, self.abandon,
                                 self.keys if self.extended else None, self.session_id,
                                 self.reserve_next)

    @classmethod
    def decode(cls, meta: bytes | memoryview, extended: bool = False) -> ShmCommitRequest:
        buf = bytes(meta)
        fast = _decode_shm_commit(buf, extended)
        if fast is not None:
            return fast
        r = MetaReader(buf)  # anything odd: the general reader says what is wrong
        namespace, ack = r.str_("namespace"), r.u8()
        blocks = []
        for _ in range(r.count("blocks", _COMMIT.size)):
            blocks.append(_COMMIT.unpack_from(r.buf, r.pos))
            r.pos += _COMMIT.size
        abandon = r.u64s("abandon")
        if not extended:
            r.end()
            return cls(namespace, blocks, abandon, ack)
        session = r.str_("session_id")
        keys = [r.bytes_(f"keys[{i}]") for i in range(len(blocks))]
        reserve_next = r.u64s("reserve_next")
        r.end()
        return cls(namespace, blocks, abandon, ack, True, session, keys, reserve_next)


def _decode_shm_commit(buf: bytes, extended: bool) -> ShmCommitRequest | None:
    """The hot path of ShmCommitRequest.decode (every shared-memory Put),
    unrolled; None for anything the general reader must look at."""
    u16, u32 = _U16.unpack_from, _U32.unpack_from
    size = len(buf)
    try:
        pos = 2 + u16(buf, 0)[0]
        namespace = buf[2:pos].decode("utf-8")
        ack = buf[pos]
        count = u32(buf, pos + 1)[0]
        pos += 5
        end = pos + _COMMIT.size * count
        if end + 4 > size:
            return None
        blocks = list(_COMMIT.iter_unpack(buf[pos:end]))
        n = u32(buf, end)[0]
        pos = end + 4 + 8 * n
        if pos > size:
            return None
        abandon = list(struct.unpack_from(f"<{n}Q", buf, end + 4)) if n else []
        if not extended:
            return ShmCommitRequest(namespace, blocks, abandon, ack) if pos == size else None
        end = pos + 2 + u16(buf, pos)[0]
        session = buf[pos + 2:end].decode("utf-8")
        pos = end
        keys = []
        for _ in range(count):
            end = pos + 2 + u16(buf, pos)[0]
            keys.append(buf[pos + 2:end])
            pos = end
        n = u32(buf, pos)[0]
        if pos + 4 + 8 * n != size:
            return None
        reserve_next = list(struct.unpack_from(f"<{n}Q", buf, pos + 4)) if n else []
        return ShmCommitRequest(namespace, blocks, abandon, ack, True, session, keys, reserve_next)
    except (struct.error, UnicodeDecodeError, IndexError):
        return None


def encode_shm_commit(namespace: str, ack: int, blocks: Sequence[tuple[int, int, int, int, int]],
                      abandon: Sequence[int], keys: Sequence[bytes] | None = None,
                      session_id: str = "", reserve_next: Sequence[int] = ()) -> bytes:
    """SHM_COMMIT's metadata; with ``keys`` (one per block) the extended form
    (send it with FLAG_SHM_NEXT)."""
    ns = namespace.encode("utf-8")
    parts = [_U16.pack(len(ns)), ns, _U8.pack(ack), _U32.pack(len(blocks))]
    parts += [_COMMIT.pack(*b) for b in blocks]
    parts += [_U32.pack(len(abandon)), struct.pack(f"<{len(abandon)}Q", *abandon)]
    if keys is not None:
        if len(keys) != len(blocks):
            raise ValueError(f"an extended SHM_COMMIT names one key per block: {len(blocks)} "
                             f"blocks, {len(keys)} keys")
        sid = session_id.encode("utf-8")
        parts += [_U16.pack(len(sid)), sid]
        for key in keys:
            parts += [_U16.pack(len(key)), key]
        parts += [_U32.pack(len(reserve_next)),
                  struct.pack(f"<{len(reserve_next)}Q", *reserve_next)]
    return b"".join(parts)


_COMMIT_NEXT = struct.Struct("<IQII")  # stored, bytes, next_open_ms, slot count


@dataclass(slots=True)
class ShmCommitResult:
    """The answer to an extended SHM_COMMIT: what was stored, and the
    anonymous slots reserved for the next Puts, their clock started
    ``next_open_ms`` after the request arrived (as ShmReserveResult's)."""

    stored: int
    nbytes: int
    next_open_ms: int = 0
    next_slots: list[tuple[int, int, int, int]] = field(default_factory=list)

    def encode(self) -> bytes:
        return _COMMIT_NEXT.pack(self.stored, self.nbytes, self.next_open_ms,
                                 len(self.next_slots)) + \
            b"".join(_SLOT.pack(*s) for s in self.next_slots)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmCommitResult:
        if len(meta) < _COMMIT_NEXT.size:
            raise FrameError(f"an extended SHM_COMMIT answer is at least {_COMMIT_NEXT.size} "
                             f"bytes, got {len(meta)}")
        stored, nbytes, open_ms, count = _COMMIT_NEXT.unpack_from(meta)
        if len(meta) != _COMMIT_NEXT.size + count * _SLOT.size:
            raise FrameError(f"an extended SHM_COMMIT answer with {count} slots is "
                             f"{_COMMIT_NEXT.size + count * _SLOT.size} bytes, got {len(meta)}")
        slots = [_SLOT.unpack_from(meta, _COMMIT_NEXT.size + i * _SLOT.size)
                 for i in range(count)]
        return cls(stored, nbytes, open_ms, slots)


@dataclass(slots=True)
class ShmAcquireRequest:
    namespace: str
    keys: list[bytes]
    lease_ms: int = 0
    release: list[int] = field(default_factory=list)
    session_id: str = ""

    def encode(self) -> bytes:
        return encode_shm_acquire(self.namespace, self.session_id, self.lease_ms, self.keys,
                                  self.release)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmAcquireRequest:
        # The hot path (every shared-memory Get), unrolled as GetRequest's;
        # anything odd is parsed again by the general reader.
        buf = bytes(meta)
        u16 = _U16.unpack_from
        u32 = _U32.unpack_from
        try:
            end = 2 + u16(buf, 0)[0]
            namespace = buf[2:end].decode("utf-8")
            pos = end + 2
            end = pos + u16(buf, end)[0]
            session = buf[pos:end].decode("utf-8")
            lease = u32(buf, end)[0]
            pos = end + 8
            count = u32(buf, end + 4)[0]
            if count * 2 <= len(buf) - pos:
                keys = []
                for _ in range(count):
                    end = pos + 2 + u16(buf, pos)[0]
                    keys.append(buf[pos + 2:end])
                    pos = end
                n = u32(buf, pos)[0]
                if pos + 4 + 8 * n == len(buf):
                    release = list(struct.unpack_from(f"<{n}Q", buf, pos + 4)) if n else []
                    return cls(namespace, keys, lease, release, session)
        except (struct.error, UnicodeDecodeError):
            pass
        r = MetaReader(buf)
        namespace, session, lease = r.str_("namespace"), r.str_("session_id"), r.u32()
        keys = r.keys()
        release = r.u64s("release")
        r.end()
        return cls(namespace, keys, lease, release, session)


def encode_shm_acquire(namespace: str, session_id: str, lease_ms: int, keys: Sequence[bytes],
                       release: Sequence[int]) -> bytes:
    """SHM_ACQUIRE's metadata (ShmAcquireRequest(...).encode() without the object)."""
    ns = namespace.encode("utf-8")
    sid = session_id.encode("utf-8")
    parts = [_U16.pack(len(ns)), ns, _U16.pack(len(sid)), sid, _U32.pack(lease_ms),
             _U32.pack(len(keys))]
    for key in keys:
        if len(key) > _MAX_STR:
            raise ValueError(f"a string field holds at most {_MAX_STR} bytes, got {len(key)}")
        parts += [_U16.pack(len(key)), key]
    parts += [_U32.pack(len(release)), struct.pack(f"<{len(release)}Q", *release)]
    return b"".join(parts)


_LEASE = struct.Struct("<BBQQQIQ")  # hit, tier, lease id, offset, size, crc32c, generation
#: Bytes of one lease in a SHM_ACQUIRE answer.
LEASE_BYTES = _LEASE.size
_MISS = _LEASE.pack(0, 0, 0, 0, 0, 0, 0)


class ShmLease(NamedTuple):
    lease_id: int
    offset: int
    size: int
    crc32c: int
    generation: int
    tier: int


class ShmUnleased(NamedTuple):
    """Not a lease: the block is held (in ``tier``) outside L1 and there was
    no L1 room to bring it in for one; a GET reads it. Sent as a miss (hit 0)
    with its tier set, so a client that ignores the tier sees a miss."""
    tier: int


@dataclass(slots=True)
class ShmAcquireResult:
    lease_ms: int
    released: int
    expired: list[int]
    leases: list[ShmLease | ShmUnleased | None]  # None: a miss

    def encode(self) -> bytes:
        return encode_shm_acquire_result(self.lease_ms, self.released, self.expired,
                                         self.leases)

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmAcquireResult:
        buf = bytes(meta)
        try:
            lease_ms, released, n = _ACQUIRED.unpack_from(buf)
            pos = _ACQUIRED.size + 8 * n
            count = _U32.unpack_from(buf, pos)[0]
            pos += 4
            if pos + count * _LEASE.size == len(buf):
                expired = list(struct.unpack_from(f"<{n}Q", buf, _ACQUIRED.size)) if n else []
                leases: list[ShmLease | ShmUnleased | None] = []
                for i in range(count):
                    hit, tier, lease_id, offset, size, crc, gen = _LEASE.unpack_from(
                        buf, pos + i * _LEASE.size)
                    leases.append(ShmLease(lease_id, offset, size, crc, gen, tier) if hit
                                  else ShmUnleased(tier) if tier else None)
                return cls(lease_ms, released, expired, leases)
        except struct.error:
            pass
        r = MetaReader(buf)  # says what is wrong
        r.u32(), r.u32(), r.u64s("expired")
        for _ in range(r.count("leases", _LEASE.size)):
            r.pos += _LEASE.size
        r.end()
        raise FrameError("malformed SHM_ACQUIRE answer")  # not reached: the reader raised


_ACQUIRED = struct.Struct("<III")  # lease_ms, released, expired count


def encode_shm_acquire_granted(lease_ms: int, released: int, expired: Sequence[int],
                               granted: Sequence[tuple[int, int, int, int, int]],
                               tier: int) -> bytes:
    """A SHM_ACQUIRE answer whose every key got a lease in ``tier``, each
    given as (lease id, offset, size, crc32c, generation): the bytes
    :func:`encode_shm_acquire_result` makes of the same, without an
    ShmLease per key (the answer to every shared-memory Get of L1 hits)."""
    pack = _LEASE.pack
    return b"".join([_ACQUIRED.pack(lease_ms, released, len(expired)),
                     struct.pack(f"<{len(expired)}Q", *expired) if expired else b"",
                     _U32.pack(len(granted)),
                     *[pack(1, tier, *lease) for lease in granted]])


def encode_shm_acquire_result(lease_ms: int, released: int, expired: Sequence[int],
                              leases: Sequence[ShmLease | ShmUnleased | None]) -> bytes:
    parts = [_ACQUIRED.pack(lease_ms, released, len(expired)),
             struct.pack(f"<{len(expired)}Q", *expired), _U32.pack(len(leases))]
    parts += [_MISS if lease is None else
              _LEASE.pack(0, lease.tier, 0, 0, 0, 0, 0) if isinstance(lease, ShmUnleased) else
              _LEASE.pack(1, lease.tier, lease.lease_id, lease.offset, lease.size,
                          lease.crc32c, lease.generation)
              for lease in leases]
    return b"".join(parts)


@dataclass(slots=True)
class ShmReleaseRequest:
    namespace: str
    lease_ids: list[int]

    def encode(self) -> bytes:
        return MetaWriter().str_(self.namespace).u64s(self.lease_ids).getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmReleaseRequest:
        r = MetaReader(meta)
        v = cls(r.str_("namespace"), r.u64s("lease_ids"))
        r.end()
        return v


@dataclass(slots=True)
class ShmReleaseResult:
    released: int
    expired: list[int]

    def encode(self) -> bytes:
        return MetaWriter().u32(self.released).u64s(self.expired).getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ShmReleaseResult:
        r = MetaReader(meta)
        v = cls(r.u32(), r.u64s("expired"))
        r.end()
        return v


@dataclass(slots=True)
class SessionEventRequest:
    namespace: str
    session_id: str
    kind: int  # EVENT_TURN_END or EVENT_SESSION_END
    reason: int = 0  # turn end: kvstore.v1.TurnEndReason
    expected_gap_ms: int = 0
    tool_name: str = ""
    discard: bool = False  # session end

    def encode(self) -> bytes:
        return (MetaWriter().str_(self.namespace).str_(self.session_id).u8(self.kind)
                .u8(self.reason).u64(self.expected_gap_ms).str_(self.tool_name)
                .u8(int(self.discard)).getvalue())

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> SessionEventRequest:
        r = MetaReader(meta)
        v = cls(r.str_("namespace"), r.str_("session_id"), r.u8(), r.u8(), r.u64(),
                r.str_("tool_name"), bool(r.u8()))
        r.end()
        return v


@dataclass(slots=True)
class ErrorInfo:
    """An ERROR frame: the gRPC status code number the same failure has over
    gRPC, the kvstore error class name (as in the ``kvstore-error`` trailer)
    and a message."""

    code: int
    name: str
    message: str

    def encode(self) -> bytes:
        message = self.message.encode("utf-8")[:_MAX_STR].decode("utf-8", "ignore")
        return MetaWriter().u16(self.code).str_(self.name).str_(message).getvalue()

    @classmethod
    def decode(cls, meta: bytes | memoryview) -> ErrorInfo:
        r = MetaReader(meta)
        v = cls(r.u16(), r.str_("name"), r.str_("message"))
        r.end()
        return v


#: gRPC status code numbers by name (the ERROR frame's code field).
STATUS_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}
