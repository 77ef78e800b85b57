"""Who is calling, and may they use this namespace: per-tenant credentials.

Off unless ``auth.tokens_file`` is set (then every kvstore.v1 call must
carry a credential). The file maps credentials to identities and the
namespaces each may use, one grant a line::

    # credential                                                      identity namespaces
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  alice    chat,code
    cert:engine-7.example.net                                         engine-7 chat
    2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae  ops      *  admin

* a 64-hex-digit credential is the SHA-256 of a bearer token (tokens are
  hashed at rest; ``python -m kvstore.server.auth hash`` prints the hash of a
  token read from stdin). A client sends ``authorization: Bearer <token>``.
* ``cert:NAME`` is a mutual-TLS client certificate whose subject CN or one of
  whose DNS subject alternative names is NAME, or whose URI SAN is NAME when
  NAME is a URI (``cert:spiffe://cluster/ns/engine``, ``cert:urn:…``); email and IP SANs never
  match (grpc checked the chain against ``server.tls_client_ca``; this says
  what the holder may do).
* namespaces: comma-separated, or ``*`` for every namespace.
* ``admin``: may also call the node-wide methods (Flush, Stats of the whole
  node) and read any namespace's Stats figures.

Stats: an admin sees the node's figures, or any namespace's; any other
identity must name one of its namespaces (``StatsRequest.namespace``) and gets
that namespace's blocks and bytes per tier, nothing node-wide (a Stats naming
no namespace is refused: the node's counters describe every tenant's traffic).
A ``*`` grant without ``admin`` may read any namespace's figures (it may use
every namespace), still not the node's.

A bearer token, when sent, decides (a wrong one is refused even over a
mapped certificate). The server rereads the file on SIGHUP; a file that does
not parse leaves the previous grants in force (one ERROR line names the
line).

Outcomes: no credential, or one the file does not know →
:class:`~kvstore.errors.Unauthenticated`; a known identity asking for a
namespace (or a node-wide method) it was not granted →
:class:`~kvstore.errors.PermissionDenied`, checked before the request
touches the store, so a refused caller never learns whether a key exists.
"""

from __future__ import annotations

import hashlib
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from kvstore.errors import InvalidConfig, PermissionDenied, Unauthenticated

log = logging.getLogger("kvstore.server")

CERT_PREFIX = "cert:"
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def hash_token(token: str) -> str:
    """What the tokens file holds for ``token``: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Scope(Enum):
    """What a method needs from the caller's grant."""

    NAMESPACE = "namespace"          # the request's namespace must be granted
    AUTHENTICATED = "authenticated"  # any known identity (the request names no namespace)
    ADMIN = "admin"                  # node-wide: admin identities only
    FIGURES = "figures"              # admins: node-wide or any namespace; others: a granted one


#: Method → what it needs. A kvstore.v1 method not named here is node-wide
#: (admin) unless its name starts with ``List`` (namespace-scoped listings),
#: so a method added later is closed until someone decides otherwise.
METHOD_SCOPES: Mapping[str, Scope] = {
    "Put": Scope.NAMESPACE,
    "Get": Scope.NAMESPACE,
    "GetSmall": Scope.NAMESPACE,
    "Lookup": Scope.NAMESPACE,
    "Delete": Scope.NAMESPACE,
    "SessionEvent": Scope.NAMESPACE,
    "ShmReserve": Scope.NAMESPACE,
    "ShmCommit": Scope.NAMESPACE,
    "ShmAcquire": Scope.NAMESPACE,
    # No namespace in the request: the arena's trust boundary and the
    # lease ids' owners are the shared-memory broker's to check.
    "ShmAttach": Scope.AUTHENTICATED,
    "ShmRelease": Scope.AUTHENTICATED,
    # issue 14 data plane: any known identity; the ticket carries its grant
    # and each data-plane request is checked against it (the optional
    # namespace in the request is checked by the servicer).
    "OpenDataPlane": Scope.AUTHENTICATED,
    # The node's figures (admins), or one namespace's (its grantees too).
    "Stats": Scope.FIGURES,
    # Node-wide actions.
    "Flush": Scope.ADMIN,
}


def method_scope(name: str) -> Scope:
    """What the kvstore.v1 method ``name`` (e.g. "Get") needs."""
    scope = METHOD_SCOPES.get(name)
    if scope is not None:
        return scope
    return Scope.NAMESPACE if name.startswith("List") else Scope.ADMIN


#: A caller's credential: ("token", its SHA-256) or ("cert", the names its
#: certificate may match, in the order they are tried).
Credential = tuple[str, ...]


@dataclass(frozen=True)
class Grant:
    """One identity and what it may use; ``namespaces`` None: every one."""

    identity: str
    namespaces: frozenset[str] | None
    admin: bool = False

    def allows(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces


@dataclass(frozen=True)
class Grants:
    """A parsed tokens file: token hash → grant, certificate name → grant."""

    tokens: Mapping[str, Grant]
    certs: Mapping[str, Grant]


def parse_grants(text: str, source: str) -> Grants:
    """The grants in a tokens file's ``text``; InvalidConfig naming the line."""
    tokens: dict[str, Grant] = {}
    certs: dict[str, Grant] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        fields = line.split()
        if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] != "admin"):
            raise InvalidConfig(f"{where}: expected 'CREDENTIAL IDENTITY NAMESPACES [admin]'")
        credential, identity, spec = fields[:3]
        names = frozenset(n for n in spec.split(",") if n)
        grant = Grant(identity, None if spec == "*" else names, len(fields) == 4)
        if not names:
            raise InvalidConfig(f"{where}: no namespaces (use * for every namespace)")
        if credential.startswith(CERT_PREFIX):
            name = credential[len(CERT_PREFIX):]
            if not name:
                raise InvalidConfig(f"{where}: 'cert:' needs the certificate's CN or SAN")
            table = certs
            key = name
        elif _HASH_RE.match(credential.lower()):
            table = tokens
            key = credential.lower()
        else:
            raise InvalidConfig(f"{where}: the credential is neither the SHA-256 (64 hex "
                                "digits) of a token nor cert:NAME (hash a token with "
                                "'python -m kvstore.server.auth hash')")
        if key in table:
            raise InvalidConfig(f"{where}: this credential is already granted above")
        table[key] = grant
    return Grants(tokens, certs)


def load_grants(path: str) -> Grants:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfig(f"auth.tokens_file {path}: cannot read it ({exc})") from None
    grants = parse_grants(text, f"auth.tokens_file {path}")
    if not grants.tokens and not grants.certs:
        # (an operator review: an empty file, or one caught half-rewritten
        # by a SIGHUP, refused every call, the admin's too, while the health
        # checks said SERVING)
        raise InvalidConfig(f"auth.tokens_file {path}: grants nothing (no credential line): "
                            "every call would be refused; to run without auth, unset "
                            "auth.tokens_file")
    return grants


def _first(metadata: Iterable[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else v
    return None


def _cert_names(auth_context: Mapping[str, Iterable[bytes]] | None) -> list[str]:
    """The names ``cert:NAME`` may match: the subject CN, the DNS SANs, and
    the URI SANs that are URIs (with a scheme: a SPIFFE id, a URN). Email and
    IP SANs never match, nor a URI SAN written as a bare host name: a CA that
    vets DNS names may let a requester put any email or URI in its
    certificate, which must not earn another identity's grant."""
    if not auth_context:
        return []
    # A name with a scheme is a URI grant's: only a URI SAN may earn it. A
    # subject CN or a DNS SAN holding "spiffe://..." (which no CA vets as a
    # URI) earned the workload's grant, and read its namespaces.
    names = [name for prop in ("x509_common_name", "peer_dns")
             for v in auth_context.get(prop, ())
             if ":" not in (name := v.decode("utf-8", "replace"))]
    names.extend(uri for v in auth_context.get("peer_uri", ())
                 if ":" in (uri := v.decode("utf-8", "replace")))
    return names


class Authorizer:
    """The grants in force and the checks made on every call."""

    def __init__(self, tokens_file: str) -> None:
        self.tokens_file = tokens_file
        self.grants = load_grants(tokens_file)

    def reload(self) -> bool:
        """Reread the tokens file (SIGHUP); on an error keep the grants in force."""
        try:
            grants = load_grants(self.tokens_file)
        except InvalidConfig as exc:
            log.error("auth: keeping the previous grants: %s", exc)
            return False
        self.grants = grants
        log.info("auth: reloaded %s (%d tokens, %d certificate names)", self.tokens_file,
                 len(grants.tokens), len(grants.certs))
        return True

    def identify(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                 auth_context: Mapping[str, Iterable[bytes]] | None) -> Grant:
        """The caller's grant, from its bearer token or its client certificate."""
        return self.identify_credential(metadata, auth_context)[1]

    def identify_credential(self, metadata: Iterable[tuple[str, str | bytes]] | None,
                            auth_context: Mapping[str, Iterable[bytes]] | None
                            ) -> tuple[Credential, Grant]:
        """The caller's credential (what :meth:`grant_of` takes) and its grant."""
        header = _first(metadata, "authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            credential: Credential = ("token", hash_token(token.strip()))
        else:
            credential = ("cert", *_cert_names(auth_context))
        grant = self.grant_of(credential)
        if grant is not None:
            return credential, grant
        if header is not None:
            raise Unauthenticated("the bearer token is not known to this server")
        if len(credential) > 1:
            shown = ", ".join(repr(name[:80]) for name in credential[1:4])
            more = f" and {len(credential) - 4} more" if len(credential) > 4 else ""
            raise Unauthenticated(f"the client certificate's names ({shown}{more}) have no "
                                  "cert: grant in this server's auth.tokens_file: map one, "
                                  "or send 'authorization: Bearer <token>' metadata")
        raise Unauthenticated("this server requires a credential: send 'authorization: "
                              "Bearer <token>' metadata (or a client certificate it maps)")

    def grant_of(self, credential: Credential) -> Grant | None:
        """The grant ``credential`` has under the grants in force (None: none),
        e.g. for a data plane session opened before a reload."""
        grants = self.grants
        if credential[0] == "token":
            return grants.tokens.get(credential[1])
        for name in credential[1:]:
            grant = grants.certs.get(name)
            if grant is not None:
                return grant
        return None

    @staticmethod
    def authorize(grant: Grant, method: str, namespace: str | None) -> None:
        """PermissionDenied unless ``grant`` may call ``method`` (e.g. "Get")
        on ``namespace`` (None: the request names none)."""
        scope = method_scope(method)
        if scope is Scope.FIGURES:
            if grant.admin:
                return
            if namespace is None:
                raise PermissionDenied(f"{method} without a namespace shows the whole node: "
                                       f"identity {grant.identity!r} is not an admin (name "
                                       "one of its namespaces in the request)")
            scope = Scope.NAMESPACE
        if scope is Scope.ADMIN:
            if not grant.admin:
                raise PermissionDenied(f"{method} is node-wide: identity {grant.identity!r} "
                                       "is not an admin")
            # An admin of some namespaces flushes those only (admin adds no
            # namespaces; ``*`` does).
            if namespace is not None and not grant.allows(namespace):
                raise PermissionDenied(f"identity {grant.identity!r} may not use namespace "
                                       f"{namespace!r}")
        elif scope is Scope.NAMESPACE and namespace is not None \
                and not grant.allows(namespace):
            raise PermissionDenied(f"identity {grant.identity!r} may not use namespace "
                                   f"{namespace!r}")


def main(argv: list[str]) -> int:
    """``python -m kvstore.server.auth hash [TOKEN]``: the line's credential for
    a token (read from stdin when not given, so it stays out of shell history)."""
    if not argv or argv[0] != "hash" or len(argv) > 2:
        print("usage: python -m kvstore.server.auth hash [TOKEN]   (TOKEN from stdin if "
              "omitted)", file=sys.stderr)
        return 2
    token = argv[1] if len(argv) == 2 else sys.stdin.readline().strip()
    if not token:
        print("empty token", file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
