"""A power cut, not just a kill -9: the server's data dir on a small ext4 on a
file-backed loop device; the cut is a copy of the loop device's backing file
taken while the server is stopped (SIGSTOP) and the filesystem still mounted:
what the server wrote but the kernel had not written back (dirty page cache)
is not in it, as at a power loss. The server is then killed, the copy mounted
on another loop device (ext4 replays its journal) and a server started on it.

Needs root, losetup and mkfs.ext4 (skipped, saying why, without them).
docs/reliability.md, "Power loss", has the outside simulation's figures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client

try:
    from s3server import S3Server
except ImportError:  # pragma: no cover
    pass

KiB = 1024
SIZES = (4 * KiB, 30_000, 64 * KiB, 300_000, 1024 * KiB)


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout.strip()


class LoopDisk:
    """An ext4 on a loop device, and power cuts of it (copies mounted)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.undo: list[tuple[str, ...]] = []  # commands run at close, last first
        self.servers: list[ServerProcess] = []  # stopped at close, before the unmounts
        self.image = root / "disk.img"
        self.cuts = 0
        with open(self.image, "wb") as fh:
            fh.truncate(256 * 1024 * 1024)
        self.loop = self._attach(self.image)
        run("mkfs.ext4", "-q", "-F", self.loop)
        self.mount = self._mount(self.loop, root / "disk")

    def _attach(self, image: Path) -> str:
        loop = run("losetup", "-f", "--show", str(image))
        self.undo.append(("losetup", "-d", loop))
        return loop

    def _mount(self, device: str, where: Path) -> Path:
        where.mkdir()
        run("mount", device, str(where))
        self.undo.append(("umount", str(where)))
        return where

    def _writes(self) -> tuple[str, ...]:
        """The loop device's write and flush counters, and I/Os in flight."""
        fields = Path(f"/sys/block/{Path(self.loop).name}/stat").read_text().split()
        return fields[4], fields[6], fields[8], *fields[15:17]

    def cut(self, server: ServerProcess) -> Path:
        """The power cut: the server stopped, the disk copied as it is (a
        copy the kernel wrote to meanwhile is taken again), the server
        killed. Returns where the copy is mounted."""
        self.cuts += 1
        server.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        copy = self.root / f"cut{self.cuts}.img"
        deadline = time.monotonic() + 30
        while True:
            before = self._writes()
            subprocess.run(["cp", "--sparse=always", str(self.image), str(copy)], check=True,
                           timeout=60)
            if self._writes() == before and before[2] == "0":
                break
            assert time.monotonic() < deadline, "the loop device never went quiet for a copy"
            time.sleep(0.05)  # bounded poll: the kernel's writeback in progress
        server.kill()
        return self._mount(self._attach(copy), self.root / f"after{self.cuts}")

    def start(self, factory: type[ServerProcess], data_dir: Path, *flags: str,
              env: dict[str, str] | None = None) -> ServerProcess:
        server = factory(*flags, data_dir=data_dir, unix=False, l1_capacity="32MiB", env=env)
        server.log_path = self.root / f"{data_dir.parent.name}.log"  # (not on a cut disk)
        self.servers.append(server)
        return server.start()

    def close(self) -> None:
        for server in self.servers:
            server.kill()
        for cmd in reversed(self.undo):
            subprocess.run(cmd, capture_output=True, timeout=60)
        for image in self.root.glob("*.img"):  # (sparse, but no use once detached)
            image.unlink()


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[LoopDisk]:
    if os.geteuid() != 0:
        pytest.skip("a loop device and a mount need root")
    for tool in ("losetup", "mkfs.ext4", "mount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        made = LoopDisk(tmp_path)
    except (RuntimeError, OSError) as exc:
        pytest.skip(f"no loop device here: {exc}")
    try:
        yield made
    finally:
        made.close()


def value(i: int, version: int = 0) -> bytes:
    head = f"block {i} version {version} ".encode()
    return (head * (SIZES[i % len(SIZES)] // len(head) + 1))[:SIZES[i % len(SIZES)]]


def key(i: int) -> bytes:
    return f"k{i:03d}".encode()


def test_with_l2_sync_acknowledged_puts_and_deletes_survive_a_power_cut(
        server_factory: type[ServerProcess], disk: LoopDisk) -> None:
    """l2.sync = true: every Put acknowledged at local is there byte for
    byte, every overwrite is the new bytes, every Delete stays done. (The
    last writes are Puts, which nothing but l2.sync syncs: with it off,
    they are lost.)"""
    server = disk.start(server_factory, disk.mount / "data", "--l2-sync", "true")
    with Client(server.tcp, namespace="power") as client:
        for i in range(30):
            client.put({key(i): value(i)}, ack="local")
        assert client.delete([key(i) for i in range(1, 30, 4)]) == 8
        for i in range(0, 30, 4):
            client.put({key(i): value(i, 1)}, ack="local")
        for i in range(30, 40):
            client.put({key(i): value(i)}, ack="local")
    after = disk.cut(server)
    restarted = disk.start(server_factory, after / "data", "--l2-sync", "true")
    with Client(restarted.tcp, namespace="power") as client:
        got = client.get([key(i) for i in range(40)])
    for i, block in enumerate(got):
        want = value(i) if i >= 30 else None if i % 4 == 1 else \
            value(i, 1) if i % 4 == 0 else value(i)
        assert block == want, (f"block {i}: {'missing' if block is None else 'wrong bytes'} "
                               "after the power cut")


def assert_even_keys_deleted(server: ServerProcess, when: str) -> None:
    """Of blocks 0..19, the even ones (deleted) are gone, the odd ones intact."""
    with Client(server.tcp, namespace="power") as client:
        got = client.get([key(i) for i in range(20)])
    back = [i for i in range(0, 20, 2) if got[i] is not None]
    assert not back, f"deleted blocks {back} came back {when}"
    assert [got[i] == value(i) for i in range(1, 20, 2)] == [True] * 10


def test_without_l2_sync_an_acknowledged_delete_survives_a_power_cut(
        server_factory: type[ServerProcess], disk: LoopDisk) -> None:
    """l2.sync = false: a Delete is synced to disk before its answer. Before,
    its commit sat in the page cache and the power cut brought back all 10
    deleted blocks (what a SIGTERM had flushed before them)."""
    server = disk.start(server_factory, disk.mount / "data")
    with Client(server.tcp, namespace="power") as client:
        client.put({key(i): value(i) for i in range(20)}, ack="local")
    assert server.terminate() == 0  # (the stop syncs L2)
    server.start()
    with Client(server.tcp, namespace="power") as client:
        assert client.delete([key(i) for i in range(0, 20, 2)]) == 10
    after = disk.cut(server)
    restarted = disk.start(server_factory, after / "data")
    assert_even_keys_deleted(restarted, "after the power cut")


def test_without_l2_sync_a_deleted_block_does_not_come_back_from_l3(
        server_factory: type[ServerProcess], disk: LoopDisk, s3: S3Server) -> None:
    """A Delete while L3 is down is recorded in L2 (the object's delete is
    retried); with l2.sync off that record was lost at a power cut and the
    restarted node served the deleted blocks from the bucket (10 of 10)."""
    env = {"KVSTORE_L3_ACCESS_KEY_ID": s3.access_key,
           "KVSTORE_L3_SECRET_ACCESS_KEY": s3.secret_key}
    # L3 requests keep their retries: rclone answers a PUT with a 500 now and
    # then on a loaded host, and the Puts at `remote` must land.
    flags = ("--l3-url", s3.url("power"), "--l3-endpoint", s3.endpoint, "--l3-timeout-s", "1",
             "--l3-breaker-failures", "1", "--l3-breaker-reset-s", "0.2")
    server = disk.start(server_factory, disk.mount / "data", *flags, env=env)
    with Client(server.tcp, namespace="power") as client:
        client.put({key(i): value(i) for i in range(20)}, ack="remote")
        s3.stop()
        assert client.delete([key(i) for i in range(0, 20, 2)]) == 10
    after = disk.cut(server)
    s3.start()
    restarted = disk.start(server_factory, after / "data", *flags, env=env)
    assert_even_keys_deleted(restarted, "from L3 after the power cut")


def test_a_deletes_sync_does_not_hold_up_puts_at_local(
        server_factory: type[ServerProcess]) -> None:
    """l2.sync = false: a Delete's sync writes back every commit the kernel
    still holds. It ran in the L2 writer, so after 768 MiB of Puts every Put
    at ``local`` waited as long as the Delete (1.1 s, against 3 ms before
    the Delete was synced): none was answered while it synced."""
    server = server_factory("--l2-capacity", "2GiB", l1_capacity="256MiB").start()
    chunk = os.urandom(256 * KiB)
    with Client(server.unix_target, namespace="backlog") as client:
        for i in range(192):  # 768 MiB in L2, not yet written back
            client.put({b"w%d-%d" % (i, j): chunk for j in range(16)}, ack="local")
        answered: list[tuple[float, float]] = []
        stop = threading.Event()

        def put_stream() -> None:
            with Client(server.unix_target, namespace="backlog") as other:
                i = 0
                while not stop.is_set():
                    began = time.monotonic()
                    other.put({b"p%d" % i: chunk[:64 * KiB]}, ack="local")
                    answered.append((began, time.monotonic()))
                    i += 1

        stream = threading.Thread(target=put_stream)
        stream.start()
        try:
            deadline = time.monotonic() + 30
            while len(answered) < 20:  # the Put stream going (bounded)
                assert stream.is_alive() and time.monotonic() < deadline, "no Put stream"
                time.sleep(0.01)
            began = time.monotonic()
            assert client.delete([b"w0-0"]) == 1
            ended = time.monotonic()
        finally:
            stop.set()
            stream.join(timeout=60)
    if ended - began < 0.2:
        pytest.skip(f"the disk synced the backlog in {ended - began:.3f} s: too fast to tell")
    within = [(b, e) for b, e in answered if b >= began and e <= ended]
    assert len(within) >= 5, (
        f"{len(within)} Puts at local answered during the Delete's {ended - began:.2f} s")
