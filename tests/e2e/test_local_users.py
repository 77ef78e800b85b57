"""Another unprivileged user on the server's host (docs/security.md, "Other
users on the host"): what it makes at a path the server will use must not
give it the arena (every tenant's blocks), the sockets or a file to clobber;
and (last) bearer tokens sent in the clear off the host are warned about.

The tests that need a file or directory of another user make one with chown,
so they run as root only (skipped otherwise)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvstore.config import load
from kvstore.server.app import Server

#: A user id that is not this process's (``nobody`` on most systems).
OTHER_UID = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def start(tmp_path: Path, *flags: str, umask: int | None = None) -> subprocess.Popen[str]:
    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "data"),
           "--server-listen", "127.0.0.1:0", "--server-unix-socket", "",
           "--l1-capacity", "8MiB", "--l1-prefault", "false", "--ready-file", str(ready),
           *flags]
    if umask is not None:
        # Set by a shell that then execs the server, not by a preexec_fn: that
        # makes subprocess fork() this process, whose gRPC (started by earlier
        # tests) restarts its poller in the child, which then aborts on the
        # descriptors closed before exec ("epoll_wait error: Bad file descriptor").
        cmd = ["sh", "-c", f'umask {umask:03o} && exec "$@"', "sh", *cmd]
    env = {**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)


def wait_ready(proc: subprocess.Popen[str], ready: Path) -> None:
    """Until the server ``proc`` writes its ready file ``ready`` (30 s at most;
    fails the test with its output if it exits first)."""
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert proc.poll() is None, proc.communicate(timeout=30)
        assert time.monotonic() < deadline, "not ready in 30 s"
        time.sleep(0.02)  # polling a file with a deadline


def refusal(tmp_path: Path, *flags: str) -> str:
    """The one line a server that must not start prints; fails the test if it
    starts serving instead (within 30 s)."""
    proc = start(tmp_path, *flags)
    deadline = time.monotonic() + 30
    try:
        while proc.poll() is None:
            if (tmp_path / "ready.json").exists():
                pytest.fail("the server started")
            if time.monotonic() > deadline:
                pytest.fail("the server neither started nor refused within 30 s")
            time.sleep(0.02)  # polling a process and a file with a deadline
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in err, err
    return err.strip()


# -- the arena file (l1.shm_path) --------------------------------------------------------


def test_an_arena_path_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    # Followed, the server truncated the file the link names (any file the
    # service's user may write: its own L2, say) and put the arena there.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    arena = tmp_path / "l1.arena"
    arena.symlink_to(victim)
    line = refusal(tmp_path, "--l1-shm-path", str(arena))
    assert "l1.shm_path" in line and "symbolic link" in line, line
    assert victim.read_bytes() == b"precious"


def test_an_arena_file_left_with_a_wider_mode_is_made_the_service_users_again(
        tmp_path: Path) -> None:
    # A file of an earlier start, opened up for a group of engines (the
    # ExecStartPost chmod of deploy/systemd) or by hand, kept that mode: every
    # user it let in could map the new arena, with no word in the log.
    arena = tmp_path / "l1.arena"
    arena.write_bytes(b"")
    arena.chmod(0o644)
    proc = start(tmp_path, "--l1-shm-path", str(arena))
    try:
        wait_ready(proc, tmp_path / "ready.json")
        assert oct(arena.stat().st_mode & 0o777) == oct(0o600)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert "had mode -rw-r--r--: set to 0600" in err, err


@needs_root
def test_an_arena_file_another_user_made_is_refused(tmp_path: Path) -> None:
    # The other user makes the file first, world-readable, and keeps it open:
    # had the server taken it, that user's descriptor (or mapping) would read
    # every tenant's blocks.
    arena = tmp_path / "l1.arena"
    fd = os.open(arena, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        os.fchown(fd, OTHER_UID, OTHER_UID)
        os.fchmod(fd, 0o666)
        line = refusal(tmp_path, "--l1-shm-path", str(arena))
        assert "l1.shm_path" in line and f"owned by uid {OTHER_UID}" in line, line
        assert os.fstat(fd).st_size == 0  # not truncated, not filled
    finally:
        os.close(fd)


@needs_root
def test_an_arena_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    # That user could swap the file for its own once the server made it:
    # clients attaching later would map the user's file.
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, OTHER_UID, OTHER_UID)
    line = refusal(tmp_path, "--l1-shm-path", str(directory / "l1.arena"))
    assert "l1.shm_path" in line and "belongs to another user" in line, line
    assert not (directory / "l1.arena").exists()


@pytest.mark.parametrize(("flag", "name", "option"), [
    ("--l1-shm-path", "l1.arena", "l1.shm_path"),
    ("--server-unix-socket", "kv.sock", "server.unix_socket"),
], ids=["arena", "socket"])
def test_a_path_in_a_world_writable_directory_without_sticky_bit_is_refused(
        tmp_path: Path, flag: str, name: str, option: str) -> None:
    # Anyone could swap the arena or the socket there once the server made it.
    directory = tmp_path / "open"
    directory.mkdir()
    directory.chmod(0o777)
    line = refusal(tmp_path, flag, str(directory / name))
    assert option in line and "no sticky bit" in line, line


@pytest.mark.parametrize(("flags", "option"), [
    (("--l1-shm-path", "{mine}/l1.arena"), "l1.shm_path"),
    (("--server-unix-socket", "{mine}/kv.sock"), "server.unix_socket"),
    (("--server-unix-socket", "", "--data-dir", "{mine}/data"), "data_dir"),
], ids=["arena", "socket", "data_dir"])
def test_a_path_below_a_world_writable_directory_without_sticky_bit_is_refused(
        tmp_path: Path, flags: tuple[str, ...], option: str) -> None:
    # The server's own directory there is no help: anyone may rename it aside
    # and put theirs at its name (another user did that to the socket's and
    # served the next client).
    mine = tmp_path / "open" / "mine"
    mine.mkdir(parents=True, mode=0o755)
    (tmp_path / "open").chmod(0o777)
    line = refusal(tmp_path, *(f.format(mine=mine) for f in flags))
    assert option in line and "no sticky bit" in line and "above it" in line, line


def test_an_arena_in_a_sticky_world_writable_directory_is_taken(tmp_path: Path) -> None:
    # /dev/shm itself: others may write there but not remove what is ours.
    directory = tmp_path / "sticky"
    directory.mkdir()
    directory.chmod(0o1777)
    arena = directory / "l1.arena"
    proc = start(tmp_path, "--l1-shm-path", str(arena))
    try:
        wait_ready(proc, tmp_path / "ready.json")
        st = arena.stat()
        assert st.st_uid == os.geteuid() and st.st_mode & 0o777 == 0o600
    finally:
        proc.kill()
        proc.communicate(timeout=30)
        arena.unlink(missing_ok=True)


# -- the unix sockets (server.unix_socket, server.data_plane_unix) -----------------------


@needs_root
@pytest.mark.parametrize("option", ["--server-unix-socket", "--server-data-plane-unix"])
def test_a_socket_in_a_directory_of_another_user_is_refused(tmp_path: Path, option: str) -> None:
    # That user could move the server's socket aside and listen in its place:
    # the next client would send it its bearer token and its blocks.
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, OTHER_UID, OTHER_UID)
    flags = [option, str(directory / "kv.sock")]
    if option == "--server-data-plane-unix":
        flags += ["--server-unix-socket", str(tmp_path / "kv.sock")]
    line = refusal(tmp_path, *flags)
    name = option.removeprefix("--").replace("server-", "server.", 1).replace("-", "_")
    assert name in line and "belongs to another user" in line, line



def test_a_socket_directory_the_server_makes_is_not_world_writable(tmp_path: Path) -> None:
    # Under umask 0 a plain mkdir made it 0777: anyone could swap the socket.
    # So did mkdir(parents=True) the one above it: anyone could rename it.
    directory = tmp_path / "made" / "here"
    proc = start(tmp_path, "--server-unix-socket", str(directory / "kv.sock"), umask=0)
    try:
        wait_ready(proc, tmp_path / "ready.json")
        assert directory.stat().st_mode & 0o022 == 0
        assert directory.parent.stat().st_mode & 0o022 == 0
        assert (directory / "kv.sock").stat().st_mode & 0o777 == 0o600
        with socket.socket(socket.AF_UNIX) as probe:
            probe.connect(str(directory / "kv.sock"))  # still serves its own user
    finally:
        proc.kill()
        proc.communicate(timeout=30)



def test_the_grpc_socket_is_private_from_its_bind_under_umask_0(tmp_path: Path) -> None:
    # grpc binds and listens at add_insecure_port; the chmod to 0600 came only
    # once it served. Under umask 0 the socket was 0777 in between, and another
    # user connecting then kept a connection (seen: 1 start in 12).
    config = load(env={
        "KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "8MiB",
        "KVSTORE_L1_PREFAULT": "false", "KVSTORE_SERVER_LISTEN": "",
        "KVSTORE_L2_ENABLED": "false", "KVSTORE_SERVER_UNIX_SOCKET": str(tmp_path / "kv.sock"),
    })
    modes: list[int] = []

    async def go() -> None:
        server = Server(config)
        start_grpc = server.grpc.start

        async def start_and_look() -> None:
            modes.append(os.lstat(tmp_path / "kv.sock").st_mode & 0o777)
            await start_grpc()

        server.grpc.start = start_and_look  # type: ignore[method-assign]
        await server.start()
        await server.stop(0)

    umask = os.umask(0)
    try:
        asyncio.run(go())
    finally:
        os.umask(umask)
    assert modes == [0o600]


# -- the data directory (data_dir: L2 and kvstore.lock) ----------------------------------


@needs_root
def test_a_data_dir_of_another_user_is_refused_and_a_link_there_not_followed(
        tmp_path: Path) -> None:
    # That user links kvstore.lock to a file only the service's user may write:
    # the server truncated it and wrote its pid there.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    victim.chmod(0o600)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "kvstore.lock").symlink_to(victim)
    os.lchown(data / "kvstore.lock", OTHER_UID, OTHER_UID)
    os.chown(data, OTHER_UID, OTHER_UID)
    line = refusal(tmp_path)
    assert "data_dir" in line and "belongs to another user" in line, line
    assert victim.read_bytes() == b"precious"


@needs_root
def test_an_l2_directory_of_another_user_in_a_sticky_data_dir_is_refused(
        tmp_path: Path) -> None:
    # In a data_dir like /tmp (sticky: kvstore.lock stays the server's) another
    # user may make l2/ first; LMDB's files there would be that user's to swap.
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o1777)
    (data / "l2").mkdir(mode=0o777)
    os.chown(data / "l2", OTHER_UID, OTHER_UID)
    line = refusal(tmp_path)
    assert "data_dir" in line and "belongs to another user" in line, line
    assert not (data / "l2" / "data.mdb").exists()


def test_a_world_writable_data_dir_without_sticky_bit_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)
    line = refusal(tmp_path)
    assert "data_dir" in line and "no sticky bit" in line, line


def test_a_link_at_the_lock_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "kvstore.lock").symlink_to(victim)
    line = refusal(tmp_path)
    assert "kvstore.lock" in line, line
    assert victim.read_bytes() == b"precious"



def test_a_link_beside_the_ready_file_is_not_followed(tmp_path: Path) -> None:
    # The ready file was written through "<path>.tmp": in a shared /tmp another
    # user linked that name to a file only the server's user may write, and the
    # server replaced its content with the ready file's JSON.
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    ready = shared / "ready.json"
    Path(f"{ready}.tmp").symlink_to(victim)
    proc = start(tmp_path, "--l2-enabled", "false", "--ready-file", str(ready))
    try:
        wait_ready(proc, ready)
        assert victim.read_bytes() == b"precious"
        assert not ready.is_symlink() and '"pid"' in ready.read_text()
        assert ready.stat().st_mode & 0o777 == 0o644
    finally:
        proc.kill()
        proc.communicate(timeout=30)



def test_an_l3_directory_kvstore_makes_is_private(tmp_path: Path) -> None:
    # obstore made it 0755 and its objects 0644 under the usual umask: every
    # user of the host read every namespace's blocks there (and their names).
    pytest.importorskip("obstore")
    l3 = tmp_path / "open" / "l3"
    (tmp_path / "open").mkdir(mode=0o755)
    proc = start(tmp_path, "--l2-enabled", "false", "--l3-url", f"file://{l3}", umask=0o022)
    try:
        wait_ready(proc, tmp_path / "ready.json")
        assert l3.stat().st_mode & 0o777 == 0o700
    finally:
        proc.kill()
        proc.communicate(timeout=30)


# -- the network path: bearer tokens without TLS ------------------------------------------


def _unshare_net() -> list[str]:
    """A command prefix that runs in a network namespace of its own (only a
    loopback, down): there a wildcard listener is reachable from nowhere."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare is not installed")
    for prefix in ([unshare, "-n"], [unshare, "-rn"]):
        if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
            return prefix
    pytest.skip("cannot make a network namespace here")


@pytest.mark.parametrize("listen, warned", [("0.0.0.0:0", True), ("127.0.0.1:0", False)])
def test_tokens_over_plaintext_tcp_off_loopback_are_warned_about(
        tmp_path: Path, listen: str, warned: bool) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{'ab' * 32} alice chat\n")
    ready = tmp_path / "ready.json"
    cmd = [*_unshare_net(), sys.executable, "-m", "kvstore", "serve",
           "--data-dir", str(tmp_path / "data"), "--server-listen", listen,
           "--server-unix-socket", "", "--l1-capacity", "8MiB", "--l1-prefault", "false",
           "--l2-enabled", "false", "--auth-tokens-file", str(tokens),
           "--ready-file", str(ready)]
    env = {**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        wait_ready(proc, ready)
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    lines = [line for line in out.splitlines() if "in the clear" in line]
    if warned:
        assert len(lines) == 1 and "WARNING" in lines[0] and "server.tls_cert" in lines[0], out
    else:
        assert not lines, out
