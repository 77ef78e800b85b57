"""The one kvstore error hierarchy.

Every error the service raises on purpose is a :class:`KVStoreError`. Each
class names the gRPC status code it maps to; the server's error interceptor
(``kvstore/server/interceptor.py``) turns it into that status with the
exception's message and the class name in the ``kvstore-error`` trailing
metadata, and the SDK turns it back into the same class.
"""

from __future__ import annotations

from typing import ClassVar


class KVStoreError(Exception):
    """Base of every kvstore error. ``code`` is a ``grpc.StatusCode`` name."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def about(self, where: str) -> KVStoreError:
        """The same error, its message naming which part of the request it
        is about (``where``: "block #2", "reserve_next #0")."""
        return type(self)(f"{where}: {self.message}")


# INVALID_ARGUMENT -----------------------------------------------------------


class InvalidArgument(KVStoreError):
    code = "INVALID_ARGUMENT"


class InvalidKey(InvalidArgument):
    """A key is empty or longer than 64 bytes."""


class InvalidNamespace(InvalidArgument):
    """A namespace is missing or not of the allowed form."""


class BlockTooLarge(InvalidArgument):
    """A block is larger than the server's max_block_bytes."""


class MalformedRequest(InvalidArgument):
    """A request's shape is wrong: chunks out of order, sizes that disagree."""


class InvalidBlock(InvalidArgument):
    """A block's header (block format v1) is malformed."""


class BufferTooSmall(InvalidArgument):
    """``get_into``: a stored block is larger than the buffer given for it
    (nothing of the call is to be trusted; a caller may get the other blocks
    again). Raised by the SDK (never over the wire)."""


class InvalidBuffer(InvalidArgument, TypeError):
    """A block buffer is not a contiguous buffer-protocol object (or not writable
    where the SDK must write into it). Also a ``TypeError``. Raised by the SDK
    before anything is sent (never over the wire)."""


# DATA_LOSS ------------------------------------------------------------------


class CorruptBlock(KVStoreError):
    """A block's bytes do not match its checksum (or its header is damaged)."""

    code = "DATA_LOSS"


# NOT_FOUND ------------------------------------------------------------------


class UnknownNamespace(KVStoreError):
    """The server only accepts configured namespaces, and this is not one."""

    code = "NOT_FOUND"


# PERMISSION_DENIED ----------------------------------------------------------


class PermissionDenied(KVStoreError):
    """The caller may not do this: its identity may not use this namespace
    (or node-wide method), a namespace not allowed to use shared memory, or a
    lease or reservation taken by another client."""

    code = "PERMISSION_DENIED"


# RESOURCE_EXHAUSTED ---------------------------------------------------------


class CapacityExhausted(KVStoreError):
    """A tier is full and nothing in it can be evicted (e.g. all leased)."""

    code = "RESOURCE_EXHAUSTED"


class TooManyConnections(CapacityExhausted):
    """The data plane refused a session: ``server.data_plane_max_connections``
    connections are open. The SDK goes by gRPC for a while instead."""


# FAILED_PRECONDITION --------------------------------------------------------


class TierNotConfigured(KVStoreError):
    """The request needs a tier this server does not have (e.g. ack remote)."""

    code = "FAILED_PRECONDITION"


# UNAVAILABLE ----------------------------------------------------------------


class TierUnavailable(KVStoreError):
    """A tier cannot be reached right now (e.g. the object store is down)."""

    code = "UNAVAILABLE"


class ServerShuttingDown(KVStoreError):
    code = "UNAVAILABLE"


class StorageError(KVStoreError):
    """A local storage tier failed (a disk or LMDB error): the request could
    not be served or made durable now; the server keeps serving."""

    code = "UNAVAILABLE"


# ABORTED --------------------------------------------------------------------


class StaleLease(KVStoreError):
    """A shared-memory lease expired before it was released: bytes copied under
    it may belong to a block that reused the slot. Read again."""

    code = "ABORTED"


# UNAUTHENTICATED / PERMISSION_DENIED (auth.tokens_file: kvstore/server/auth.py) ---------


class Unauthenticated(KVStoreError):
    """The server requires a credential and the call carries none it knows."""

    code = "UNAUTHENTICATED"


# CANCELLED / DEADLINE -------------------------------------------------------


class Cancelled(KVStoreError):
    code = "CANCELLED"


class DeadlineExceeded(KVStoreError):
    code = "DEADLINE_EXCEEDED"


class ReservationExpired(DeadlineExceeded):
    """A shared-memory reservation's time ran out before the client wrote or
    committed its slot: the slot is no longer the client's to write."""


# Client-side ----------------------------------------------------------------


class ConnectionFailed(KVStoreError):
    """The SDK could not reach the server."""

    code = "UNAVAILABLE"


class ProtocolError(KVStoreError):
    """The server's reply does not follow the kvstore.v1 contract (raised by
    the SDK, never over the wire)."""


class CallCut(Cancelled, ConnectionFailed):
    """The call ended CANCELLED with no kvstore error: not by this client but
    by the server or the connection (a server stopping cancels calls it had
    received but not started). A ConnectionFailed too, so code that retries
    those on another node or after a restart retries this; a Put may have
    stored the blocks whose bytes all arrived (put again)."""

    code = "CANCELLED"


class InvalidConfig(KVStoreError):
    """A configuration value is wrong (raised at start, never over the wire)."""

    code = "INVALID_ARGUMENT"


def _all_subclasses(cls: type[KVStoreError]) -> list[type[KVStoreError]]:
    out: list[type[KVStoreError]] = []
    sub: type[KVStoreError]
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def error_class_by_name(name: str) -> type[KVStoreError] | None:
    """The error class called ``name`` (for the SDK's reverse mapping)."""
    candidates: list[type[KVStoreError]] = [KVStoreError, *_all_subclasses(KVStoreError)]
    for cls in candidates:
        if cls.__name__ == name:
            return cls
    return None


# Reverse mapping for statuses that carry no kvstore-error name (a proxy, a
# server of another implementation): the most general class for each code.
ERROR_FOR_CODE: dict[str, type[KVStoreError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "DATA_LOSS": CorruptBlock,
    "NOT_FOUND": UnknownNamespace,
    "PERMISSION_DENIED": PermissionDenied,
    "RESOURCE_EXHAUSTED": CapacityExhausted,
    "FAILED_PRECONDITION": TierNotConfigured,
    "UNAVAILABLE": ConnectionFailed,
    "CANCELLED": CallCut,
    "ABORTED": StaleLease,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "UNAUTHENTICATED": Unauthenticated,
}
