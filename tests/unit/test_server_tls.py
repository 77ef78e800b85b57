"""ServerTLS: renewed certificate files are taken into use, broken ones are
not, and the files are looked at no more than once a second (fake clocks)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import grpc
import pytest
from pki import make_ca, make_intermediate, make_leaf, needs_openssl

from kvstore.errors import InvalidConfig
from kvstore.server.preflight import check_validity
from kvstore.server.tls import CHECK_EVERY_S, SETTLE_S, ServerTLS, load_material

pytestmark = needs_openssl


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("renew-pki")
    make_ca(d, "ca")
    make_leaf(d, "ca", "server-1", "IP:127.0.0.1", days=2)
    make_leaf(d, "ca", "server-2", "IP:127.0.0.1", days=3)
    return d


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def install(pki: Path, name: str, into: Path) -> None:
    """Both files replaced at once, as a Kubernetes secret's update does."""
    for ext in ("pem", "key"):
        tmp = into / f".new.{ext}"
        shutil.copyfile(pki / f"{name}.{ext}", tmp)
        os.replace(tmp, into / f"server.{ext}")


@pytest.fixture
def files(pki: Path, tmp_path: Path) -> Path:
    install(pki, "server-1", tmp_path)
    return tmp_path


def make(files: Path, clock: Clock, wall: Clock | None = None) -> ServerTLS:
    return ServerTLS(str(files / "server.pem"), str(files / "server.key"), clock=clock,
                     wall=wall or time.time)


def test_renewed_files_are_taken_at_the_next_check(pki: Path, files: Path) -> None:
    clock = Clock()
    tls = make(files, clock)
    assert tls.material.subject == "server-1"
    first = tls.material.context
    install(pki, "server-2", files)
    assert not tls.check()  # looked at less than a second ago
    assert tls.material.subject == "server-1"
    clock.now += CHECK_EVERY_S
    assert tls.check()
    assert tls.material.subject == "server-2" and tls.reloads == 1 and tls.generation == 1
    assert tls.material.context is not first
    assert tls.material.not_after > 2 * 86400 + time.time()  # server-2 runs 3 days
    clock.now += CHECK_EVERY_S
    assert not tls.check()  # nothing changed since


def test_files_that_do_not_load_leave_the_certificate_in_force(
        pki: Path, files: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    tls = make(files, clock)
    shutil.copyfile(pki / "server-2.key", files / "server.key")  # the key first, then...
    clock.now += CHECK_EVERY_S
    with caplog.at_level("WARNING", logger="kvstore.server"):
        assert not tls.check()
        assert tls.failures == 0  # (a renewal in two copies fails in between: not yet)
        clock.now += SETTLE_S
        assert not tls.check()
        clock.now += CHECK_EVERY_S
        assert not tls.check()  # the same files: warned once
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "not reloaded: the key does not belong to the certificate" in warnings[0]
    assert "CN=server-1" in warnings[0]
    assert tls.material.subject == "server-1" and tls.failures == 1 and tls.generation == 0
    shutil.copyfile(pki / "server-2.pem", files / "server.pem")  # ...the certificate
    clock.now += CHECK_EVERY_S
    assert tls.check()
    assert tls.material.subject == "server-2"


def test_a_garbled_or_expired_certificate_is_not_taken(pki: Path, files: Path) -> None:
    clock, wall = Clock(), Clock()
    wall.now = time.time()
    tls = make(files, clock, wall)
    (files / "server.pem").write_bytes(b"-----BEGIN CERTIFICATE-----\nnot one\n")
    clock.now += CHECK_EVERY_S
    assert not tls.check(force=True) and tls.failures == 1  # (SIGHUP: said at once)
    install(pki, "server-2", files)
    wall.now += 4 * 86400  # past server-2's end too
    clock.now += CHECK_EVERY_S
    assert not tls.check(force=True) and tls.failures == 2
    assert tls.material.subject == "server-1"


def test_a_certificate_not_valid_yet_is_taken_when_it_becomes_valid(
        pki: Path, files: Path) -> None:
    """Taken at once, it failed every client's handshake ("not yet valid")
    while the expiry gauge showed a far end date."""
    clock, wall = Clock(), Clock()
    wall.now = time.time()
    tls = make(files, clock, wall)
    install(pki, "server-2", files)
    wall.now -= 86400  # before server-2's start
    for _ in range(3):
        clock.now += SETTLE_S
        assert not tls.check()
    assert tls.material.subject == "server-1" and tls.failures == 1
    wall.now += 86400  # its start has come: the same files are taken
    clock.now += CHECK_EVERY_S
    assert tls.check() and tls.material.subject == "server-2"


def test_the_data_plane_resumes_no_session(files: Path) -> None:
    """Every handshake is a full one, checked against the client CA in force:
    a session resumed from before a CA was removed skipped that check."""
    import ssl

    ctx = make(files, Clock()).listener_context
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.num_tickets == 0


def test_a_forced_check_rereads_and_says_when_nothing_changed(
        files: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls = make(files, Clock())
    with caplog.at_level("INFO", logger="kvstore.server"):
        assert not tls.check(force=True)  # no second to wait for: a SIGHUP
    assert any("files are unchanged (CN=server-1" in r.getMessage() for r in caplog.records)


def test_grpc_is_handed_each_new_certificate_once(pki: Path, files: Path) -> None:
    clock = Clock()
    tls = make(files, clock)
    assert tls._grpc_fetch() is None  # gRPC has the start-up one
    install(pki, "server-2", files)
    clock.now += CHECK_EVERY_S
    assert isinstance(tls._grpc_fetch(), grpc.ServerCertificateConfiguration)
    assert tls._grpc_fetch() is None


def test_unreadable_files_at_start_are_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("junk")
    (tmp_path / "c.key").write_text("junk")
    with pytest.raises(InvalidConfig, match=r"server\.tls_cert .*not a PEM certificate"):
        ServerTLS(str(tmp_path / "c.pem"), str(tmp_path / "c.key"))


def test_the_chain_ends_with_its_first_certificate_to_end(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    """A leaf (3 days) sent with an intermediate that ends first (1 day):
    the expiry gauge shows the intermediate's end (the leaf's alone was read:
    the gauge showed its later end while every handshake failed). A chain
    certificate that has ended already does not refuse the file (it may be
    one no client needs: an old cross-signed root, as certbot's long chain
    had; refusing it refused a working setup) but is said in a WARNING. A
    chain cut short is named as such, not blamed on the key."""
    make_ca(tmp_path, "root", days=5)
    make_intermediate(tmp_path, "root", "inter", days=1)
    make_leaf(tmp_path, "inter", "leaf", "IP:127.0.0.1", days=3)
    leaf, inter = (tmp_path / "leaf.pem").read_bytes(), (tmp_path / "inter.pem").read_bytes()
    key = (tmp_path / "leaf.key").read_bytes()
    now = time.time()
    material = load_material(leaf + inter, key, None, now)
    assert material.subject == "leaf" and material.warnings == ()
    assert now + 0.9 * 86400 < material.not_after < now + 1.1 * 86400  # the intermediate's
    later = load_material(leaf + inter, key, None, now + 2 * 86400)  # taken, and said
    assert later.not_after > now + 2.9 * 86400  # (the leaf's: the ended one is not counted)
    assert len(later.warnings) == 1 and \
        "certificate #2 of the file (CN=inter) expired on" in later.warnings[0]
    with pytest.raises(ValueError, match=r"certificate #2 of the file is cut short"):
        load_material(leaf + inter[:len(inter) // 2], key, None, now)
    # At start: the same file starts, with the WARNING; an expired leaf does not.
    (tmp_path / "chain.pem").write_bytes(leaf + inter)
    with caplog.at_level("WARNING"):
        check_validity(str(tmp_path / "chain.pem"), now=now + 2 * 86400)
    assert any("(CN=inter) expired on" in r.getMessage() for r in caplog.records)
    with pytest.raises(InvalidConfig, match=r"server\.tls_cert .* expired on .*renew it"):
        check_validity(str(tmp_path / "chain.pem"), now=now + 4 * 86400)
