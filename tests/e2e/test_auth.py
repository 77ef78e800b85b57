"""Per-tenant credentials (auth.tokens_file): every method checks the caller's
identity and its namespaces, over TCP and the unix socket; tokens rotate on
SIGHUP; mutual-TLS certificates map to identities too."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from kvstore import Client
from kvstore.errors import InvalidConfig, PermissionDenied, Unauthenticated
from kvstore.server.auth import Authorizer, hash_token, parse_grants
from kvstore.types import SessionEnd
from kvstore.wire.pb import kvstore_pb2 as pb

ALICE, BOB, OPS = "alice-token-1", "bob-token-1", "ops-token-1"


def grants_text(alice: str = ALICE) -> str:
    return (f"# test grants\n{hash_token(alice)} alice team-a\n"
            f"{hash_token(BOB)}  bob   team-b,shared   # two namespaces\n"
            f"{hash_token(OPS)} ops * admin\n"
            "cert:engine-1 engine team-m\n"
            "cert:spiffe://test/engine-2 engine-2 team-m\n"
            "cert:urn:test:engine-3 engine-3 team-m\n")


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(grants_text())
    return path


def wait_until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)  # polling with a deadline
    return check()


def _raw(target: str, method: str, request: bytes, token: str | None) -> grpc.StatusCode:
    """Call a kvstore.v1 method with raw bytes; the status code it ends with."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(f"/kvstore.v1.KVStore/{method}",
                                   request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        try:
            call(request, timeout=10, metadata=metadata)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_every_method_needs_a_known_credential(server_factory, tokens_file: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--auth-tokens-file", str(tokens_file)) as server:
        for target in (server.tcp, server.unix_target):
            for token in (None, "not-a-known-token"):
                with Client(target, namespace="team-a", token=token) as c:
                    with pytest.raises(Unauthenticated):
                        c.put({b"k": b"v"})
                    with pytest.raises(Unauthenticated):
                        c.get([b"k"])
                    with pytest.raises(Unauthenticated):
                        c.lookup([b"k"])
                    with pytest.raises(Unauthenticated):
                        c.delete([b"k"])
                    with pytest.raises(Unauthenticated):
                        c.stats()
                    with pytest.raises(Unauthenticated):
                        c.session_event("s", SessionEnd())
            # Shared memory calls, and a malformed authorization header.
            for method, body in (("ShmAttach", pb.ShmAttachRequest()),
                                 ("ShmRelease", pb.ShmReleaseRequest(lease_ids=[1])),
                                 ("ShmReserve", pb.ShmReserveRequest(namespace="team-a")),
                                 ("ShmAcquire", pb.ShmAcquireRequest(namespace="team-a"))):
                assert _raw(target, method, body.SerializeToString(), None) \
                    == grpc.StatusCode.UNAUTHENTICATED, method
        with Client(server.tcp, namespace="team-a", metadata={"authorization": "Basic x"}) as c, \
                pytest.raises(Unauthenticated, match="Bearer"):
            c.get([b"k"])
        # Health stays open for probes.
        assert subprocess.run([sys.executable, "-m", "kvstore", "health", "--target",
                               server.tcp], capture_output=True, timeout=60).returncode == 0


def test_namespaces_are_bound_to_identity(server_factory, tokens_file: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--auth-tokens-file", str(tokens_file)) as server:
        with Client(server.tcp, namespace="team-b", token=BOB) as bob:
            bob.put({b"secret": b"bob's bytes"})
        with Client(server.unix_target, namespace="team-a", token=ALICE) as alice:
            alice.put({b"mine": b"alice's bytes"})
            assert alice.get([b"mine"]) == [b"alice's bytes"]
            # Another tenant's namespace: refused before the store is asked,
            # whether or not the key exists there (never a NOT_FOUND or a miss).
            for key in (b"secret", b"absent"):
                with pytest.raises(PermissionDenied, match="team-b"):
                    alice.get([key], namespace="team-b")
                with pytest.raises(PermissionDenied):
                    alice.lookup([key], namespace="team-b")
                with pytest.raises(PermissionDenied):
                    alice.delete([key], namespace="team-b")
            with pytest.raises(PermissionDenied):
                alice.put({b"secret": b"overwritten"}, namespace="team-b")
            with pytest.raises(PermissionDenied):
                alice.session_event("s", SessionEnd(), namespace="team-b")
            with pytest.raises(PermissionDenied, match="admin"):
                alice.stats()  # the node's figures: admins only
            # Her own namespace's figures: its blocks and bytes, nothing node-wide.
            mine = alice.stats("team-a")
            assert mine.namespace == "team-a"
            assert (mine.tiers[0].blocks, mine.tiers[0].bytes) == (1, len(b"alice's bytes"))
            assert mine.puts == mine.gets == 0 and mine.tiers[0].hits == 0
            with pytest.raises(PermissionDenied, match="team-b"):
                alice.stats("team-b")
        for method, body in (("ShmReserve", pb.ShmReserveRequest(namespace="team-b")),
                             ("ShmCommit", pb.ShmCommitRequest(namespace="team-b")),
                             ("ShmAcquire", pb.ShmAcquireRequest(namespace="team-b"))):
            code = _raw(server.tcp, method, body.SerializeToString(), ALICE)
            assert code == grpc.StatusCode.PERMISSION_DENIED, method
        assert _raw(server.tcp, "ShmAttach", b"", ALICE) != grpc.StatusCode.UNAUTHENTICATED
        with Client(server.tcp, namespace="team-b", token=BOB) as bob:
            assert bob.get([b"secret"]) == [b"bob's bytes"]  # alice's Put stored nothing
            bob.put({b"s": b"x"}, namespace="shared")
        with Client(server.tcp, namespace="team-b", token=OPS) as ops:
            assert ops.get([b"secret"]) == [b"bob's bytes"]  # * grants every namespace
            stats = ops.stats()  # admins see the node's figures
            assert stats.puts >= 3
            assert ops.stats("team-b").tiers[0].blocks == 1  # and any namespace's


def test_shared_memory_calls_naming_a_namespace_check_the_grant(server_factory,  # type: ignore[no-untyped-def]
                                                                 tokens_file: Path,
                                                                 tmp_path: Path) -> None:
    """ShmAttach and ShmRelease are open to any identity (no namespace is
    required), but one they name must be granted, as everywhere else:
    ShmRelease answered another tenant's namespace "never issued"."""
    arena = f"/dev/shm/kvstore-test-auth-{tmp_path.name}"
    with server_factory("--auth-tokens-file", str(tokens_file), "--l1-shm-path", arena) as server:
        for method, body in (
                ("ShmAttach", pb.ShmAttachRequest(namespace="team-b")),
                ("ShmRelease", pb.ShmReleaseRequest(namespace="team-b", lease_ids=[12345]))):
            code = _raw(server.tcp, method, body.SerializeToString(), ALICE)
            assert code == grpc.StatusCode.PERMISSION_DENIED, method
        assert _raw(server.tcp, "ShmAttach", pb.ShmAttachRequest(
            namespace="team-a").SerializeToString(), ALICE) == grpc.StatusCode.OK


def test_shm_attach_refuses_an_identity_granted_no_shared_memory_namespace(  # type: ignore[no-untyped-def]
        server_factory, tokens_file: Path, tmp_path: Path) -> None:
    """With server.shm_namespaces, the arena's path goes to identities granted
    one of those namespaces only (a ShmAttach naming none got it too)."""
    arena = f"/dev/shm/kvstore-test-auth-{tmp_path.name}"
    with server_factory("--auth-tokens-file", str(tokens_file), "--l1-shm-path", arena,
                        "--server-shm-namespaces", "team-a") as server:
        attach = pb.ShmAttachRequest().SerializeToString()
        assert _raw(server.tcp, "ShmAttach", attach, BOB) == grpc.StatusCode.PERMISSION_DENIED
        assert _raw(server.tcp, "ShmAttach", attach, ALICE) == grpc.StatusCode.OK
        assert _raw(server.tcp, "ShmAttach", attach, OPS) == grpc.StatusCode.OK  # * grant


@pytest.mark.parametrize("data_plane", [True, False], ids=["data-plane", "grpc"])
def test_a_tenant_granted_two_namespaces_holds_at_most_its_share_of_the_leases(  # type: ignore[no-untyped-def]
        server_factory, tokens_file: Path, tmp_path: Path, data_plane: bool) -> None:
    """The leases' share was counted per namespace (0.27.0, a fix review):
    bob, granted team-b and shared, held half the server's leases in each,
    all of them together, and every other tenant's acquire failed. Under
    auth the share is the identity's."""
    from kvstore.client.shm import ShmClient
    from kvstore.errors import CapacityExhausted
    from kvstore.store.shm import MAX_LEASES_PER_TENANT

    arena = f"/dev/shm/kvstore-test-auth-{tmp_path.name}"
    with server_factory("--auth-tokens-file", str(tokens_file), "--l1-shm-path", arena) as server, \
            ShmClient(server.unix_target, token=BOB, data_plane=data_plane, timeout=60) as bob, \
            ShmClient(server.unix_target, token=ALICE, data_plane=data_plane) as alice:
        for client, namespace in ((bob, "team-b"), (bob, "shared"), (alice, "team-a")):
            assert client.put({b"k": b"v" * 100}, namespace=namespace).stored == 1
        held = bob.acquire([b"k"] * MAX_LEASES_PER_TENANT, namespace="team-b")
        assert all(lease is not None and lease.lease_id for lease in held)
        with pytest.raises(CapacityExhausted, match=r"identity 'bob' holds 32768 .* per identity"):
            bob.acquire([b"k"], namespace="shared")
        theirs = alice.acquire([b"k"] * 16, namespace="team-a")  # not held back
        assert all(lease is not None and lease.lease_id for lease in theirs)
        alice.release(theirs)
        bob.release(held)
        again = bob.acquire([b"k"], namespace="shared")
        assert again[0] is not None and bytes(again[0].view) == b"v" * 100
        bob.release(again)


def test_a_put_stream_open_when_its_token_is_revoked_ends_at_its_next_chunk(  # type: ignore[no-untyped-def]
        server_factory, tokens_file: Path) -> None:
    """A Put stream opened before a SIGHUP revoked its token went on storing
    blocks for as long as its holder kept it open."""
    chunks: queue.Queue[pb.PutChunk | None] = queue.Queue()

    def feed() -> Iterator[pb.PutChunk]:
        while (chunk := chunks.get(timeout=60)) is not None:
            yield chunk

    with server_factory("--auth-tokens-file", str(tokens_file)) as server, \
            grpc.insecure_channel(server.tcp) as channel, \
            Client(server.tcp, namespace="team-a", token=OPS) as ops:
        put = channel.stream_unary("/kvstore.v1.KVStore/Put",
                                   request_serializer=pb.PutChunk.SerializeToString,
                                   response_deserializer=pb.PutResponse.FromString)
        call = put.future(feed(), timeout=60, metadata=(("authorization", f"Bearer {ALICE}"),))
        chunks.put(pb.PutChunk(namespace="team-a", key=b"before", block_size=3, data=b"old"))
        assert wait_until(lambda: ops.get([b"before"]) == [b"old"])
        tokens_file.write_text(grants_text(alice="alice-token-2"))
        os.kill(server.pid, signal.SIGHUP)

        def revoked() -> bool:
            with Client(server.tcp, namespace="team-a", token=ALICE) as alice:
                try:
                    alice.lookup([b"before"])
                except Unauthenticated:
                    return True
                return False

        assert wait_until(revoked)
        chunks.put(pb.PutChunk(key=b"after", block_size=3, data=b"new"))
        chunks.put(None)
        with pytest.raises(grpc.RpcError) as refused:
            call.result(timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ops.get([b"before", b"after"]) == [b"old", None]


def test_tokens_rotate_on_sighup(server_factory, tokens_file: Path) -> None:  # type: ignore[no-untyped-def]
    with server_factory("--auth-tokens-file", str(tokens_file)) as server:
        with Client(server.tcp, namespace="team-a", token=ALICE) as old:
            old.put({b"k": b"v"})
        tokens_file.write_text(grants_text(alice="alice-token-2"))
        os.kill(server.pid, signal.SIGHUP)

        def rotated() -> bool:
            with Client(server.tcp, namespace="team-a", token="alice-token-2") as new:
                try:
                    return new.get([b"k"]) == [b"v"]
                except Unauthenticated:
                    return False

        assert wait_until(rotated)
        with Client(server.tcp, namespace="team-a", token=ALICE) as old, \
                pytest.raises(Unauthenticated):
            old.get([b"k"])
        # A broken file on SIGHUP keeps the grants in force, and says why.
        tokens_file.write_text("this line is not a grant\n")
        os.kill(server.pid, signal.SIGHUP)
        assert wait_until(lambda: "keeping the previous grants" in server.log())
        assert "line 1" in server.log()
        with Client(server.tcp, namespace="team-a", token="alice-token-2") as new:
            assert new.get([b"k"]) == [b"v"]
        # So does one that grants nothing (emptied, or caught half-rewritten):
        # taken, it refused every call (an operator review).
        tokens_file.write_text("")
        os.kill(server.pid, signal.SIGHUP)
        assert wait_until(lambda: "grants nothing" in server.log())
        with Client(server.tcp, namespace="team-a", token="alice-token-2") as new:
            assert new.get([b"k"]) == [b"v"]
        assert server.alive()


def test_auth_is_off_without_a_tokens_file(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory() as server, \
            Client(server.tcp, namespace="any", token="ignored") as c:
        c.put({b"k": b"v"})
        assert c.get([b"k"]) == [b"v"]
        assert c.stats().puts == 1


def test_a_client_certificate_maps_to_an_identity(server_factory, tokens_file: Path,  # type: ignore[no-untyped-def]
                                                  tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    from kvstore import TLS

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True,
                       timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=kvstore-test-ca")
    for name, san, cn in (("server", "IP:127.0.0.1", ""), ("client", "DNS:engine-1", ""),
                          ("stranger", "DNS:stranger", ""),
                          ("spiffe", "URI:spiffe://test/engine-2", ""),
                          ("by-email", "email:engine-1", ""), ("by-bare-uri", "URI:engine-1", ""),
                          ("urn", "URI:urn:test:engine-3", ""),
                          # a URI grant's name in a CN or a DNS SAN, no URI SAN
                          ("by-cn-uri", "DNS:dev-box", r"spiffe:\/\/test\/engine-2"),
                          ("by-dns-uri", "DNS:spiffe://test/engine-2", "")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
                f"{name}.csr", "-subj", f"/CN={cn or name}")
        (tmp_path / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
                f"{name}.ext")
    with server_factory("--auth-tokens-file", str(tokens_file),
                        "--server-tls-cert", str(tmp_path / "server.pem"),
                        "--server-tls-key", str(tmp_path / "server.key"),
                        "--server-tls-client-ca", str(tmp_path / "ca.pem")) as server:
        def tls(name: str) -> TLS:
            return TLS(ca=str(tmp_path / "ca.pem"), cert=str(tmp_path / f"{name}.pem"),
                       key=str(tmp_path / f"{name}.key"))

        with Client(server.tcp, namespace="team-m", tls=tls("client")) as engine:
            engine.put({b"k": b"v"})  # SAN engine-1 → identity engine, namespace team-m
            assert engine.get([b"k"]) == [b"v"]
            with pytest.raises(PermissionDenied):
                engine.get([b"k"], namespace="team-a")
        for name in ("spiffe", "urn"):  # URI SANs → identities engine-2, engine-3
            with Client(server.tcp, namespace="team-m", tls=tls(name)) as workload:
                assert workload.get([b"k"]) == [b"v"]
        # A valid certificate the file does not map identifies no one; nor
        # does an email SAN or a URI SAN written as a host name that reads as
        # a granted name (a CA vetting DNS names may let a requester set those),
        # nor a URI grant's name in a subject CN or a DNS SAN (both earned
        # engine-2's grant, and read its namespace).
        for name in ("stranger", "by-email", "by-bare-uri", "by-cn-uri", "by-dns-uri"):
            with Client(server.tcp, namespace="team-m", tls=tls(name)) as stranger, \
                    pytest.raises(Unauthenticated) as refused:
                stranger.get([b"k"])
            if name == "stranger":  # the message names what was read from it
                assert "certificate's names ('stranger'" in str(refused.value)
        # A token decides over the certificate.
        with Client(server.tcp, namespace="team-m", tls=tls("client"), token=ALICE) as both, \
                pytest.raises(PermissionDenied):
            both.get([b"k"])


def test_node_wide_and_listing_methods() -> None:
    grants = parse_grants(f"{hash_token('a')} alice team-a\n{hash_token('o')} ops x admin\n", "f")
    alice, ops = grants.tokens[hash_token("a")], grants.tokens[hash_token("o")]
    for method in ("Flush", "SomeFutureMethod"):  # closed unless named otherwise
        with pytest.raises(PermissionDenied):
            Authorizer.authorize(alice, method, None)
        Authorizer.authorize(ops, method, None)
    Authorizer.authorize(alice, "ListKeys", "team-a")  # List*: namespace-scoped
    with pytest.raises(PermissionDenied):
        Authorizer.authorize(alice, "ListKeys", "team-b")
    with pytest.raises(PermissionDenied):  # admin is node-wide, not every namespace
        Authorizer.authorize(ops, "Get", "team-a")
    # Flush names its namespace: an admin of namespace x wiped any other one.
    Authorizer.authorize(ops, "Flush", "x")
    with pytest.raises(PermissionDenied, match="may not use namespace 'team-a'"):
        Authorizer.authorize(ops, "Flush", "team-a")


def test_stats_shows_a_non_admin_only_its_namespaces() -> None:
    grants = parse_grants(f"{hash_token('a')} alice team-a,team-c\n"
                          f"{hash_token('w')} wide *\n{hash_token('o')} ops x admin\n", "f")
    alice, wide, ops = (grants.tokens[hash_token(t)] for t in "awo")
    for namespace in ("team-a", "team-c"):
        Authorizer.authorize(alice, "Stats", namespace)
    for grant, namespace in ((alice, None), (alice, "team-b"), (wide, None)):
        with pytest.raises(PermissionDenied):  # the node's figures, or another tenant's
            Authorizer.authorize(grant, "Stats", namespace)
    Authorizer.authorize(wide, "Stats", "anything")  # '*': every namespace, not the node
    for namespace in (None, "team-a"):  # admins: the node's figures and any namespace's
        Authorizer.authorize(ops, "Stats", namespace)


def test_grants_file_errors_name_the_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="line 2"):
        parse_grants(f"{hash_token('t')} a ns\nplain-token a ns\n", "f")
    with pytest.raises(InvalidConfig, match="already granted"):
        parse_grants(f"{hash_token('t')} a ns\n{hash_token('t')} b ns\n", "f")
    with pytest.raises(InvalidConfig, match="IDENTITY"):
        parse_grants(f"{hash_token('t')} a ns superuser\n", "f")
    from kvstore.config import load

    with pytest.raises(InvalidConfig, match="tokens_file"):
        load(env={"KVSTORE_AUTH_TOKENS_FILE": str(tmp_path / "missing")})
    # The helper prints the line's credential for a token read from stdin.
    out = subprocess.run([sys.executable, "-m", "kvstore.server.auth", "hash"],
                         input=b"s3cret\n", capture_output=True, timeout=60, check=True)
    assert out.stdout.decode().strip() == hash_token("s3cret")
