"""Checks of the server's environment before anything starts.

Each failure is an :class:`~kvstore.errors.InvalidConfig` naming the option,
the path or address and what is wrong, so that ``kvstore serve`` prints one
line instead of a traceback (or grpc's "Failed to bind to address ...; set
GRPC_VERBOSITY=debug", which says neither why nor which option). They run
before the store opens, so a mistake costs no index rebuild.

The listen check binds the port and lets it go again: another process could
take it in between, and then grpc's own bind fails, which the server reports
the same way (kvstore/server/app.py).

:func:`lock_data_dir` is not a check but a claim: the data directory's lock,
held until the process exits, so that a second server on the same directory
is refused instead of sharing (and corrupting) the first one's L2.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import resource
import socket
import ssl
import struct
import tempfile
import time
from pathlib import Path

from kvstore.config import Config, split_host_port
from kvstore.errors import InvalidConfig
from kvstore.ownpath import check_directory, make_directories
from kvstore.server.tls import certificate_info, utc_text
from kvstore.sockpath import UNIX_PATH_MAX, check_socket_path
from kvstore.tiers.lmdb_tier import RUN_WITHOUT_L2

log = logging.getLogger("kvstore.server")

#: The data directory's lock file (it holds the pid of the server holding it).
LOCK_FILE = "kvstore.lock"
#: Descriptors of the locks this process holds: open until it exits.
_held_locks: list[int] = []


#: Fewer open files than this and gRPC, LMDB and the listeners cannot all
#: start (gRPC aborted the process at 16, with no line of ours).
MIN_OPEN_FILES = 64


def check_open_files() -> int:
    """Raise the soft limit on open files to the hard one (each connection
    and data-plane session holds one; containers often start at 1,024 of a
    far higher hard limit), and refuse a limit below MIN_OPEN_FILES in one
    line. Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < MIN_OPEN_FILES:
        raise InvalidConfig(f"the limit on open files is {soft} (hard limit {hard}): kvstore "
                            f"needs at least {MIN_OPEN_FILES}; raise it (ulimit -n, the "
                            "service's LimitNOFILE, the container's nofile)")
    return int(soft)


#: Descriptors kept for what is not a client's connection: LMDB, the L3
#: client's sockets, the listeners, the metrics endpoint, logs.
FILES_RESERVED = 256


def open_files_shortfall(config: Config, limit: int) -> str | None:
    """What to say when ``limit`` open files cannot hold every connection the
    configuration allows plus FILES_RESERVED (None: they fit)."""
    s = config.server
    wanted = s.max_connections + (s.data_plane_max_connections if s.data_plane else 0)
    if limit == resource.RLIM_INFINITY or limit >= wanted + FILES_RESERVED:
        return None
    return (f"the limit on open files ({limit}) is below server.max_connections "
            f"({s.max_connections}) + server.data_plane_max_connections "
            f"({s.data_plane_max_connections if s.data_plane else 0}) + {FILES_RESERVED} for "
            "L2, L3 and the listeners: a flood of connections can run the server out of "
            "them (L3 requests and new clients then fail); raise the limit or lower those")


def check(config: Config) -> None:
    # The checks that touch nothing first: a refused start creates no data dir.
    shortfall = open_files_shortfall(config, check_open_files())
    if shortfall is not None:
        log.warning("%s", shortfall)
    check_tls(config)
    check_listen(config.server.listen)
    # (the data plane's and the metrics' ports were found taken only after
    # the data dir, L1 and the index rebuild: a crash loop paid for them)
    if config.server.data_plane and config.server.data_plane_listen not in ("", "off"):
        check_listen(config.server.data_plane_listen, "server.data_plane_listen")
    check_listen(config.server.metrics_listen, "server.metrics_listen")
    warn_if_tokens_in_the_clear(config)
    check_unix_socket(config.server.unix_socket)
    check_data_dir(config)
    lock_data_dir(config)
    mind_a_run_without_l2(config)


def warn_if_tokens_in_the_clear(config: Config) -> None:
    """One WARNING line when bearer tokens would cross a network unencrypted:
    ``auth.tokens_file`` set, no ``server.tls_cert``, and ``server.listen``
    not a loopback address. Anyone on the path reads a token from any call
    and may use it until it is revoked (and reads the blocks, as for any
    plaintext listener: docs/security.md, "The network path")."""
    s = config.server
    if not config.auth.tokens_file or s.tls_cert or not s.listen:
        return
    host = split_host_port("server.listen", s.listen)[0].strip("[]")
    try:
        infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
        loopback = bool(infos) and all(ipaddress.ip_address(str(i[4][0]).split("%")[0])
                                       .is_loopback for i in infos)
    except (socket.gaierror, ValueError):
        loopback = False
    if not loopback:
        log.warning("server.listen %s has no TLS (server.tls_cert): the bearer tokens of "
                    "auth.tokens_file cross the network in the clear, and anyone on the "
                    "path can use them; set server.tls_cert or listen on loopback only",
                    s.listen)


def check_data_dir(config: Config) -> None:
    """L2 lives in ``<data_dir>/l2``: it must be a directory we can write.
    It holds every namespace's blocks: the directories kvstore creates are
    0700 (LMDB's files are 0600); one the operator made is left as it is
    (:func:`warn_if_open`)."""
    if not config.l2.enabled:
        return
    path = config.l2_path
    data_dir = Path(config.data_dir)
    if data_dir.exists() and not data_dir.is_dir():
        raise InvalidConfig(f"data_dir {config.data_dir} is not a directory")
    try:
        make_directories(data_dir, 0o700)
        # Another user who may write here could swap l2/ or kvstore.lock
        # (a link there had the server truncate the file it names).
        check_directory("data_dir", str(data_dir / LOCK_FILE))
        path.mkdir(mode=0o700, exist_ok=True)
        check_directory("data_dir", str(path / "data.mdb"))  # l2/ too (a sticky data_dir)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InvalidConfig(f"data_dir {config.data_dir}: cannot create or write {path}: "
                            f"{exc.strerror or exc}") from None


def lock_data_dir(config: Config) -> None:
    """Take ``<data_dir>/kvstore.lock`` for the life of the process: two servers
    on one L2 would each index it alone, and one's Delete would remove the
    other's acknowledged blocks. The lock is an flock, so a killed server's
    lock goes with it; the file stays (removing it would race a new holder)."""
    if not config.l2.enabled and not (config.l2_path / "data.mdb").exists():
        return  # (an L2 left there is marked by this server: no other may use it meanwhile)
    path = Path(config.data_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise InvalidConfig(f"data_dir {config.data_dir}: cannot create {path}: "
                            f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if exc.errno != errno.EWOULDBLOCK:
            raise InvalidConfig(f"data_dir {config.data_dir}: cannot lock {path}: "
                                f"{exc.strerror or exc}") from None
        who = f" (pid {holder})" if holder.isdigit() else ""
        raise InvalidConfig(f"data_dir {config.data_dir} is in use by another kvstore "
                            f"server{who}: give each server its own data_dir") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError as exc:  # (a full disk: a bare "OSError: No space left on device")
        os.close(fd)
        raise InvalidConfig(f"data_dir {config.data_dir}: cannot write {path}: "
                            f"{exc.strerror or exc}") from None
    _held_locks.append(fd)
    other = lmdb_holder(config.l2_path)
    if other is not None:
        raise InvalidConfig(
            f"data_dir {config.data_dir}: its L2 ({config.l2_path}) is open in another "
            f"process (pid {other}), a kvstore server from before kvstore.lock or "
            "another LMDB program: stop it, or give this server its own data_dir")
    warn_if_open(Path(config.data_dir))


def mind_a_run_without_l2(config: Config) -> None:
    """A server without L2 cannot delete or overwrite the blocks of the L2 an
    earlier run left in its data dir: they came back old when L2 was turned
    on again. So such a run marks that L2 (WARNING), and the next start with
    L2 clears its blocks when it opens it (LMDBTier, WARNING): they are lost,
    never served stale."""
    l2 = config.l2_path
    if config.l2.enabled or not (l2 / "data.mdb").exists():
        return
    marker = l2 / RUN_WITHOUT_L2
    if not marker.exists():
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{utc_text(time.time())}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    log.warning("l2.enabled is false: the L2 left in %s is not used, and its blocks are "
                "cleared when a server next starts on this data dir with L2 (Deletes and "
                "overwrites answered now cannot reach them, which would come back old)", l2)


#: ``struct flock`` as Linux lays it out (short, short, off_t, off_t, pid_t).
_FLOCK = struct.Struct("@hhqqi4x")


def lmdb_holder(env_dir: Path) -> int | None:
    """The pid of another process that has the LMDB environment in
    ``env_dir`` open, or None. Every process with an LMDB environment open
    holds a shared fcntl lock on the first byte of its ``lock.mdb`` (LMDB's
    own check of whether it is alone), whatever its version: a release of
    kvstore from before ``kvstore.lock`` holds it too. (A lock of this
    process is not reported: fcntl locks are per process.)"""
    try:
        fd = os.open(env_dir / "lock.mdb", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no environment yet (or unreadable: LMDB's open will say)
    try:
        asked = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0)
        kind, _, _, _, pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, asked))
    except OSError:
        return None
    finally:
        os.close(fd)
    return None if kind == fcntl.F_UNLCK else pid


def warn_if_open(data_dir: Path) -> None:
    """One line when other users may enter the data directory: L2 files made
    before they were 0600 (or copied in) are theirs to read. Not chmod-ed
    here: the operator made it so, maybe on purpose (a shared group is not
    "other users", so the 0750 of deploy/ passes; nor is a directory inside
    one they cannot enter, such as a home directory of mode 0700)."""
    path = data_dir.resolve()
    mode = path.stat().st_mode & 0o777
    if mode & 0o007 and all(p.stat().st_mode & 0o001 for p in path.parents):
        log.warning("data_dir %s is mode %04o: other users may read L2 (every namespace's "
                    "blocks) there; chmod o-rwx it", data_dir, mode)


def check_tls(config: Config) -> None:
    """The certificate parses, the key parses and belongs to it, the client
    CA bundle parses: the mistakes grpc reports only as a failed bind."""
    s = config.server
    if not s.tls_cert:
        return
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for option, path in (("server.tls_cert", s.tls_cert), ("server.tls_client_ca",
                                                         s.tls_client_ca)):
        if path:
            _load_certificates(context, option, path)
    try:
        # An empty password: an encrypted key fails here (grpc cannot use
        # one) instead of OpenSSL prompting on the terminal.
        context.load_cert_chain(s.tls_cert, s.tls_key, password="")
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise InvalidConfig(f"server.tls_key {s.tls_key} does not belong to the "
                                f"certificate in server.tls_cert {s.tls_cert}") from None
        detail = f" ({exc.reason})" if exc.reason else ""
        raise InvalidConfig(f"server.tls_key {s.tls_key} is not an unencrypted PEM private "
                            f"key{detail}") from None
    except OSError as exc:
        raise InvalidConfig(f"server.tls_key {s.tls_key}: cannot read it: "
                            f"{exc.strerror or exc}") from None
    check_validity(s.tls_cert)


def check_validity(path: str, now: float | None = None) -> None:
    """A server certificate past its end date is refused: every client's
    handshake would fail (CERTIFICATE_VERIFY_FAILED, said on the client side
    only) while the server reported itself healthy. One not valid yet is
    logged (a clock set wrong, or a certificate made for later)."""
    now = time.time() if now is None else now
    try:
        chain = certificate_info(path, now)
    except (OSError, ValueError) as exc:
        raise InvalidConfig(f"server.tls_cert {path}: {exc}") from None
    if now > chain.not_after:
        raise InvalidConfig(f"server.tls_cert {path} expired on {utc_text(chain.not_after)}: "
                            "TLS clients would refuse every connection; renew it")
    if now < chain.not_before:
        log.warning("server.tls_cert %s is not valid before %s: TLS clients refuse it until "
                    "then (is the clock right?)", path, utc_text(chain.not_before))
    for warning in chain.warnings:
        log.warning("server.tls_cert %s: %s", path, warning)


def _load_certificates(context: ssl.SSLContext, option: str, path: str) -> None:
    try:
        Path(path).read_bytes()
        context.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise InvalidConfig(f"{option} {path} holds no PEM certificate: "
                            f"{exc.reason or exc}") from None
    except OSError as exc:
        raise InvalidConfig(f"{option} {path}: cannot read it: {exc.strerror or exc}") from None


def check_listen(listen: str, option: str = "server.listen") -> None:
    """The TCP address resolves and its port is free (port 0 always is)."""
    if not listen:
        return
    host, port = split_host_port(option, listen)
    host = host.strip("[]")
    try:
        addresses = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InvalidConfig(f"{option} {listen}: cannot resolve {host!r}: "
                            f"{exc.strerror}") from None
    if port == 0:
        return
    errors: list[str] = []
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As grpc binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                errors.append(exc.strerror or str(exc))
            else:
                return  # grpc serves when at least one address binds
    raise InvalidConfig(f"{option} {listen}: cannot listen there: "
                        f"{'; '.join(dict.fromkeys(errors))}")


def check_unix_socket(path: str) -> None:
    if path and len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise InvalidConfig(f"server.unix_socket {path}: the path is longer than "
                            f"{UNIX_PATH_MAX} bytes, the most a unix socket address holds")
    if path:
        check_socket_path("server.unix_socket", path)
