"""What the clients share: the constructor, settings and request preparation."""

from __future__ import annotations

import decimal
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, SupportsFloat, TypedDict

import grpc

from kvstore._malloc import tune_malloc
from kvstore.client import _convert as conv
from kvstore.client._common import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_TARGET,
    BlockBuffers,
    Blocks,
    KeyLike,
    MetadataOption,
    MetadataPairs,
    channel_options,
    check_chunk_bytes,
    check_integer,
    check_lease_ms,
    check_session_id,
    metadata_source,
    normalize_blocks,
    normalize_buffers,
    normalize_keys,
    normalize_keys_with_lengths,
    parse_ack,
    parse_target,
    resolve_namespace,
)
from kvstore.dataplane import frames
from kvstore.errors import InvalidArgument, InvalidNamespace
from kvstore.types import (
    AckLevel,
    BlockFormat,
    Pin,
    Prefetch,
    SessionEnd,
    SessionHint,
    TurnEnd,
    TurnEndReason,
    Unpin,
    check_name,
    validate_namespace,
)


class PreparedPut:
    __slots__ = ("ack", "block_format", "blocks", "namespace", "session_id")

    def __init__(
        self, namespace: str, ack: AckLevel, blocks: list[tuple[bytes, memoryview]],
        session_id: str, block_format: BlockFormat = BlockFormat.RAW,
    ) -> None:
        self.namespace = namespace
        self.ack = ack
        self.blocks = blocks
        self.session_id = session_id
        self.block_format = block_format

    def messages(self, chunk_bytes: int) -> Iterator[bytes]:
        return conv.iter_put_messages(
            self.namespace, self.ack, self.blocks, self.session_id, chunk_bytes,
            int(self.block_format),
        )


@dataclass(frozen=True)
class TLS:
    """Connect over TLS. ``ca``: PEM bundle (path or bytes) that signed the
    server's certificate (None: the system's roots). ``cert``/``key``: this
    client's certificate for servers that require one (mutual TLS).
    ``server_name``: the name to check the certificate against when it is not
    the target's host."""

    ca: str | bytes | None = None
    cert: str | bytes | None = None
    key: str | bytes | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise InvalidArgument("TLS cert and key go together")
        return grpc.ssl_channel_credentials(_pem(self.ca), _pem(self.key), _pem(self.cert))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _pem(value: str | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS file {value}: {exc}") from None


class ClientSettings(TypedDict, total=False):
    """The keyword arguments every client takes (see :class:`kvstore.Client`)."""

    namespace: str | None
    timeout: SupportsFloat | None  # (any real number: numpy's included)
    chunk_bytes: int
    options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None
    tls: TLS | None
    metadata: MetadataOption
    token: str | None


class ClientBase:
    """The clients' one constructor (arguments: see :class:`kvstore.Client`),
    settings and argument checking; subclasses open the channel in :meth:`_connect`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        namespace: str | None = None,
        timeout: SupportsFloat | None = 60.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        options: Mapping[str, Any] | Iterable[tuple[str, Any]] | None = None,
        tls: TLS | None = None,
        metadata: MetadataOption = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.tls = tls
        self._grpc_target = parse_target(target)
        if namespace is not None:
            if not isinstance(namespace, str):
                raise InvalidNamespace(f"namespace must be a str, not {type(namespace).__name__}")
            validate_namespace(namespace)
        self.namespace = namespace
        self.timeout = check_timeout(timeout)
        self.chunk_bytes = check_chunk_bytes(chunk_bytes)
        self._options = channel_options(self.chunk_bytes, options)
        if tls is not None:
            if self._grpc_target.startswith("unix"):
                raise InvalidArgument("TLS applies to TCP targets; a unix socket is local and "
                                      "protected by its file mode")
            self._options = [*self._options, *tls.options()]
        #: The metadata of the next call (called once per call).
        self._metadata = with_bearer_token(metadata_source(metadata), token)
        # Received messages are MiB-sized: keep their buffers in the heap
        # (kvstore/_malloc.py; KVSTORE_MALLOC_TUNING=0 opts out).
        tune_malloc()
        self._connect()

    def _connect(self) -> None:
        """Set up the channel (or what opens it on first use)."""
        raise NotImplementedError

    def _credentials(self) -> grpc.ChannelCredentials | None:
        return self.tls.credentials() if self.tls is not None else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, namespace={self.namespace!r})"

    # -- request preparation (raises before anything is sent) -----------------

    def _prepare_put(
        self,
        blocks: Blocks,
        namespace: str | None,
        ack: str | AckLevel,
        session_id: str | None,
        block_format: BlockFormat = BlockFormat.RAW,
    ) -> PreparedPut:
        ns = resolve_namespace(namespace, self.namespace)
        level = parse_ack(ack)
        sid = check_session_id(session_id)
        return PreparedPut(ns, level, normalize_blocks(blocks), sid,
                           check_block_format(block_format))

    def _prepare_get(
        self, keys: Iterable[KeyLike], namespace: str | None, session_id: str | None
    ) -> tuple[int, bytes]:
        ns = resolve_namespace(namespace, self.namespace)
        ks = normalize_keys(keys)
        sid = check_session_id(session_id)
        max_chunk = min(self.chunk_bytes, 2**32 - 1)
        return len(ks), conv.encode_get_request(ns, ks, sid, max_chunk)

    def _prepare_get_into(
        self, keys: Iterable[KeyLike], buffers: BlockBuffers, namespace: str | None
    ) -> tuple[int, bytes, list[memoryview]]:
        count, req = self._prepare_get(keys, namespace, None)
        return count, req, normalize_buffers(buffers, count)

    def _prepare_lookup(
        self,
        keys: Iterable[KeyLike],
        namespace: str | None,
        lease_ms: int,
        session_id: str | None,
    ) -> tuple[int, bytes]:
        ns = resolve_namespace(namespace, self.namespace)
        ks, lengths = normalize_keys_with_lengths(keys)
        return len(ks), conv.encode_lookup_request(
            ns, ks, check_lease_ms(lease_ms), check_session_id(session_id), lengths
        )

    def _prepare_delete(self, keys: Iterable[KeyLike], namespace: str | None) -> tuple[int, bytes]:
        ns = resolve_namespace(namespace, self.namespace)
        ks = normalize_keys(keys)
        return len(ks), conv.encode_delete_request(ns, ks)

    def _prepare_list_blocks(self, namespace: str | None, prefix: bytes | str,
                             limit: int) -> bytes:
        ns = resolve_namespace(namespace, self.namespace)
        if isinstance(prefix, str):
            prefix = prefix.encode()
        elif not isinstance(prefix, (bytes, bytearray, memoryview)):
            # (bytes(5) is five zero bytes: an int listed nothing, silently)
            raise InvalidArgument(f"prefix must be bytes or str, not {type(prefix).__name__}")
        limit = check_integer(limit, "limit")
        if not 0 <= limit <= 2**32 - 1:
            raise InvalidArgument(f"limit {limit} is out of range (0 = the server's default)")
        return conv.encode_list_blocks_request(ns, bytes(prefix), limit)

    def _prepare_stats(self, namespace: str | None) -> bytes:
        return conv.encode_stats_request(validate_namespace(namespace) if namespace else "")

    def _prepare_session_event(
        self, session_id: str, event: SessionHint, namespace: str | None
    ) -> bytes:
        ns = resolve_namespace(namespace, self.namespace)
        if not isinstance(session_id, str):
            raise InvalidArgument(f"session_id must be a str, not {type(session_id).__name__}")
        check_name(session_id, "session_id")
        if isinstance(event, (Prefetch, Pin, Unpin)):
            normalize_keys(event.keys)
            if isinstance(event, Prefetch) and not event.keys and not session_id:
                raise InvalidArgument("prefetch needs keys or a session_id")
            if isinstance(event, Pin) and (not isinstance(event.ttl_ms, int)
                                           or not 0 <= event.ttl_ms < 2**32):
                raise InvalidArgument(f"ttl_ms must be an int in [0, 2**32), not "
                                      f"{event.ttl_ms!r}")
            return conv.encode_session_event(ns, session_id, event)
        if not session_id:
            raise InvalidArgument("session_id is required (a non-empty str)")
        if isinstance(event, TurnEnd):
            if not isinstance(event.tool_name, str):
                raise InvalidArgument(f"tool_name must be a str, not "
                                      f"{type(event.tool_name).__name__}")
            check_name(event.tool_name, "tool_name")
            if not isinstance(event.expected_gap_ms, int) or event.expected_gap_ms < 0:
                raise InvalidArgument(
                    f"expected_gap_ms must be a non-negative int, not {event.expected_gap_ms!r}"
                )
            try:
                TurnEndReason(event.reason)
            except ValueError:
                raise InvalidArgument(f"turn end reason {event.reason!r} is unknown") from None
        elif not isinstance(event, SessionEnd):
            raise InvalidArgument(
                "event must be a TurnEnd, SessionEnd, Prefetch, Pin or Unpin, not "
                f"{type(event).__name__}"
            )
        return conv.encode_session_event(ns, session_id, event)

    def _session_event_frame(self, session_id: str, event: SessionHint,
                             namespace: str | None) -> bytes | None:
        """A checked TurnEnd's or SessionEnd's SESSION_EVENT metadata for the
        data plane (call :meth:`_prepare_session_event` first); None for the
        other hints, which go over gRPC."""
        ns = resolve_namespace(namespace, self.namespace)
        if isinstance(event, TurnEnd):
            return frames.SessionEventRequest(
                ns, session_id, frames.EVENT_TURN_END, int(event.reason),
                event.expected_gap_ms, event.tool_name).encode()
        if isinstance(event, SessionEnd):
            return frames.SessionEventRequest(ns, session_id, frames.EVENT_SESSION_END,
                                              discard=event.discard).encode()
        return None


def check_block_format(block_format: BlockFormat | int) -> BlockFormat:
    if type(block_format) is BlockFormat:
        return block_format  # (the default: BlockFormat(x) costs 0.8 us a call)
    try:
        return BlockFormat(block_format)
    except ValueError:
        names = ", ".join(f"{f.name} ({f.value})" for f in BlockFormat)
        raise InvalidArgument(f"block_format {block_format!r} is not one of {names}") from None


#: The longest deadline a call may have: gRPC's deadline arithmetic
#: overflows past about 9e9 s, and a finite timeout above it (or inf) failed
#: every call at once with DeadlineExceeded.
MAX_TIMEOUT_S = 1e9


def check_timeout(timeout: SupportsFloat | None) -> float | None:
    """A client's ``timeout``: seconds > 0, or None (or inf) for no deadline."""
    if timeout is None:
        return None
    # (numbers.Real: numpy's float32 and int64 too, which worked before the
    # check; float() below makes them a float)
    if isinstance(timeout, bool) or not isinstance(timeout, (numbers.Real, decimal.Decimal)):
        raise InvalidArgument(f"timeout must be a number of seconds or None, not "
                              f"{type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except (OverflowError, ValueError):  # (10**400: past any float; a signalling NaN)
        seconds = math.nan  # refused below, as a number out of range
    if seconds == math.inf:
        return None  # (what inf means: no deadline)
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise InvalidArgument(f"timeout must be positive and at most {MAX_TIMEOUT_S:.0e} s, "
                              f"or None for no deadline, not {timeout!r}")
    return seconds


def turn_end_event(
    reason: TurnEndReason | str | int, expected_gap_ms: int, tool_name: str
) -> TurnEnd:
    if isinstance(reason, str):
        try:
            r = TurnEndReason[reason.strip().upper()]
        except KeyError:
            names = ", ".join(m.name.lower() for m in TurnEndReason)
            raise InvalidArgument(f"turn end reason {reason!r} is not one of {names}") from None
    else:
        try:
            r = TurnEndReason(reason)
        except ValueError:
            raise InvalidArgument(f"turn end reason {reason!r} is unknown") from None
    return TurnEnd(reason=r, expected_gap_ms=expected_gap_ms, tool_name=tool_name)


def with_bearer_token(source: Callable[[], MetadataPairs | None],
                      token: str | None) -> Callable[[], MetadataPairs | None]:
    """``token=``: every call also sends ``authorization: Bearer <token>`` (servers
    with auth.tokens_file; docs/security.md)."""
    if token is None:
        return source
    if not isinstance(token, str) or not token.strip() or token != token.strip() \
            or not token.isprintable():
        raise InvalidArgument("token must be a non-empty printable str without surrounding "
                              "spaces")
    bearer = (("authorization", f"Bearer {token}"),)

    def pairs() -> MetadataPairs:
        return bearer + (source() or ())

    return pairs


def open_channel(grpc_module: Any, target: str, options: list[tuple[str, Any]],
                 credentials: grpc.ChannelCredentials | None) -> Any:
    """A channel from ``grpc`` or ``grpc.aio``: secure when there are credentials."""
    if credentials is not None:
        return grpc_module.secure_channel(target, credentials, options=options)
    return grpc_module.insecure_channel(target, options=options)
