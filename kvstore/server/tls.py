"""The TCP listeners' TLS certificate, key and client CA, reread when their
files change.

cert-manager, certbot and Vault renew a certificate by replacing its files. A
server that read them once at start went on serving the old certificate until
it expired, and then every client's handshake failed while the server said it
was healthy; only a restart (which empties L1) took the new one. Here the gRPC
listener and the data plane's TLS listener take their material from one
:class:`ServerTLS`, which rereads the files when they change -- checked at
most once a second, at each new TLS connection and each metrics scrape, and at
every SIGHUP -- and swaps the new material in only once it has loaded and been
checked as a whole (the key belongs to the certificate, the certificate has
not expired, the CA bundle parses). A half-written key, a key copied before
its certificate, a certificate past its end date: the material in force keeps
serving, with one WARNING per change of the files, never a listener without a
certificate. Connections already open keep the certificate they were made
with; new ones get the new material, on both listeners at once.

What cannot change without a restart: whether TLS is on, and whether client
certificates are required (``server.tls_client_ca`` set or not).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvstore.dataplane.tls import same_checks_as_grpc
from kvstore.errors import InvalidConfig

log = logging.getLogger("kvstore.server")

#: The files are looked at (three ``stat`` calls) at most this often.
CHECK_EVERY_S = 1.0
#: Files that fail to load are reported (a WARNING, the failures counter) once
#: they have stayed so this long: a renewal copying the key, then the
#: certificate, fails in between.
SETTLE_S = 2.0


class NotYetValid(ValueError):
    """A certificate whose start is still to come: TLS clients refuse it."""

#: One file's identity and version: (device, inode, size, mtime in ns);
#: None when it cannot be stat'ed (being replaced, or gone).
Stamp = tuple[int, int, int, int] | None


def _stamp(path: str) -> Stamp:
    try:
        st = os.stat(path)  # follows symlinks: a Kubernetes secret's ..data swap shows
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True)
class Material:
    """One consistent set of the listeners' TLS files, loaded and checked."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    #: When the chain stops working (ChainInfo.chain_not_after) and the
    #: certificate's start (Unix time), and its subject CN.
    not_after: float
    not_before: float
    subject: str
    #: The data plane's context, built from these bytes.
    context: ssl.SSLContext
    #: What to say of the chain's other certificates (ChainInfo.warnings).
    warnings: tuple[str, ...] = ()

    def grpc_config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.cert)], root_certificates=self.client_ca)

    def same_files(self, other: Material) -> bool:
        return (self.cert, self.key, self.client_ca) == (other.cert, other.key, other.client_ca)


@contextlib.contextmanager
def _pem_path(data: bytes) -> Iterator[str]:
    """A path that reads as ``data`` (ssl loads certificates and keys from
    files only): an anonymous memory file, so the bytes checked are the
    bytes loaded and no copy of the key touches a disk."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("kvstore-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="kvstore-tls-")  # mode 0600
    try:
        os.write(fd, data)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


_BEGIN_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
#: One whole PEM certificate (base64 has no "-": a block cut short does not
#: run on into the next one's end).
_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]*"
                              rb"-----END CERTIFICATE-----")


@dataclass(frozen=True)
class ChainInfo:
    """What a certificate file says of its dates, at one instant ``now``."""

    #: the first (the server's own) certificate's end and start, and its CN
    not_after: float
    not_before: float
    subject: str
    #: when the chain stops working, as far as this file tells: the earliest
    #: end among the certificate and those of its chain still valid at
    #: ``now`` (one that has ended already is an extra certificate clients do
    #: not use, e.g. an old cross-signed root, or a broken one: said in
    #: ``warnings``)
    chain_not_after: float
    #: what to log about the other certificates of the file
    warnings: tuple[str, ...] = ()


def certificate_info(path: str, now: float | None = None) -> ChainInfo:
    """The dates of the certificates in ``path`` (also preflight's, for its
    start-up checks); ValueError when one of them does not parse."""
    return chain_info(Path(path).read_bytes(), time.time() if now is None else now)


def chain_info(pem: bytes, now: float) -> ChainInfo:
    """The dates of every certificate in ``pem``. Only the first (the
    server's own) decides whether the file is taken: a certificate of the
    chain that has ended or not begun may be one no client needs (an
    expired cross-signed root, as certbot's long chain had), or one every
    client needs (an intermediate): which, the file does not say. It is
    said in a WARNING, and the expiry gauge counts the chain's certificates
    still valid (the first alone was read: an intermediate that ended before
    the certificate failed every handshake while the gauge showed the
    certificate's later end)."""
    blocks: list[bytes] = []
    start = pem.find(_BEGIN_CERTIFICATE)
    while start >= 0:
        whole = _PEM_CERTIFICATE.match(pem, start)
        if whole is None:
            raise ValueError(f"certificate #{len(blocks) + 1} of the file is cut short (the "
                             "file half-written?)")
        blocks.append(whole.group())
        start = pem.find(_BEGIN_CERTIFICATE, whole.end())
    if not blocks:
        raise ValueError("the certificate is not a PEM certificate")
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    if decode is None:  # CPython's own; without it the dates are not known
        return ChainInfo(float("inf"), 0.0, "", float("inf"))
    dates: list[tuple[float, float, str]] = []
    for number, block in enumerate(blocks, 1):
        with _pem_path(block + b"\n") as path:
            try:
                info = decode(path)
                subject = next((value for rdn in info.get("subject", ())
                                for name, value in rdn if name == "commonName"), "")
                dates.append((ssl.cert_time_to_seconds(info["notAfter"]),
                              ssl.cert_time_to_seconds(info["notBefore"]), subject))
            except (ssl.SSLError, OSError, KeyError, ValueError):
                raise ValueError(f"certificate #{number} of the file does not parse") from None
    not_after, not_before, subject = dates[0]
    chain_end = not_after
    warnings: list[str] = []
    for number, (end, begin, cn) in enumerate(dates[1:], 2):
        what = f"certificate #{number} of the file (CN={cn or '?'})"
        if end < now:
            warnings.append(f"{what} expired on {utc_text(end)}: clients that need it to reach "
                            "their root refuse the handshake (an extra one, e.g. an old "
                            "cross-signed root, is harmless)")
        elif begin > now:
            warnings.append(f"{what} is not valid before {utc_text(begin)}: clients that need "
                            "it to reach their root refuse the handshake until then")
        else:
            chain_end = min(chain_end, end)
    return ChainInfo(not_after, not_before, subject, chain_end, tuple(warnings))


def load_material(cert: bytes, key: bytes, client_ca: bytes | None,
                  now: float, future_ok: bool = False) -> Material:
    """Check ``cert``/``key``/``client_ca`` as a whole and build the data
    plane's context from them; ValueError says what is wrong (NotYetValid:
    a certificate not valid yet, unless ``future_ok``)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    same_checks_as_grpc(context)  # (client certificates: as the gRPC listener checks them)
    # Every connection a full handshake, checked against the client CA in
    # force: a session resumed from before a CA was removed skipped that check
    # (the listener's context keeps its session cache and ticket keys across
    # the switch below). TLS 1.3 without tickets resumes nothing; TLS 1.2
    # would still resume by session id.
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.num_tickets = 0
    context.options |= ssl.OP_NO_TICKET
    chain = chain_info(cert, now)  # (first: a half-written chain is the certificate's fault)
    with _pem_path(cert + b"\n" + key) as path:
        try:
            # An empty password: an encrypted key fails instead of prompting.
            context.load_cert_chain(path, password="")
        except ssl.SSLError as exc:
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise ValueError("the key does not belong to the certificate") from None
            raise ValueError(f"the key is not an unencrypted PEM private key "
                             f"({exc.reason or exc})") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=client_ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"the client CA bundle does not parse ({exc})") from None
        context.verify_mode = ssl.CERT_REQUIRED
    if now > chain.not_after:
        raise ValueError(f"the certificate expired on {utc_text(chain.not_after)}")
    if now < chain.not_before and not future_ok:
        raise NotYetValid(f"the certificate is not valid before {utc_text(chain.not_before)} "
                          "(taken then, if the files are still these)")
    return Material(cert, key, client_ca, chain.chain_not_after, chain.not_before,
                    chain.subject, context, chain.warnings)


def utc_text(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class ServerTLS:
    """The listeners' TLS material, from ``server.tls_cert``, ``tls_key`` and
    ``tls_client_ca``; :meth:`check` rereads them when they change."""

    def __init__(self, cert: str, key: str, client_ca: str = "",
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.paths = (cert, key, client_ca)
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()  # gRPC's handshakes call in from its own threads
        stamps = self._stamps()
        try:  # (one not valid yet is taken at start: preflight warns; nothing else to serve)
            self.material = self._read(wall(), future_ok=True)
        except (OSError, ValueError) as exc:
            raise InvalidConfig(f"server.tls_cert {cert}: {exc}") from None
        self._stamps_seen = stamps
        self._checked_at = clock()
        #: Bumped at each swap; gRPC's fetcher hands each generation over once.
        self.generation = 0
        self._grpc_generation = 0
        #: The stamps of files that failed to load, since when, why, whether
        #: reported (once per change, after SETTLE_S), and whether to read
        #: them again all the same (a certificate not valid yet becomes valid).
        self._failed: tuple[Stamp, ...] | None = None
        self._failed_at = 0.0
        self._failure = ""
        self._reported = False
        self._retry_failed = False
        self.reloads = 0
        self.failures = 0
        # The listener's context stays the one asyncio was given; each
        # handshake is moved to the material in force (the SNI callback runs
        # for every ClientHello, with or without a server name).
        self.listener_context = self.material.context
        self.listener_context.sni_callback = self._select

    @property
    def requires_client_certificates(self) -> bool:
        return bool(self.paths[2])

    def _stamps(self) -> tuple[Stamp, ...]:
        return tuple(_stamp(p) if p else None for p in self.paths)

    def _read(self, now: float, future_ok: bool = False) -> Material:
        cert_path, key_path, ca_path = self.paths
        cert = Path(cert_path).read_bytes()
        key = Path(key_path).read_bytes()
        ca = Path(ca_path).read_bytes() if ca_path else None
        return load_material(cert, key, ca, now, future_ok)

    # -- checking ----------------------------------------------------------------------

    def check(self, force: bool = False) -> bool:
        """Reread the files if they changed since they were last read (or,
        with ``force``, whatever their stamps say); at most once per
        CHECK_EVERY_S unless forced. True when new material is in force."""
        now = self._clock()
        if not force and now - self._checked_at < CHECK_EVERY_S:
            return False
        with self._lock:
            if not force and now - self._checked_at < CHECK_EVERY_S:
                return False
            self._checked_at = now
            before = self._stamps()
            if not force and before == self._stamps_seen:
                return False
            if not force and before == self._failed and not self._retry_failed:
                self._report_failure(now)
                return False
            try:
                new = self._read(self._wall())
            except (OSError, ValueError) as exc:
                if self._stamps() != before:  # written while read: look again next time
                    return False
                if before != self._failed:
                    self._failed, self._failed_at, self._reported = before, now, False
                self._failure = str(exc)
                self._retry_failed = isinstance(exc, NotYetValid)
                self._report_failure(now, force)
                return False
            if self._stamps() != before:  # written while read: take it next time
                return False
            self._stamps_seen = before
            self._failed, self._retry_failed = None, False
            if new.same_files(self.material):
                if force:
                    log.info("TLS: the certificate files are unchanged (%s, valid until %s)",
                             self._describe(new), utc_text(new.not_after))
                return False
            self.material = new
            self.generation += 1
            self.reloads += 1
        log.info("TLS: reloaded the certificate files: new connections get %s, valid until %s",
                 self._describe(new), utc_text(new.not_after))
        for warning in new.warnings:
            log.warning("TLS: server.tls_cert: %s", warning)
        return True

    def _report_failure(self, now: float, at_once: bool = False) -> None:
        """One WARNING (and one count) per change of files that do not load,
        once they have failed for SETTLE_S (at once for a SIGHUP)."""
        if not at_once and (self._reported or now - self._failed_at < SETTLE_S):
            return
        if not self._reported:
            self.failures += 1
        self._reported = True
        log.warning("TLS: server.tls_cert/tls_key/tls_client_ca changed but were not "
                    "reloaded: %s; new connections still get %s, valid until %s",
                    self._failure, self._describe(self.material),
                    utc_text(self.material.not_after))

    @staticmethod
    def _describe(m: Material) -> str:
        return f"CN={m.subject}" if m.subject else "the certificate"

    # -- the listeners -----------------------------------------------------------------

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``: gRPC asks, before each
        handshake, whether the material changed."""
        return grpc.dynamic_ssl_server_credentials(
            self.material.grpc_config(), self._grpc_fetch,
            require_client_authentication=self.requires_client_certificates)

    def _grpc_fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            self.check()
            with self._lock:
                if self._grpc_generation == self.generation:
                    return None
                self._grpc_generation = self.generation
                return self.material.grpc_config()
        except Exception:  # a bug here must not fail the handshake: keep what gRPC has
            log.exception("TLS: checking the certificate files failed")
            return None

    def _select(self, sslobj: ssl.SSLObject, _server_name: str | None,
                context: ssl.SSLContext) -> None:
        try:
            self.check()
            current = self.material.context
            if current is not context:
                sslobj.context = current
        except Exception:  # as above: the handshake goes on with what it has
            log.exception("TLS: checking the certificate files failed")
