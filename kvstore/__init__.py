"""kvstore: a KV-cache tiered store for LLM inference (RAM, LMDB, object store).

``from kvstore import Client, AsyncClient`` gives the SDK. The client names load
on first use, so that importing the server, the tiers or the policies (and the
trace simulator) does not pay for importing grpc and protobuf (~0.2-0.4 s).
"""

from typing import TYPE_CHECKING, Any

from kvstore._version import __version__ as __version__
from kvstore.errors import (
    BlockTooLarge,
    BufferTooSmall,
    CallCut,
    Cancelled,
    CapacityExhausted,
    ConnectionFailed,
    CorruptBlock,
    DeadlineExceeded,
    InvalidArgument,
    InvalidBlock,
    InvalidBuffer,
    InvalidConfig,
    InvalidKey,
    InvalidNamespace,
    KVStoreError,
    MalformedRequest,
    PermissionDenied,
    ProtocolError,
    ReservationExpired,
    ServerShuttingDown,
    StaleLease,
    StorageError,
    TierNotConfigured,
    TierUnavailable,
    TooManyConnections,
    Unauthenticated,
    UnknownNamespace,
)
from kvstore.types import (
    AckLevel,
    LookupResult,
    SessionEnd,
    StoreStats,
    TierName,
    TierStats,
    TurnEnd,
    TurnEndReason,
)

if TYPE_CHECKING:
    from kvstore.client import TLS, AsyncClient, Client, PutResult
    from kvstore.client.shm import ShmClient


_CLIENT_NAMES = frozenset({"AsyncClient", "Client", "PutResult", "TLS"})
#: (README names ShmClient beside Client and AsyncClient: an SDK review's
#: `from kvstore import ShmClient` raised ImportError)
_SHM_NAMES = frozenset({"ShmClient"})


if not TYPE_CHECKING:
    # (hidden from type checkers: a module __getattr__ makes every name of
    # the module Any to them, and `from kvstore import Clinet` type-checked)
    def __getattr__(name: str) -> Any:
        if name in _CLIENT_NAMES:
            import kvstore.client

            value = getattr(kvstore.client, name)
            globals()[name] = value
            return value
        if name in _SHM_NAMES:
            import kvstore.client.shm

            value = getattr(kvstore.client.shm, name)
            globals()[name] = value
            return value
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")

__all__ = [
    "TLS",
    "AckLevel",
    "AsyncClient",
    "BlockTooLarge",
    "BufferTooSmall",
    "CallCut",
    "Cancelled",
    "CapacityExhausted",
    "Client",
    "ConnectionFailed",
    "CorruptBlock",
    "DeadlineExceeded",
    "InvalidArgument",
    "InvalidBlock",
    "InvalidBuffer",
    "InvalidConfig",
    "InvalidKey",
    "InvalidNamespace",
    "KVStoreError",
    "LookupResult",
    "MalformedRequest",
    "PermissionDenied",
    "ProtocolError",
    "PutResult",
    "ReservationExpired",
    "ServerShuttingDown",
    "SessionEnd",
    "ShmClient",
    "StaleLease",
    "StorageError",
    "StoreStats",
    "TierName",
    "TierNotConfigured",
    "TierStats",
    "TierUnavailable",
    "TooManyConnections",
    "TurnEnd",
    "TurnEndReason",
    "Unauthenticated",
    "UnknownNamespace",
]
