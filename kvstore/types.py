"""Domain types shared by the store, tiers, policy, servicer and SDK.

Nothing here knows about protobuf: the servicer and the SDK convert.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass

from kvstore.errors import InvalidArgument, InvalidKey, InvalidNamespace

#: Where clients and the CLI look for a server when told nothing.
DEFAULT_TARGET = "127.0.0.1:50051"

MAX_KEY_BYTES = 64
#: Keys one request may name (Lookup, Get, Delete, Prefetch, shared-memory
#: acquires): a 1M-token context in 16-token blocks is 62,500. The bound keeps
#: what one request costs the server -- its time on the event loop, the key list
#: the policy and Prefetch remember per session -- small.
MAX_KEYS_PER_REQUEST = 65_536
#: Session ids, shared-memory owners and tool names: the server keeps them (per
#: session, lease, tool), so a client may not make them megabytes long.
MAX_NAME_BYTES = 1024
#: The shared-memory arena file's page past the blocks starts with this and
#: the server's instance id (ShmAttachResponse.marker_offset): a client
#: compares it with what the server it called answered, so it never maps
#: another server's file that has the same path on its own host.
ARENA_MARKER_PREFIX = b"kvstore-arena "


def check_name(value: str, what: str) -> str:
    """``value`` if it is at most MAX_NAME_BYTES bytes of UTF-8, else InvalidArgument."""
    if value.isascii():  # (the common case: its length is its size)
        size = len(value)
    else:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            # A lone surrogate (from bytes decoded with errors="surrogateescape"):
            # no UTF-8 for the wire. Unchecked, the SDK's encoders raised a bare
            # UnicodeEncodeError, and inside a gRPC Put stream the call waited
            # for the rest of its messages until its deadline.
            raise InvalidArgument(f"{what} {value[:40]!r} is not UTF-8 text (it holds a "
                                  "lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} is {size} bytes; at most {MAX_NAME_BYTES}")
    return value


def session_or_none(session_id: str) -> str | None:
    """A request's session id (checked), None when it names none."""
    return check_name(session_id, "session_id") or None
MAX_NAMESPACE_CHARS = 128
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

#: Block bytes as the store, the tiers and the checksums take them.
Buffer = bytes | bytearray | memoryview

#: A block's identity: (namespace, key). A plain tuple keeps the index and the
#: policies cheap (hashing a tuple of str and bytes is fast in CPython).
BlockId = tuple[str, bytes]


class TierName(enum.IntEnum):
    """Tiers, fastest first. Values match ``kvstore.v1.Tier``."""

    L1 = 1
    L2 = 2
    L3 = 3


#: The tier for each ``kvstore.v1.Tier`` value (0: not stored).
TIER_BY_CODE: tuple[TierName | None, ...] = (None, TierName.L1, TierName.L2, TierName.L3)


class AckLevel(enum.IntEnum):
    """How durable a Put is before it is acknowledged. Values match the proto."""

    MEMORY = 1
    LOCAL = 2
    REMOTE = 3


class BlockFormat(enum.IntEnum):
    """What a block's bytes are. Values match ``kvstore.v1.BlockFormat``."""

    RAW = 0  # opaque bytes
    KV_V1 = 1  # kvstore block format v1 (docs/block-format.md): verified on Put


class TurnEndReason(enum.IntEnum):
    UNSPECIFIED = 0
    TOOL_CALL = 1
    AWAITING_USER = 2
    DONE = 3


@dataclass(frozen=True, slots=True)
class TurnEnd:
    reason: TurnEndReason
    expected_gap_ms: int = 0
    tool_name: str = ""


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """The session is over: its blocks are the first to leave L1 (to L2, as
    every Put's) and skip L3. ``discard``: they leave the store instead."""

    discard: bool = False


@dataclass(frozen=True, slots=True)
class Prefetch:
    """Bring blocks into L1 ahead of the next request; no keys = the blocks
    of the session's latest Lookup."""

    keys: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class Pin:
    """Keep blocks in L1 for ttl_ms (0 = the server's max_pin_ms)."""

    keys: tuple[bytes, ...]
    ttl_ms: int = 0


@dataclass(frozen=True, slots=True)
class Unpin:
    keys: tuple[bytes, ...]


#: Every kind of SessionEvent a client can send.
SessionHint = TurnEnd | SessionEnd | Prefetch | Pin | Unpin


@dataclass(frozen=True, slots=True)
class SessionEventResult:
    """Prefetch / Pin / Unpin: the blocks (and bytes) they applied to."""

    blocks: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class SessionEvent:
    namespace: str
    session_id: str
    event: TurnEnd | SessionEnd


@dataclass(frozen=True, slots=True)
class LookupResult:
    found: int
    tiers: list[TierName | None]


@dataclass(slots=True)
class TierStats:
    tier: TierName
    blocks: int = 0
    bytes: int = 0
    capacity: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    demotions: int = 0
    promotions: int = 0
    corrupt: int = 0
    available: bool = True  # False while the tier cannot be reached (L3 breaker open)
    #: Capacity taken in bytes (``used / capacity``: how full the tier is): L1
    #: counts whole pages per block and room reserved for blocks arriving;
    #: L2 and L3 payload bytes. 0 from a server before 0.28.0.
    used: int = 0


@dataclass(slots=True)
class StoreStats:
    tiers: list[TierStats]
    puts: int = 0
    gets: int = 0
    get_hits: int = 0
    session_events: int = 0
    policy: str = ""
    #: Set when these are one namespace's stats (blocks and bytes per tier only).
    namespace: str = ""


@dataclass(frozen=True, slots=True)
class ListedBlock:
    """One block of a namespace listing (``kvstore ls``)."""

    key: bytes
    size: int
    tiers: tuple[TierName, ...]  # every tier holding it, fastest first
    age_s: float  # since it was put


@dataclass(frozen=True, slots=True)
class BlockListing:
    """A bounded namespace listing: the blocks, in key order, and whether
    more matched than the limit allowed."""

    blocks: list[ListedBlock]
    truncated: bool


def validate_namespace(namespace: str) -> str:
    if not namespace:
        raise InvalidNamespace("namespace is required")
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise InvalidNamespace(
            f"namespace {namespace[:140]!r} is invalid: use 1..{MAX_NAMESPACE_CHARS} characters "
            "of [A-Za-z0-9._:-], starting with a letter or digit"
        )
    return namespace


def validate_keys(keys: Sequence[bytes]) -> set[int]:
    """validate_key for every key; one pass in C for the common all-valid case.
    Returns the set of key lengths."""
    if len(keys) > MAX_KEYS_PER_REQUEST:
        raise InvalidArgument(f"a request names {len(keys)} keys; at most "
                              f"{MAX_KEYS_PER_REQUEST} (split it)")
    lengths = set(map(len, keys))  # few distinct lengths: min/max of the set are cheap
    if lengths and not (min(lengths) > 0 and max(lengths) <= MAX_KEY_BYTES):
        for i, key in enumerate(keys):
            validate_key(key, i)
    return lengths


def validate_key(key: bytes, index: int | None = None) -> bytes:
    where = "" if index is None else f" (key #{index})"
    if not key:
        raise InvalidKey(f"key is empty{where}: keys are 1..{MAX_KEY_BYTES} bytes")
    if len(key) > MAX_KEY_BYTES:
        raise InvalidKey(
            f"key is {len(key)} bytes{where}: keys are at most {MAX_KEY_BYTES} bytes"
        )
    return key
