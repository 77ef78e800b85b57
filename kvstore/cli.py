"""The ``kvstore`` command: run the server, or talk to one.

    kvstore serve [--ready-file PATH] [config flags]
    kvstore stats [--target T] [--namespace NS] [--json]
    kvstore ls    [--target T] NS [--prefix P] [--limit N] [--json]
    kvstore flush [--target T] NS [--yes]
    kvstore put   [--target T] --namespace NS [--ack memory|local|remote] KEY [FILE|-]
    kvstore get   [--target T] --namespace NS KEY [-o FILE|-]
    kvstore health [--target T] [--service S]
    kvstore config --effective [config flags] | --example [-o FILE]

KEY (and ``ls --prefix``) is UTF-8 text, or ``hex:`` followed by hex digits
for binary keys; ``ls`` prints keys the same way.
Exit status: 0 success; 1 a miss or an error from the server; 2 a usage or
configuration error. ``health`` (for probes): 0 SERVING, 1 NOT_SERVING, 2 the
server or the service could not be reached or is unknown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from kvstore import config as kvconfig
from kvstore.errors import InvalidConfig, KVStoreError, StorageError
from kvstore.types import DEFAULT_TARGET, BlockListing, StoreStats, TierStats

if TYPE_CHECKING:
    from kvstore.client import Client

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def parse_key(text: str) -> bytes:
    """``hex:0a1b...`` → those bytes; anything else → its UTF-8 bytes (bytes
    that were not valid UTF-8 on the command line come back unchanged)."""
    if text[:4].lower() == "hex:":
        digits = text[4:]
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"key {text!r}: after 'hex:' give an even number of hex digits"
            ) from None
    return text.encode("utf-8", "surrogateescape")


def format_key(key: bytes) -> str:
    """The text form of a key that :func:`parse_key` reads back."""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return "hex:" + key.hex()
    if text.isprintable() and text[:4].lower() != "hex:":
        return text
    return "hex:" + key.hex()


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Rows as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def _taken(t: TierStats) -> str:
    """The capacity a tier's blocks take; "n/a" from a server before 0.28.0
    (it does not say; its payload bytes would say less)."""
    return _human_bytes(t.used) if t.used or not t.bytes else "n/a"


def format_namespace_stats(stats: StoreStats) -> str:
    rows = [("tier", "blocks", "bytes", "taken")]
    for t in stats.tiers:
        rows.append((t.tier.name, str(t.blocks), _human_bytes(t.bytes), _taken(t)))
    return "\n".join([*_table(rows), "", f"namespace {stats.namespace}   (blocks and bytes "
                      "held, and the capacity they take: L1 counts whole pages; a block in "
                      "several tiers counts in each)"])


def format_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def format_listing(listing: BlockListing) -> str:
    rows = [("key", "size", "tiers", "age")]
    for b in listing.blocks:
        rows.append((format_key(b.key), str(b.size), ",".join(t.name for t in b.tiers),
                     format_age(b.age_s)))
    return "\n".join(_table(rows))


def format_stats(stats: StoreStats) -> str:
    if stats.namespace:
        return format_namespace_stats(stats)
    # (state last: the columns scripts read keep their places)
    header = ("tier", "blocks", "bytes", "capacity", "used", "hits", "misses", "evictions",
              "demotions", "promotions", "corrupt", "state")
    rows = [header]
    for t in stats.tiers:
        # (what the tier's capacity counts: L1's whole pages; a server
        # before 0.28.0 reports no `used`, and payload bytes would say less)
        used = f"{100.0 * t.used / t.capacity:.1f}%" if t.capacity and (t.used or not t.bytes) \
            else "n/a" if t.capacity else "-"
        rows.append((t.tier.name, str(t.blocks), _human_bytes(t.bytes), _human_bytes(t.capacity),
                     used, str(t.hits), str(t.misses), str(t.evictions), str(t.demotions),
                     str(t.promotions), str(t.corrupt), "up" if t.available else "DOWN"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                      strict=True)))
        for r in rows
    ]
    rate = f"{100.0 * stats.get_hits / stats.gets:.1f}%" if stats.gets else "-"
    lines.append("")
    lines.append(f"policy {stats.policy or '-'}   puts {stats.puts}   gets {stats.gets} "
                 f"(hits {stats.get_hits}, {rate})   session events {stats.session_events}")
    down = [t.tier.name for t in stats.tiers if not t.available]
    if down:
        lines.append(f"unavailable: {', '.join(down)} (reads from it are misses; `kvstore "
                     "health --service kvstore.v1.KVStore/L3` exits 1 while L3 is)")
    return "\n".join(lines)


def stats_to_json(stats: StoreStats) -> dict[str, Any]:
    doc = dataclasses.asdict(stats)
    for t in doc["tiers"]:
        t["tier"] = t["tier"].name
    return doc


# --------------------------------------------------------------------------- commands


def _err(message: str) -> None:
    from kvstore.config_toml import redact_urls  # (a refused l3.endpoint names its URL)

    print(f"kvstore: {redact_urls(message)}", file=sys.stderr)


def _client(args: argparse.Namespace, namespace: str | None = None) -> Client:
    # (imported here: it loads the block packer, which a bad KVSTORE_PURE
    # refuses, and `kvstore --version` then died of a traceback)
    from kvstore.client import Client

    target = args.target or os.environ.get("KVSTORE_TARGET") or DEFAULT_TARGET
    tls = None
    if args.tls_ca or args.tls_cert:
        from kvstore.client import TLS

        tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                  server_name=args.tls_server_name)
    return Client(target, namespace=namespace, timeout=args.timeout, tls=tls,
                  token=args.token or None)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Configuration and environment problems (a bad value, a port in use, a
    certificate that does not load, a data directory that cannot be written)
    are InvalidConfig, raised by config.load or the server's start-up checks
    and reported here as one line."""
    # SIGHUP is handled by the server (kvstore/server/app.py serve); until its
    # handler is in, its default action would kill a starting server.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN) if main_thread else None
    try:
        config = kvconfig.load(args)
        from kvstore.server import app  # the server loads only for this command

        status = app.run(config, ready_file=args.ready_file,
                         reload=lambda: kvconfig.load(args))
    except InvalidConfig as exc:
        _err(f"cannot start: {exc}")
        return EXIT_USAGE
    except StorageError as exc:
        # (damaged L2, or one that is not this data dir's: exit 1, in the same
        # words as every other refusal; an operator's log rule on "cannot
        # start" missed these. Not one met at the stop: a fix review.)
        from kvstore.server.app import StartRefused
        if not isinstance(exc, StartRefused):
            raise
        _err(f"cannot start: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)
    return status


def _cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats(namespace=args.namespace)
    if args.json:
        print(json.dumps(stats_to_json(stats), indent=2))
    else:
        print(format_stats(stats))
    return EXIT_OK


def _cmd_ls(args: argparse.Namespace) -> int:
    with _client(args, args.namespace) as client:
        listing = client.list_blocks(prefix=args.prefix, limit=args.limit)
    if args.json:
        print(json.dumps({"namespace": args.namespace, "truncated": listing.truncated,
                          "blocks": [{"key": format_key(b.key), "size": b.size,
                                      "tiers": [t.name for t in b.tiers],
                                      "age_s": round(b.age_s, 3)} for b in listing.blocks]},
                         indent=2))
    else:
        print(format_listing(listing))
    if listing.truncated:
        _err(f"more blocks match than the {len(listing.blocks)} shown; narrow --prefix or "
             "raise --limit")
    return EXIT_OK


def _confirm_flush(namespace: str) -> bool:
    """Ask on the terminal; without one, refuse (never wait on a pipe)."""
    if not sys.stdin.isatty():
        _err(f"flush: refusing to remove every block of namespace {namespace!r} without "
             "confirmation (stdin is not a terminal): pass --yes")
        return False
    try:
        answer = input(f"Remove every block of namespace {namespace!r} from L1, L2 and L3? "
                       "This cannot be undone. [y/N] ")
    except EOFError:
        answer = ""
    if answer.strip().lower() in ("y", "yes"):
        return True
    _err("flush cancelled: nothing removed")
    return False


def _cmd_flush(args: argparse.Namespace) -> int:
    from kvstore.types import validate_namespace

    validate_namespace(args.namespace)
    if not args.yes and not _confirm_flush(args.namespace):
        return EXIT_USAGE
    with _client(args, args.namespace) as client:
        flushed = client.flush()
    print(f"flushed {flushed} blocks from namespace {args.namespace}")
    return EXIT_OK


def _read_input(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as fh:
        return fh.read()


def _cmd_put(args: argparse.Namespace) -> int:
    data = _read_input(args.file)
    with _client(args, args.namespace) as client:
        result = client.put([(args.key, data)], ack=args.ack)
    print(f"stored {format_key(args.key)}: {result.bytes} bytes", file=sys.stderr)
    return EXIT_OK


def _cmd_get(args: argparse.Namespace) -> int:
    with _client(args, args.namespace) as client:
        [data] = client.get([args.key])
    if data is None:
        _err(f"not found: key {format_key(args.key)} in namespace {args.namespace}")
        return EXIT_ERROR
    if args.output == "-":
        out: BinaryIO = sys.stdout.buffer
        out.write(data)
        out.flush()
    else:
        with open(args.output, "wb") as fh:
            fh.write(data)
    return EXIT_OK


#: grpc.health.v1.HealthCheckResponse.ServingStatus, by value.
HEALTH_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def encode_health_request(service: str) -> bytes:
    """HealthCheckRequest{service} by hand: the CLI stays off generated code."""
    from kvstore.wire.codec import encode_varint

    name = service.encode()
    return b"\x0a" + encode_varint(len(name)) + name if name else b""


def decode_health_status(raw: bytes) -> str:
    """HealthCheckResponse → the name of its status (field 1)."""
    from kvstore.wire.codec import iter_fields

    status = next((v for n, v in iter_fields(raw, "HealthCheckResponse") if n == 1), 0)
    code = status if isinstance(status, int) else 0
    return HEALTH_STATUS[code] if code < len(HEALTH_STATUS) else "UNKNOWN"


def _cmd_health(args: argparse.Namespace) -> int:
    """grpc.health.v1 Check, for probes: the exit status is the answer."""
    import grpc

    from kvstore.client._common import parse_target

    try:  # a bad target or TLS file: no answer, like an unreachable server
        target = parse_target(args.target or os.environ.get("KVSTORE_TARGET") or DEFAULT_TARGET)
        if args.tls_ca or args.tls_cert:
            from kvstore.client import TLS

            tls = TLS(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key,
                      server_name=args.tls_server_name)
            channel = grpc.secure_channel(target, tls.credentials(), options=tls.options())
        else:
            channel = grpc.insecure_channel(target)
    except KVStoreError as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_USAGE
    with channel:
        check = channel.unary_unary(HEALTH_CHECK)  # bytes in, bytes out
        try:
            reply = check(encode_health_request(args.service), timeout=args.timeout)
        except grpc.RpcError as exc:
            what = f"service {args.service!r}" if args.service else "the server"
            _err(f"health of {what} at {target}: {exc.code().name}: {exc.details()}")
            return EXIT_USAGE
    status = decode_health_status(reply)
    print(status)
    if status == "SERVING":
        return EXIT_OK
    return EXIT_ERROR if status == "NOT_SERVING" else EXIT_USAGE


def _cmd_config(args: argparse.Namespace) -> int:
    from kvstore import config_toml

    if args.example:
        text = config_toml.example()
    else:
        try:
            text = config_toml.effective(kvconfig.load(args))
        except InvalidConfig as exc:
            _err(str(exc))
            return EXIT_USAGE
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w") as fh:
            fh.write(text)
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _seconds(text: str) -> float:
    """--timeout: a positive number of seconds (0 or less made every call,
    health included, report a healthy server unreachable)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of seconds")
    return value


def _client_options(p: argparse.ArgumentParser, timeout: float = 60.0) -> None:
    p.add_argument("--target", default=None,
                   help="server address: host:port or unix:/path "
                        f"[default: env KVSTORE_TARGET, else {DEFAULT_TARGET}]")
    p.add_argument("--timeout", type=_seconds, default=timeout,
                   help=f"deadline of the call in seconds [default: {timeout:g}]")
    p.add_argument("--tls-ca", metavar="PEM", default=os.environ.get("KVSTORE_TLS_CA"),
                   help="connect over TLS, trusting this CA bundle [env KVSTORE_TLS_CA]")
    p.add_argument("--tls-cert", metavar="PEM", default=None,
                   help="client certificate, for servers that require one (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", default=None, help="client private key")
    p.add_argument("--tls-server-name", default=None,
                   help="name to check the server certificate against")
    p.add_argument("--token", default=os.environ.get("KVSTORE_TOKEN"),
                   help="bearer token, for servers with auth.tokens_file (prefer the env "
                        "variable: a flag shows in the process list) [env KVSTORE_TOKEN]")


def _namespace_option(p: argparse.ArgumentParser) -> None:
    env = os.environ.get("KVSTORE_NAMESPACE")
    p.add_argument("--namespace", "-n", default=env, required=env is None,
                   help="namespace of the key [default: env KVSTORE_NAMESPACE]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvstore",
        description="KV-cache tiered store for LLM inference: run the server or talk to one.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the server",
        description="Run the kvstore server. Every option below can also be set in the TOML "
                    "file given by --config and by its environment variable; flags win over "
                    "the environment, which wins over the file.",
    )
    serve.add_argument("--ready-file", metavar="PATH", default=None,
                       help="once listening, write {\"tcp\": ..., \"unix\": ..., \"pid\": ...} "
                            "as JSON to this file (for scripts and tests); removed when the "
                            "server stops [default: none]")
    kvconfig.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    stats = sub.add_parser("stats", help="show per-tier counters and occupancy",
                           description="Show per-tier counters and occupancy.")
    _client_options(stats)
    stats.add_argument("--namespace", "-n", default=None,
                       help="only this namespace: its blocks and bytes per tier")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=_cmd_stats)

    ls = sub.add_parser(
        "ls", help="list a namespace's blocks (key, size, tiers, age)",
        description="List the blocks of a namespace that the server's index knows, in key "
                    "order: key, size in bytes, the tiers holding it, age. Bounded by "
                    "--limit (the server caps it at 100000).")
    _client_options(ls)
    ls.add_argument("namespace", metavar="NS", help="the namespace")
    ls.add_argument("--prefix", type=parse_key, default=b"",
                    help="only keys starting with this (text, or hex:0123...)")
    ls.add_argument("--limit", type=int, default=1000,
                    help="list at most this many blocks [default: 1000]")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(func=_cmd_ls)

    flush = sub.add_parser(
        "flush", help="remove every block of a namespace (asks first)",
        description="Remove every block of a namespace from L1, L2 and the object store (L3), "
                    "as delete does per key, and print how many were removed. Asks for "
                    "confirmation on a terminal; elsewhere --yes is required.")
    _client_options(flush)
    flush.add_argument("namespace", metavar="NS", help="the namespace to empty")
    flush.add_argument("--yes", "-y", action="store_true",
                       help="do not ask for confirmation")
    flush.set_defaults(func=_cmd_flush)

    put = sub.add_parser("put", help="store one block from a file or stdin",
                         description="Store one block read from FILE (or stdin).")
    _client_options(put)
    _namespace_option(put)
    put.add_argument("--ack", choices=("memory", "local", "remote"), default="memory",
                     help="acknowledge once the block is in memory, committed to local disk "
                          "(L2), or stored in the object store (L3) [default: memory]")
    put.add_argument("key", metavar="KEY", type=parse_key,
                     help="the key: UTF-8 text, or hex:0123abcd... for binary keys")
    put.add_argument("file", metavar="FILE", nargs="?", default="-",
                     help="file holding the block, - for stdin [default: -]")
    put.set_defaults(func=_cmd_put)

    get = sub.add_parser("get", help="read one block to a file or stdout",
                         description="Read one block. A miss exits with status 1.")
    _client_options(get)
    _namespace_option(get)
    get.add_argument("key", metavar="KEY", type=parse_key,
                     help="the key: UTF-8 text, or hex:0123abcd... for binary keys")
    get.add_argument("-o", "--output", metavar="FILE", default="-",
                     help="write the block here, - for stdout [default: -]")
    get.set_defaults(func=_cmd_get)

    health = sub.add_parser(
        "health", help="check the server's gRPC health (for probes)",
        description="Ask the server's grpc.health.v1 service whether it is serving and print "
                    "the answer. Exit status: 0 SERVING, 1 NOT_SERVING, 2 unreachable or "
                    "unknown service.")
    _client_options(health, timeout=5.0)
    health.add_argument("--service", default="",
                        help="health service name: '' is the whole server, kvstore.v1.KVStore "
                             "the API, kvstore.v1.KVStore/L3 the object store [default: '']")
    health.set_defaults(func=_cmd_health)

    cfg = sub.add_parser(
        "config", help="print the effective configuration or the example file",
        description="--effective: load the configuration exactly as `serve` would (the "
                    "flags below, env, --config file) and print it as TOML, credentials "
                    "left out. --example: every option, commented out at its default.")
    which = cfg.add_mutually_exclusive_group(required=True)
    which.add_argument("--effective", action="store_true",
                       help="print the merged configuration serve would run with")
    which.add_argument("--example", action="store_true",
                       help="print the commented example file (deploy/kvstore.example.toml)")
    cfg.add_argument("-o", "--output", metavar="FILE", default="-",
                     help="write here, - for stdout [default: -]")
    kvconfig.add_arguments(cfg)
    cfg.set_defaults(func=_cmd_config)
    return parser


def _version() -> str:
    # (the package's own, not the installed metadata's: an editable install
    # keeps the version it was installed at, and `kvstore --version` said
    # 0.24.0 on a 0.25.0 tree)
    from kvstore._version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    pure = os.environ.get("KVSTORE_PURE", "")
    if pure not in ("", "0", "1"):  # (before anything loads the packer: a traceback)
        _err(f"KVSTORE_PURE must be 0 or 1 (1: the pure-Python block packer), not {pure!r}")
        return EXIT_USAGE
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        sys.stdout.flush()
        return code
    except KVStoreError as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (``kvstore get ... | head``): not an error to report.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_ERROR
    except OSError as exc:
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        _err(f"{type(exc).__name__}:{where} {exc.strerror or exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
