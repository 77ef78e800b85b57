"""Configuration: frozen dataclasses, loaded once at the edge.

Sources, later ones winning: built-in defaults, a TOML file (``--config`` or
``KVSTORE_CONFIG``), environment variables ``KVSTORE_<SECTION>_<OPTION>``
(e.g. ``KVSTORE_L1_CAPACITY=2GiB``), command-line flags
``--<section>-<option>`` (e.g. ``--l1-capacity 2GiB``). Every option is
declared once, below, with its help text; ``kvstore serve --help`` and the
README's config reference are generated from these declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore._spin import MAX_BUSY_POLL_US
from kvstore.errors import InvalidConfig, InvalidNamespace
from kvstore.l3url import check_credentials, check_location, check_obstore
from kvstore.types import validate_namespace

_log = logging.getLogger(__name__)

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


#: The names policy.name takes: kvstore.policy.POLICIES registers exactly
#: these (it imports this module, so this cannot import it; a test checks).
POLICY_NAMES = frozenset({"lru", "s3fifo", "sieve", "gdsf", "session"})


def split_host_port(option: str, address: str) -> tuple[str, int]:
    """``host:port`` (IPv6 in brackets) of a listen address, or InvalidConfig
    naming ``option``: a host is required (":0" binds nothing the server can
    name), a port is 0..65535 in ASCII digits."""
    host, sep, port = address.rpartition(":")
    if not sep or not host.strip("[]") or not (port.isascii() and port.isdigit()) \
            or int(port) > 65535:
        raise InvalidConfig(f"{option} {address!r} is not host:port")
    return host, int(port)

#: The longest time in milliseconds a server option takes (a uint32 in the proto).
MAX_MS = 2**32 - 1
#: The largest size any option takes (4 EiB): past it a value overflowed the
#: C types it ends in (an mmap length, LMDB's map size) with a traceback.
MAX_SIZE = 2**62


def parse_size(value: Any) -> int:
    """``"64MiB"``, ``"1.5G"``, ``"4096"`` or an int → bytes (binary units)."""
    if isinstance(value, (bool, float)):
        # (TOML's 1.9 was taken as 1 byte: write an integer, or a string with a unit)
        raise InvalidConfig(f"size {value!r} is not a number of bytes (examples: 4096, "
                            "\"64MiB\", \"1.5GiB\")")
    if isinstance(value, int):
        if value < 0:
            raise InvalidConfig(f"size {value} is negative")
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise InvalidConfig(f"size {value!r} is not understood (examples: 4096, 64MiB, "
                                "2GiB)")
        unit = (m.group(2) or "").upper().replace("I", "").rstrip("B") or ""
        if m.group(2) and m.group(2).upper() == "B":
            unit = ""
        exact = float(m.group(1)) * _UNITS[unit]
        if exact != int(exact):
            raise InvalidConfig(f"size {value!r} is not a whole number of bytes")
        size = int(exact)
    if size > MAX_SIZE:
        raise InvalidConfig(f"size {value!r} is larger than 4 EiB")
    return size


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that divides them: ``"64 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or n % 1024:
            return f"{n} {unit}"
        n //= 1024
    return f"{n} TiB"


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    # ("" too: KVSTORE_L2_ENABLED= turned L2 off without a word)
    raise InvalidConfig(f"{value!r} is not a boolean (use true or false)")


def parse_int(value: Any) -> int:
    # int() would take TOML's 2.7 as 2 and true as 1: a typo, not a count.
    if isinstance(value, (bool, float)):
        raise InvalidConfig(f"{value!r} is not an integer")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidConfig(f"{value!r} is not an integer") from None


def parse_float(value: Any) -> float:
    if isinstance(value, bool):  # (TOML's true was taken as 1.0)
        raise InvalidConfig(f"{value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidConfig(f"{value!r} is not a number") from None
    if not math.isfinite(number):  # nan passes every "must be positive" check
        raise InvalidConfig(f"{value!r} is not a finite number")
    return number


def parse_str(value: Any) -> str:
    # (str() made TOML's data_dir = ["/var/lib/kvstore"] a directory named
    # "['/var/lib/kvstore']", and unix_socket = true a socket named "True")
    if not isinstance(value, str):
        raise InvalidConfig(f"{value!r} is not a string")
    return value


def parse_path(value: Any) -> str:
    """A path, absolute (``~`` expanded, a relative one taken from the current
    directory): the server hands some to clients (the arena, the data plane's
    socket), who run elsewhere. Empty and ``off`` stay as they are."""
    text = parse_str(value)
    if text in ("", "off"):
        return text
    return os.path.abspath(os.path.expanduser(text))


def parse_own_path(value: Any) -> str:
    """A path only the server uses (``data_dir``): ``~`` expanded (it made a
    directory named ``~``), a relative one kept, from the server's directory."""
    return os.path.expanduser(parse_str(value))


def parse_str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(parse_str(v) for v in value)
    return tuple(v.strip() for v in parse_str(value).split(",") if v.strip())


def opt(default: Any, help: str, parse: Callable[[Any], Any]) -> Any:
    """Declare one option: its default, its help text and its parser."""
    return field(default=default, metadata={"help": help, "parse": parse})


@dataclass(frozen=True)
class ServerConfig:
    listen: str = opt("127.0.0.1:50051", "TCP address host:port to listen on; empty disables TCP",
                      parse_str)
    unix_socket: str = opt("", "unix socket path to listen on (created with mode 0600); "
                           "empty disables it", parse_path)
    tls_cert: str = opt("", "PEM certificate (chain) for TLS on the TCP listeners (gRPC "
                        "and the data plane); with tls_key. Renewed files are taken into "
                        "use without a restart. The unix socket stays plaintext (mode 0600)",
                        parse_path)
    tls_key: str = opt("", "PEM private key for tls_cert", parse_path)
    tls_client_ca: str = opt("", "PEM CA bundle: when set, TCP clients must present a "
                             "certificate it signed (mutual TLS)", parse_path)
    max_block_bytes: int = opt(64 * 1024**2, "largest block accepted by Put", parse_size)
    chunk_bytes: int = opt(1024**2, "default size of the data field of each Get chunk",
                           parse_size)
    max_chunk_bytes: int = opt(3 * 1024**2, "largest Get chunk a client may ask for "
                               "(stays under gRPC's 4 MiB default message limit)", parse_size)
    max_message_bytes: int = opt(8 * 1024**2, "largest gRPC message accepted (Put chunks)",
                                 parse_size)
    max_connections: int = opt(1024, "gRPC connections open at once, every listener "
                               "together; one beyond it is closed as it is accepted (its "
                               "client sees 'cannot reach'): a flood of connections cannot "
                               "run the server out of file descriptors or memory (~32 KB "
                               "each)", parse_int)
    max_calls: int = opt(4096, "kvstore gRPC calls in progress at once, every client "
                         "together, under auth one identity at most half; one beyond is "
                         "refused RESOURCE_EXHAUSTED "
                         "at once (an open call, a Put stream sending nothing included, holds "
                         "~6 KB). Health checks are not counted", parse_int)
    max_lease_ms: int = opt(60_000, "longest lease a Lookup or a shared-memory acquire may "
                            "take", parse_int)
    namespaces: tuple[str, ...] = opt((), "comma-separated namespaces this server accepts; "
                                      "empty accepts any valid name", parse_str_list)
    grace_seconds: float = opt(10.0, "on SIGTERM, how long in-flight calls may take to finish",
                               parse_float)
    workers: int = opt(4, "threads for blocking LMDB reads and native work", parse_int)
    shm_reserve_ms: int = opt(30_000, "shared memory: how long a reserved slot waits for its "
                              "commit", parse_int)
    max_pin_ms: int = opt(600_000, "longest pin a SessionEvent may take (and the TTL of a pin "
                          "that names none)", parse_int)
    pin_quota: float = opt(0.25, "most L1 one namespace may pin (whole pages), as a share of "
                           "l1.capacity", parse_float)
    shm_lease_ms: int = opt(30_000, "shared memory: default lease on acquired blocks (a "
                            "crashed client's leases end after this; at most max_lease_ms)",
                            parse_int)
    shm_quarantine_ms: int = opt(60_000, "shared memory: how long the slot of an expired "
                                 "reservation stays unused (its writer may be slow, not gone) "
                                 "before it returns to L1", parse_int)
    shm_namespaces: tuple[str, ...] = opt((), "comma-separated namespaces that may use shared "
                                          "memory (every attached client can read the whole "
                                          "arena); empty lets every namespace use it: one "
                                          "trust domain", parse_str_list)
    metrics_listen: str = opt("", "serve Prometheus metrics at http://host:port/metrics (e.g. "
                              "127.0.0.1:9400; needs prometheus-client, kvstore's metrics "
                              "extra); empty disables it", parse_str)
    # issue 14 data plane (docs/dataplane.md)
    data_plane: bool = opt(True, "serve the data plane (a framed binary protocol beside gRPC "
                           "for Lookup, Get, Put and the Shm calls; sessions open with the "
                           "OpenDataPlane call); false: gRPC only", parse_bool)
    data_plane_listen: str = opt("", "data plane TCP address host:port; empty: server.listen's "
                                 "host on an ephemeral port (none when server.listen is "
                                 "empty); 'off' disables it", parse_str)
    data_plane_unix: str = opt("", "data plane unix socket path; empty: server.unix_socket "
                               "with '.dp' appended (none when server.unix_socket is empty); "
                               "'off' disables it", parse_path)
    data_plane_timeout_ms: int = opt(30_000, "data plane: how long one frame's payload may "
                                     "take to arrive or be sent (a Get's block stays pinned "
                                     "meanwhile); a slower peer is disconnected", parse_int)
    put_idle_ms: int = opt(30_000, "gRPC Put: longest wait for the next chunk of a block "
                           "half sent (its L1 room is held meanwhile); then the stream fails "
                           "DEADLINE_EXCEEDED and nothing of that block is stored; also the "
                           "longest wait for a stream's first message or the next block "
                           "(the blocks before are stored). gRPC Get: "
                           "longest wait for the client to take a chunk (its block stays "
                           "pinned meanwhile); then the call ends DEADLINE_EXCEEDED and lets "
                           "the block go", parse_int)
    data_plane_ticket_ms: int = opt(10_000, "data plane: how long an OpenDataPlane ticket "
                                    "stays valid (each is good for one connection)", parse_int)
    data_plane_max_meta: int = opt(1024**2, "data plane: largest metadata of one request "
                                   "frame", parse_size)
    data_plane_max_payload: int = opt(1024**3, "data plane: largest payload (a Put's blocks) "
                                      "of one request frame", parse_size)
    data_plane_max_connections: int = opt(1024, "data plane: connections open at once; beyond "
                                          "it a new session is refused at HELLO "
                                          "(RESOURCE_EXHAUSTED) and the SDK uses gRPC", parse_int)
    busy_poll_us: int = opt(200, "after answering, how long (µs) the event loop keeps polling "
                            "for the next request before it sleeps (a sleeping vCPU costs "
                            f"~40 µs to wake); 0 turns it off; at most {MAX_BUSY_POLL_US}. "
                            "Costs up to this much CPU per request that arrives later",
                            parse_int)


@dataclass(frozen=True)
class L1Config:
    capacity: int = opt(512 * 1024**2, "size of the host-RAM arena (allocated and pre-faulted "
                        "at start)", parse_size)
    page_bytes: int = opt(4096, "allocation granularity inside the arena", parse_size)
    prefault: bool = opt(True, "touch every page of the arena at start so no Put pays a "
                         "page fault", parse_bool)
    shm_path: str = opt("", "put the arena in this shared-memory file (e.g. "
                        "/dev/shm/kvstore/l1.arena, in a directory made for it beforehand: "
                        "the server does not make it); empty keeps it anonymous", parse_path)
    verify_reads: str = opt("shared", "check L1 bytes against their checksum each time they "
                            "leave the process (a Get, an L2 write, an L3 upload): 'shared', "
                            "when the arena is a shared-memory file (attached clients can "
                            "write it); 'always', also for an anonymous arena, which only the "
                            "server writes", parse_str)

    @property
    def reads_checked(self) -> bool:
        """Whether L1 bytes are checked on their way out: always in a shared-memory
        file (attached clients map it read-write); in an anonymous arena, which
        only the server writes (checking each block as it arrives), on request."""
        return bool(self.shm_path) or self.verify_reads == "always"


@dataclass(frozen=True)
class L2Config:
    enabled: bool = opt(True, "keep blocks in LMDB under <data-dir>/l2", parse_bool)
    capacity: int = opt(8 * 1024**3, "most payload bytes kept in L2; beyond it the policy "
                        "drops blocks", parse_size)
    initial_map_size: int = opt(1024**3, "initial LMDB map size (less than 1 MiB counts as "
                                "1 MiB); the map doubles when full", parse_size)
    sync: bool = opt(False, "fsync every commit: local-level Puts survive a power loss; off, "
                     "they survive a crash or kill of the server process, and a power loss "
                     "loses what the kernel had not written back and may leave L2 "
                     "unopenable (Deletes are synced either way)", parse_bool)
    batch_bytes: int = opt(64 * 1024**2, "most bytes the writer thread commits in one "
                           "transaction", parse_size)
    write_queue_bytes: int = opt(256 * 1024**2, "most bytes waiting for the L2 writer; "
                                 "further memory-level Puts wait for room", parse_size)
    write_mode: str = opt("evict", "when memory-level Puts reach L2: 'evict' (write-back: "
                          "before they leave L1, cleaned ahead of time, and at shutdown) or "
                          "'always' (write-behind for every block)", parse_str)
    clean_reserve: float = opt(0.25, "write-back: share of L1 kept free or already in L2, so "
                               "eviction never waits for the disk", parse_float)
    compact_index: bool = opt(True, "index blocks that are only in L2 in the compact index "
                              "(~100 B each instead of ~550; docs/index.md): L2 evicts them "
                              "least recently used first (sampled), before asking the policy",
                              parse_bool)
    recover: bool = opt(False, "at start, when the L2 environment is damaged (LMDB cannot "
                        "open or read it), move it aside to <dir>.damaged-<time> and start "
                        "with an empty L2 instead of refusing to start", parse_bool)


@dataclass(frozen=True)
class L3Config:
    url: str = opt("", "object store URL: s3://bucket/prefix or file:///path; empty disables L3",
                   parse_str)
    endpoint: str = opt("", "S3 endpoint URL (MinIO, Ceph, rclone...); plain http:// is allowed "
                        "only for loopback endpoints", parse_str)
    region: str = opt("us-east-1", "S3 region", parse_str)
    access_key_id: str = opt("", "S3 access key (prefer env KVSTORE_L3_ACCESS_KEY_ID)", parse_str)
    secret_access_key: str = opt("", "S3 secret key (prefer env KVSTORE_L3_SECRET_ACCESS_KEY)",
                                 parse_str)
    concurrency: int = opt(16, "most object-store write requests in flight (uploads, deletes, "
                           "the listing); reads have their own share, read_concurrency",
                           parse_int)
    timeout_s: float = opt(5.0, "per-request timeout; a read that takes longer is a miss",
                           parse_float)
    retries: int = opt(3, "retries of a failed request, with jittered exponential backoff",
                       parse_int)
    write_queue_bytes: int = opt(512 * 1024**2, "most bytes waiting to be written to L3 "
                                 "(write-behind); beyond it demotions wait", parse_size)
    breaker_failures: int = opt(5, "consecutive failures that open the circuit breaker",
                                parse_int)
    breaker_reset_s: float = opt(5.0, "how long the breaker stays open before one probe",
                                 parse_float)
    outage_spill: float = opt(0.5, "while L3 is unavailable or slower than the writes, L2 "
                              "keeps the blocks due for L3 up to this fraction over its "
                              "capacity (they move as L3 takes them); beyond it they are "
                              "dropped", parse_float)
    list_on_start: bool = opt(True, "rebuild the L3 part of the index by listing the bucket "
                              "at start (in the background)", parse_bool)
    # Reads beside the drain (hardening item 9): their own request slots, and a paced drain.
    read_concurrency: int = opt(8, "most object-store read requests (Get, HEAD, health probe) "
                                "in flight, on top of concurrency: a demotion backlog never "
                                "holds a read's slot; Prefetch's reads take at most a quarter "
                                "of them", parse_int)
    drain_concurrency: int = opt(4, "most background demotions uploading at once (at most "
                                 "concurrency; the rest of the write slots stay free for "
                                 "ack=remote Puts and deletes); the others wait their turn "
                                 "before their deadline starts", parse_int)


@dataclass(frozen=True)
class SessionPolicyConfig:
    """The session policy's knobs (docs/policy.md); the replay lab tunes the same ones."""

    horizon: float = opt(-1.0, "ranking key: > 0, seconds of residence per expected hit "
                         "within this many seconds; < 0, the same within -horizon x the "
                         "first tier's turnover time (seconds to evict as many blocks as it "
                         "holds); 0, the mean remaining wait", parse_float)
    placing_scale: float = opt(1.7, "ranking key of the stream whose request is being "
                               "placed (request running, latest caller) times this: its own "
                               "new blocks give way before other streams' sooner (1: its "
                               "class's key as is; tuned by cross-validation, "
                               "docs/policy.md)", parse_float)
    learn: bool = opt(True, "learn the gap model from the traffic (false: keep the prior "
                      "guesses, for tests)", parse_bool)
    rerank_s: float = opt(2.0, "longest a ranking of the streams stands without a request or "
                          "hint (s)", parse_float)
    max_tools: int = opt(256, "most tool names (TurnEnd.tool_name) with a gap model of their "
                         "own", parse_int)
    tool_min: int = opt(8, "gaps observed after a tool's calls before its own model ranks "
                        "its streams", parse_int)
    trust_limit: int = opt(2048, "bound of the trust counter (pair votes session vs LRU)",
                           parse_int)
    pair_limit: int = opt(1 << 17, "most block pairs (session choice vs LRU choice) waiting "
                          "for a vote", parse_int)
    duel: bool = opt(True, "replay requests on a shadow LRU of the first tier's size and "
                     "fall back to LRU while it serves more hits", parse_bool)
    duel_decay: float = opt(0.995, "per-request decay of the duel's hit counts", parse_float)
    duel_margin: float = opt(0.003, "share of the shadow's hits by which it must lead (plus "
                             "32 hits) before the policy falls back to LRU", parse_float)
    duel_z: float = opt(2.0, "standard deviations of its decayed lead by which the shadow "
                        "must lead too before the policy falls back to LRU (0: the margin "
                        "alone)", parse_float)
    duel_warmup: int = opt(1000, "requests after the first tier fills before the duel may "
                           "fall back to LRU", parse_int)
    trust_back: int = opt(256, "in LRU fallback: the trust (pair votes) that returns to the "
                          "session ranking", parse_int)
    duel_retry: int = opt(300, "in LRU fallback: retry the session ranking after this many "
                          "requests (0: only on trust_back)", parse_int)
    max_streams: int = opt(4096, "most streams (sessions, sub-agents) whose state the policy "
                           "keeps; over it the least recently active one is forgotten (it "
                           "starts afresh if it returns, its blocks ranked by LRU age)",
                           parse_int)
    max_tracked_blocks: int = opt(1 << 20, "most blocks of the streams' latest requests "
                                  "the policy keeps, all streams together (up to ~260 bytes "
                                  "each, with the duel's shadow LRU); over it the least "
                                  "recently active streams are forgotten as over "
                                  "max_streams", parse_int)


#: Options that no longer exist. A config file that still sets one loads, with a warning
#: naming what became of it (flags and variables of these names are gone).
RETIRED_OPTIONS: dict[tuple[str | None, str], str] = {
    ("policy.session", "quantile"): "the ranking key with horizon 0 is the conditional mean",
    ("policy.session", "per_stream"): "per-stream gap estimates lost to the class model",
    ("policy.session", "defer_shared"): "a shared block is always offered with the stream "
                                        "that referenced it last",
}


@dataclass(frozen=True)
class PolicyConfig:
    name: str = opt("session", "placement policy: session, lru, s3fifo, sieve or gdsf "
                    "(docs/policy.md)", parse_str)
    clock: str = opt("wall", "time the policy sees: 'wall' (the server's monotonic clock) or "
                     "'client' (seconds from each call's kvstore-clock metadata: for replaying "
                     "traces through a live server, never for production)", parse_str)
    session: SessionPolicyConfig = field(default_factory=SessionPolicyConfig)


@dataclass(frozen=True)
class AuthConfig:
    """Per-tenant credentials (docs/security.md); off while tokens_file is empty."""

    tokens_file: str = opt("", "grants file, lines 'CREDENTIAL IDENTITY NAMESPACES [admin]' "
                           "(credential: a token's SHA-256 hex, or cert:NAME); when set every "
                           "call needs a bearer token or a mapped client certificate (reread "
                           "on SIGHUP; docs/security.md)", parse_path)


@dataclass(frozen=True)
class NamespaceSizes:
    """Per-namespace byte limits: a table ``{ns = "1GiB", ns2 = "2GiB"}`` or the text
    ``ns=1GiB,ns2=2GiB``, each taken by the file, an env variable and a flag."""

    limits: tuple[tuple[str, int], ...] = ()

    def get(self, namespace: str, default: int = 0) -> int:
        for name, size in self.limits:
            if name == namespace:
                return size
        return default

    def __str__(self) -> str:
        return ",".join(f"{n}={s}" for n, s in self.limits)


def _inline_table(text: str) -> dict[str, Any]:
    """``{chat = "1GiB", code = "512MiB"}``, a TOML inline table as the file
    takes it, given to an env variable or a flag."""
    try:
        return dict(tomllib.loads(f"value = {text.strip()}")["value"])
    except (tomllib.TOMLDecodeError, TypeError, ValueError) as exc:
        reason = re.sub(r" \(at line \d+, column \d+\)$", "", str(exc))  # (of "value = ...")
        raise InvalidConfig(f"{text.strip()!r} is not a TOML inline table like "
                            f"{{chat = \"1GiB\"}} ({reason})") from None


def parse_namespace_sizes(value: Any) -> NamespaceSizes:
    if isinstance(value, NamespaceSizes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("{"):
        value = _inline_table(value)
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        pairs = []
        for item in str(value).split(","):
            if item.strip():
                name, sep, size = item.partition("=")
                if not sep:
                    raise InvalidConfig(f"{item.strip()!r} is not NAMESPACE=SIZE")
                pairs.append((name.strip(), size))
    return NamespaceSizes(tuple((str(n), parse_size(s)) for n, s in pairs))


NO_NAMESPACE_LIMITS = NamespaceSizes()


@dataclass(frozen=True)
class QuotaConfig:
    """Per-namespace limits on L1 and L2 bytes (docs/security.md): a namespace
    over its limit gives up its own blocks first when the tier needs room."""

    # (field, not opt: ruff cannot tell this default is immutable)
    l1: NamespaceSizes = field(default=NO_NAMESPACE_LIMITS, metadata={
        "help": "L1 bytes per namespace, e.g. {chat = \"1GiB\"} (a TOML table) or "
                "chat=1GiB,code=512MiB", "parse": parse_namespace_sizes})
    l1_per_namespace: int = opt(0, "L1 bytes of each namespace not named in quota.l1 "
                                "(0: no limit)", parse_size)

    l2: NamespaceSizes = field(default=NO_NAMESPACE_LIMITS, metadata={
        "help": "L2 bytes per namespace, e.g. {chat = \"20GiB\"} (a TOML table) or "
                "chat=20GiB,code=5GiB", "parse": parse_namespace_sizes})
    l2_per_namespace: int = opt(0, "L2 bytes of each namespace not named in quota.l2 "
                                "(0: no limit)", parse_size)

    def l1_limit(self, namespace: str) -> int:
        """The namespace's L1 limit in bytes (0: none)."""
        return self.l1.get(namespace, self.l1_per_namespace)

    def l2_limit(self, namespace: str) -> int:
        """The namespace's L2 limit in bytes (0: none)."""
        return self.l2.get(namespace, self.l2_per_namespace)

    @property
    def enabled(self) -> bool:
        """L1 quotas are set."""
        return bool(self.l1.limits) or self.l1_per_namespace > 0

    @property
    def l2_enabled(self) -> bool:
        """L2 quotas are set."""
        return bool(self.l2.limits) or self.l2_per_namespace > 0


@dataclass(frozen=True)
class Config:
    data_dir: str = opt("./kvstore-data",
                        "directory for L2 and its lock file (one server per data dir)",
                        parse_own_path)
    log_format: str = opt("text", "server log lines: 'text' (one line per event) or 'json' "
                          "(one JSON object per line, for log collectors)", parse_str)
    server: ServerConfig = field(default_factory=ServerConfig)
    l1: L1Config = field(default_factory=L1Config)
    l2: L2Config = field(default_factory=L2Config)
    l3: L3Config = field(default_factory=L3Config)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    quota: QuotaConfig = field(default_factory=QuotaConfig)

    @property
    def l2_path(self) -> Path:
        return Path(self.data_dir) / "l2"

    @property
    def l2_state_path(self) -> Path:
        """Which L2 environment this data dir last ran with (its id and the
        newest transaction synced): an older copy put back is refused."""
        return Path(self.data_dir) / "l2.state"


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "l1": L1Config,
    "l2": L2Config,
    "l3": L3Config,
    "policy": PolicyConfig,
    "policy.session": SessionPolicyConfig,  # a table within a section: [policy.session]
    "auth": AuthConfig,
    "quota": QuotaConfig,
}


def _options() -> list[tuple[str | None, dataclasses.Field[Any]]]:
    out: list[tuple[str | None, dataclasses.Field[Any]]] = [
        (None, f) for f in dataclasses.fields(Config) if f.name not in SECTIONS
    ]
    for section, cls in SECTIONS.items():  # (a nested section's field has no help)
        out.extend((section, f) for f in dataclasses.fields(cls) if "help" in f.metadata)
    return out


def changed_options(old: Config, new: Config) -> list[str]:
    """The options (``section.name``) whose values differ between two configurations."""
    def value(config: Config, section: str | None, name: str) -> Any:
        holder: Any = config
        for part in (section.split(".") if section else []):
            holder = getattr(holder, part)
        return getattr(holder, name)

    return [f"{section}.{f.name}" if section else f.name for section, f in _options()
            if value(old, section, f.name) != value(new, section, f.name)]


def _flag(section: str | None, name: str) -> str:
    parts = [section, name] if section else [name]
    return "--" + "-".join(p.replace("_", "-").replace(".", "-") for p in parts if p)


def _env(section: str | None, name: str) -> str:
    parts = ["KVSTORE", section, name] if section else ["KVSTORE", name]
    return "_".join(p.upper().replace(".", "_") for p in parts if p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option, with its help and default."""
    parser.add_argument("--config", help="TOML config file (env KVSTORE_CONFIG)")
    for section, f in _options():
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(any)"
        parser.add_argument(
            _flag(section, f.name),
            dest=f"{section or ''}__{f.name}",
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [default: {default}; env {_env(section, f.name)}]",
        )


def _apply(values: dict[tuple[str | None, str], Any], source: str,
           origins: Mapping[tuple[str | None, str], str] | None = None) -> Config:
    """``origins``: where each value came from (a flag, a variable, the file), for
    the error that names it."""
    known = {(s, f.name): f for s, f in _options()}
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for (section, name), raw in values.items():
        f = known.get((section, name))
        if f is None and (section, name) in RETIRED_OPTIONS:
            _log.warning("config option %s%s in %s is retired and ignored: %s",
                         f"{section}." if section else "", name, source,
                         RETIRED_OPTIONS[(section, name)])
            continue
        if f is None:
            where = f"[{section}] " if section else ""
            raise InvalidConfig(f"unknown config option {where}{name!r} in {source}")
        try:
            parsed = f.metadata["parse"](raw)
        except InvalidConfig as exc:
            dotted = f"{section}.{name}" if section else name
            origin = (origins or {}).get((section, name), source)
            raise InvalidConfig(f"{dotted} (from {origin}): {exc}") from None
        if section is None:
            top[name] = parsed
        else:
            sections[section][name] = parsed
    built: dict[str, Any] = {}
    for s in sorted(SECTIONS, key=lambda s: -s.count(".")):  # nested sections first
        kwargs = dict(sections[s])
        for child in SECTIONS:
            if child.rpartition(".")[0] == s:
                kwargs[child.rpartition(".")[2]] = built[child]
        built[s] = SECTIONS[s](**kwargs)
    return Config(**top, **{s: built[s] for s in SECTIONS if "." not in s})


def _table(section: str, table: dict[str, Any],
           values: dict[tuple[str | None, str], Any]) -> None:
    """A TOML section's options into ``values``; a table within it (``[policy.session]``)
    is the nested section of that name."""
    for name, v in table.items():
        if f"{section}.{name}" in SECTIONS and isinstance(v, dict):
            _table(f"{section}.{name}", v, values)
        else:
            values[(section, name)] = v


def load(
    args: argparse.Namespace | None = None,
    env: Mapping[str, str] | None = None,
    file: str | os.PathLike[str] | None = None,
) -> Config:
    """Load the configuration once: defaults < file < env < flags."""
    env = os.environ if env is None else env
    values: dict[tuple[str | None, str], Any] = {}
    path = file or (getattr(args, "config", None) if args else None) or env.get("KVSTORE_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            raise InvalidConfig(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise InvalidConfig(f"config file {path}: {exc}") from None
        except UnicodeDecodeError as exc:  # (TOML is UTF-8: a Latin-1 "µs" in a comment)
            raise InvalidConfig(f"config file {path} is not UTF-8 text: {exc}") from None
        except OSError as exc:  # a directory, a file it may not read
            raise InvalidConfig(f"config file {path}: cannot read it: "
                                f"{exc.strerror or exc}") from None
        for key, value in doc.items():
            if key in SECTIONS and isinstance(value, dict):
                _table(key, value, values)
            elif key in SECTIONS:
                raise InvalidConfig(f"config file {path}: [{key}] must be a table")
            else:
                values[(None, key)] = value
    origins = dict.fromkeys(values, f"config file {path}")
    _refuse_unknown_env(env)
    for section, f in _options():
        name = _env(section, f.name)
        if name in env:
            values[(section, f.name)] = env[name]
            origins[(section, f.name)] = f"${name}"
    if args is not None:
        for section, f in _options():
            v = getattr(args, f"{section or ''}__{f.name}", None)
            if v is not None:
                values[(section, f.name)] = v
                origins[(section, f.name)] = _flag(section, f.name)
    config = _apply(values, str(path) if path else "the environment", origins)
    validate(config)
    return config


def _refuse_unknown_env(env: Mapping[str, str]) -> None:
    """A misspelt option's variable (``KVSTORE_L1_CAPCITY``) was read by no
    one, and the server ran on the default without a word; a typo in the
    file is refused naming the key, and so is one here. Only names under a
    section's prefix: other KVSTORE_* variables are the client's and tools'."""
    prefixes = tuple(f"KVSTORE_{s.upper().replace('.', '_')}_" for s in SECTIONS)
    known = {_env(section, f.name) for section, f in _options()}
    for name in sorted(env):
        if name.startswith(prefixes) and name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise InvalidConfig(f"environment variable {name} names no option{hint}: "
                                "`kvstore config --example` lists them; unset it")


#: What installs prometheus-client: kvstore's ``metrics`` extra (pyproject.toml; a
#: test checks the pin). Not ``pip install 'kvstore[metrics]'``: on PyPI ``kvstore``
#: is another project.
METRICS_EXTRA_INSTALL = "pip install 'prometheus-client>=0.20' (kvstore's metrics extra)"


def check_metrics_extra() -> None:
    """InvalidConfig in one line unless prometheus-client (server.metrics_listen's
    extra) imports."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise InvalidConfig(
            f"server.metrics_listen is set but prometheus-client is not installed: "
            f"{METRICS_EXTRA_INSTALL}; or leave server.metrics_listen empty") from None


def validate(config: Config) -> None:
    s = config.server
    if not config.data_dir:  # (the current directory, without a word)
        raise InvalidConfig("data_dir must not be empty")
    for f in dataclasses.fields(s):
        # Each goes to clients in a uint32 field (OpenDataPlane, ShmAttach):
        # 2^32 ms was accepted, then every data-plane call failed INTERNAL.
        if f.name.endswith("_ms") and getattr(s, f.name) > MAX_MS:
            raise InvalidConfig(f"server.{f.name} must be at most {MAX_MS} (49.7 days), not "
                                f"{getattr(s, f.name)}")
    if s.max_message_bytes > 2**31 - 1:  # (grpc's option is a C int)
        raise InvalidConfig(f"server.max_message_bytes must be under 2 GiB, not "
                            f"{s.max_message_bytes}")
    if s.data_plane_unix and s.data_plane_unix == s.unix_socket:
        raise InvalidConfig("server.data_plane_unix must not be server.unix_socket's path")
    if not s.listen and not s.unix_socket:
        raise InvalidConfig("set server.listen or server.unix_socket: the server needs an address")
    for option, address in (("server.listen", s.listen),
                            ("server.metrics_listen", s.metrics_listen),
                            ("server.data_plane_listen", s.data_plane_listen)):
        if address and not (option == "server.data_plane_listen" and address == "off"):
            split_host_port(option, address)
    if s.metrics_listen:
        check_metrics_extra()
    if bool(s.tls_cert) != bool(s.tls_key):
        raise InvalidConfig("server.tls_cert and server.tls_key go together")
    if s.tls_client_ca and not s.tls_cert:
        raise InvalidConfig("server.tls_client_ca needs server.tls_cert and server.tls_key")
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        path = getattr(s, name)
        if path and not Path(path).is_file():
            raise InvalidConfig(f"server.{name}: {path} is not a readable file")
    if s.max_block_bytes <= 0:
        raise InvalidConfig("server.max_block_bytes must be positive")
    if s.put_idle_ms <= 0:
        raise InvalidConfig("server.put_idle_ms must be positive")
    if s.data_plane_timeout_ms <= 0 or s.data_plane_ticket_ms <= 0:
        raise InvalidConfig("server.data_plane_timeout_ms and server.data_plane_ticket_ms "
                            "must be positive")
    if s.data_plane_max_meta < 4096 or s.data_plane_max_meta >= 2**32:
        raise InvalidConfig("server.data_plane_max_meta must be in 4 KiB .. 4 GiB")
    if not 0 <= s.busy_poll_us <= MAX_BUSY_POLL_US:
        raise InvalidConfig(f"server.busy_poll_us must be in 0..{MAX_BUSY_POLL_US} (µs), "
                            f"not {s.busy_poll_us}")
    if s.workers < 1:
        raise InvalidConfig(f"server.workers must be at least 1, not {s.workers}")
    if s.grace_seconds < 0:
        raise InvalidConfig(f"server.grace_seconds must be >= 0, not {s.grace_seconds}")
    for name in ("max_lease_ms", "max_pin_ms", "shm_lease_ms", "shm_reserve_ms",
                 "shm_quarantine_ms"):
        if getattr(s, name) < 0:
            raise InvalidConfig(f"server.{name} must be >= 0, not {getattr(s, name)}")
    for name in ("namespaces", "shm_namespaces"):
        for ns in getattr(s, name):
            try:  # the check a request's namespace gets: a name no request can use is a typo
                validate_namespace(ns)
            except InvalidNamespace as exc:
                raise InvalidConfig(f"server.{name}: {exc}") from None
    for name in ("data_plane_max_connections", "max_connections", "max_calls"):
        if getattr(s, name) < 1:
            raise InvalidConfig(f"server.{name} must be at least 1")
    if s.data_plane_max_payload < s.max_block_bytes:
        raise InvalidConfig("server.data_plane_max_payload must hold one block of "
                            "server.max_block_bytes")
    if s.chunk_bytes <= 0 or s.chunk_bytes > s.max_chunk_bytes:
        raise InvalidConfig("server.chunk_bytes must be in 1..server.max_chunk_bytes")
    if s.max_message_bytes < s.max_chunk_bytes + 64 * 1024:
        raise InvalidConfig("server.max_message_bytes must exceed max_chunk_bytes by 64 KiB")
    if config.l1.page_bytes <= 0 or config.l1.page_bytes & (config.l1.page_bytes - 1):
        raise InvalidConfig("l1.page_bytes must be a power of two")
    if config.l1.capacity < config.l1.page_bytes:
        raise InvalidConfig("l1.capacity must hold at least one page")
    if config.l1.verify_reads not in ("shared", "always"):
        raise InvalidConfig("l1.verify_reads must be 'shared' or 'always'")
    if config.policy.clock not in ("wall", "client"):
        raise InvalidConfig("policy.clock must be 'wall' or 'client'")
    if config.policy.name not in POLICY_NAMES:
        raise InvalidConfig(f"policy.name {config.policy.name!r} is not a policy; choose one "
                            f"of {', '.join(sorted(POLICY_NAMES))}")
    validate_session_policy(config.policy.session)
    if not 0.0 <= s.pin_quota <= 1.0:
        raise InvalidConfig("server.pin_quota must be in [0, 1]")
    if config.l2.write_mode not in ("evict", "always"):
        raise InvalidConfig("l2.write_mode must be 'evict' or 'always'")
    if not 0.0 <= config.l2.clean_reserve < 1.0:
        raise InvalidConfig("l2.clean_reserve must be in [0, 1)")
    if config.l2.write_queue_bytes < s.max_block_bytes:
        raise InvalidConfig("l2.write_queue_bytes must hold at least one max-size block")
    if config.l2.enabled and config.l2.capacity < 1:
        raise InvalidConfig("l2.capacity must be positive (for no L2: l2.enabled = false)")
    if config.l2.batch_bytes < 1:
        raise InvalidConfig(f"l2.batch_bytes must be positive, not {config.l2.batch_bytes}")
    if config.l2.initial_map_size < 1:
        raise InvalidConfig(f"l2.initial_map_size must be positive, not "
                            f"{config.l2.initial_map_size}")
    if config.l3.drain_concurrency < 1:
        raise InvalidConfig(f"l3.drain_concurrency must be at least 1, not "
                            f"{config.l3.drain_concurrency}")
    if config.l3.write_queue_bytes < 1:
        raise InvalidConfig("l3.write_queue_bytes must be positive, not 0")
    if config.l3.outage_spill < 0.0:
        raise InvalidConfig("l3.outage_spill must be >= 0")
    if config.l3.timeout_s <= 0.0:
        raise InvalidConfig(f"l3.timeout_s must be positive, not {config.l3.timeout_s}")
    # (the object tier checks these too; here, so that `config --effective`
    # refuses what `serve` would)
    for name, least in (("concurrency", 1), ("read_concurrency", 1), ("retries", 0),
                        ("breaker_failures", 1)):
        if getattr(config.l3, name) < least:
            raise InvalidConfig(f"l3.{name} must be at least {least}, not "
                                f"{getattr(config.l3, name)}")
    if config.l3.breaker_reset_s < 0:
        raise InvalidConfig(f"l3.breaker_reset_s must not be negative, not "
                            f"{config.l3.breaker_reset_s}")
    for tier in ("l1", "l2"):
        for ns, _ in getattr(config.quota, tier).limits:
            try:  # a quota for a name no request can use applies to nothing: a typo
                validate_namespace(ns)
            except InvalidNamespace as exc:
                raise InvalidConfig(f"quota.{tier}: {exc}") from None
    if config.l3.url:
        check_location(config.l3.url, config.l3.endpoint)
        check_credentials(config.l3.url, config.l3.access_key_id, config.l3.secret_access_key)
        check_obstore(config.l3.url)  # (after the URL's checks: a bad one is named first)
    if config.log_format not in ("text", "json"):
        raise InvalidConfig("log_format must be 'text' or 'json'")
    if config.auth.tokens_file and not Path(config.auth.tokens_file).is_file():
        raise InvalidConfig(f"auth.tokens_file: {config.auth.tokens_file} is not a readable "
                            "file")


def validate_session_policy(sp: SessionPolicyConfig) -> None:
    if not 0.0 < sp.duel_decay <= 1.0:
        raise InvalidConfig("policy.session.duel_decay must be in (0, 1]")
    for name in ("rerank_s", "duel_margin", "duel_z"):
        if getattr(sp, name) < 0.0:
            raise InvalidConfig(f"policy.session.{name} must be >= 0")
    for name in ("max_tools", "tool_min", "trust_limit", "pair_limit", "duel_warmup",
                 "trust_back", "duel_retry"):
        if getattr(sp, name) < 0:
            raise InvalidConfig(f"policy.session.{name} must be >= 0")
    if not 0.0 < sp.placing_scale <= 100.0:
        raise InvalidConfig("policy.session.placing_scale must be in (0, 100]")
    if sp.max_streams < 1:
        raise InvalidConfig("policy.session.max_streams must be >= 1")
    if sp.max_tracked_blocks < 1:
        raise InvalidConfig("policy.session.max_tracked_blocks must be >= 1")


def reference_markdown() -> str:
    """The config reference table for the README (kept in sync by a test)."""
    rows = ["| option | env | flag | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for section, f in _options():
        default = f.default
        if isinstance(default, tuple):
            default = ",".join(default) or "(any)"
        name = f"{section}.{f.name}" if section else f.name
        rows.append(
            f"| `{name}` | `{_env(section, f.name)}` | `{_flag(section, f.name)}` | "
            f"`{default}` | {f.metadata['help']} |"
        )
    return "\n".join(rows)


def update_readme(path: str | os.PathLike[str]) -> bool:
    """Rewrite the README's generated config reference; True if it changed."""
    text = Path(path).read_text()
    new = re.sub(r"(<!-- config-reference:start[^>]*-->\n).*?(<!-- config-reference:end -->)",
                 lambda m: m.group(1) + reference_markdown() + "\n" + m.group(2), text,
                 flags=re.S)
    if new != text:
        Path(path).write_text(new)
    return new != text


if __name__ == "__main__":  # python -m kvstore.config README.md
    import sys

    print("updated" if update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")
          else "up to date")
