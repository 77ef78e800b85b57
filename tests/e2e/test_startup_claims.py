"""What a server claims at start (its L1 arena file, its data directory, its
unix sockets) it checks first and holds: a second server on the same path is
refused in one line instead of taking it over, a path that is not a socket
is never deleted, and an arena that cannot get its space is refused at start
instead of killing the server with SIGBUS later. Also the start-up errors
that used to be tracebacks or named no option (workers, memory, arena path)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client


def start(tmp_path: Path, *flags: str, data_dir: Path | None = None,
          prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str] | None:
    """Run ``kvstore serve`` expected to refuse to start: its result, or None
    (after stopping it) when it started after all."""
    ready = tmp_path / f"ready-{time.monotonic_ns()}.json"
    cmd = [*prefix, sys.executable, "-m", "kvstore", "serve",
           "--data-dir", str(data_dir or tmp_path / "data"),
           "--server-listen", "127.0.0.1:0", "--server-unix-socket", "",
           "--l1-capacity", "8MiB", "--l1-prefault", "false", "--ready-file", str(ready),
           *flags]
    env = {**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    deadline = time.monotonic() + 60
    while proc.poll() is None and not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)  # a bounded poll on the process and its ready file
    if proc.poll() is None:  # it started (or hung): not the refusal expected
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
        return None
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def assert_refused(result: subprocess.CompletedProcess[str] | None, *names: str) -> str:
    """Exit status 2 and one line on stderr naming each of ``names``."""
    assert result is not None, "the server started: it should have refused"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# --------------------------------------------------------------------- L1 arena file


def test_an_arena_file_that_cannot_get_its_space_is_refused_at_start(tmp_path: Path) -> None:
    """A full tmpfs refuses the space with ENOSPC; RLIMIT_FSIZE (``ulimit -f``,
    in KiB) refuses it with EFBIG the same way, without root. Before, the
    sparse file mapped fine and the server died of SIGBUS at a later Put."""
    arena = tmp_path / "arena"
    limit = ("sh", "-c", 'ulimit -f 4096 && exec "$@"', "sh")
    line = assert_refused(start(tmp_path, "--l1-capacity", "16MiB", "--l1-shm-path", str(arena),
                                "--l2-enabled", "false", prefix=limit),
                          "l1.capacity 16 MiB", f"l1.shm_path {arena}", "free there")
    assert "File too large" in line
    assert not arena.exists()


def _can_mount_tmpfs(where: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs",
                            "-o", "size=1m", "kvstore-probe", str(where)],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize("prefault", ["true", "false"])
def test_a_tmpfs_smaller_than_l1_is_refused_at_start(tmp_path: Path, prefault: str) -> None:
    """The real case (a container's 64 MiB /dev/shm): a 4 MiB tmpfs mounted in a
    private mount namespace. Before: SIGBUS at start (prefault) or at the
    5th 1 MiB Put (no prefault), with nothing printed."""
    shm = tmp_path / "shm"
    shm.mkdir()
    if not _can_mount_tmpfs(shm):
        pytest.skip("needs root and unshare(1) to mount a tmpfs in a private mount namespace")
    arena = shm / "arena"
    in_tmpfs = ("unshare", "-m", "--propagation", "private", "sh", "-c",
                f'mount -t tmpfs -o size=4m kvstore-test {shm} && exec "$@"', "sh")
    assert_refused(start(tmp_path, "--l1-capacity", "16MiB", "--l1-prefault", prefault,
                         "--l1-shm-path", str(arena), "--l2-enabled", "false", prefix=in_tmpfs),
                   "l1.capacity 16 MiB", f"l1.shm_path {arena}", "No space left on device",
                   "MiB free there")


def test_a_second_server_on_the_same_arena_file_is_refused(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    arena = tmp_path / "arena"
    first = server_factory("--l1-shm-path", str(arena)).start()
    block = os.urandom(100_000)
    with Client(first.tcp, namespace="ns") as client:
        client.put({b"k": block})
        assert_refused(start(tmp_path, "--l1-shm-path", str(arena)),
                       f"l1.shm_path {arena}", "another running kvstore server")
        assert client.get([b"k"]) == [block]  # the first server's arena is untouched
    assert first.terminate() == 0
    assert not arena.exists()  # the holder removes its own file
    server_factory("--l1-shm-path", str(arena)).start()  # and the path is free again


# --------------------------------------------------------------------- data directory


def test_a_second_server_on_the_same_data_dir_is_refused(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    data = tmp_path / "shared-data"
    first = server_factory(data_dir=data, unix=False).start()
    assert_refused(start(tmp_path, data_dir=data),
                   f"data_dir {data} is in use by another kvstore server", f"pid {first.pid}")
    with Client(first.tcp, namespace="ns") as client:
        client.put({b"k": b"v" * 4096}, ack="local")
        assert client.get([b"k"]) == [b"v" * 4096]
    first.kill()  # a killed server's lock goes with it: the next one starts
    again = server_factory(data_dir=data, unix=False).start()
    with Client(again.tcp, namespace="ns") as client:
        assert client.get([b"k"]) == [b"v" * 4096]


def test_a_data_dir_written_for_a_newer_release_is_refused(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    """A rollback past what the data dir's layout allows: refused in one
    line naming both releases, the data dir left as it was."""
    import lmdb

    data = tmp_path / "data"
    first = server_factory(data_dir=data, unix=False).start()
    assert first.terminate() == 0
    env = lmdb.open(str(data / "l2"), max_dbs=8)
    with env.begin(db=env.open_db(b"kvstore"), write=True) as txn:
        txn.put(b"readable_by", b"99")
        txn.put(b"written_by", b"kvstore 99.0.0")
    env.close()
    line = assert_refused(start(tmp_path, "--l2-recover", "true", data_dir=data),
                          f"L2 at {data / 'l2'}", "kvstore 99.0.0", "reads up to")
    assert "Traceback" not in line
    assert not list(tmp_path.glob("l2.damaged-*")) and not list(data.glob("l2.damaged-*"))


def test_a_data_dir_whose_l2_another_process_has_open_is_refused(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    """A release from before kvstore.lock (or any LMDB program) serving the
    same L2 takes no kvstore.lock; LMDB's own lock on lock.mdb shows it.
    Two servers on one L2 each serve their own bytes for the same key."""
    data = tmp_path / "data"
    first = server_factory(data_dir=data, unix=False).start()
    with Client(first.tcp, namespace="ns") as client:
        client.put({b"k": b"v" * 4096}, ack="local")
    assert first.terminate() == 0
    holder = subprocess.Popen(  # holds the environment open as an older server would
        [sys.executable, "-c", "import lmdb, sys; e = lmdb.open(sys.argv[1], max_dbs=4); "
         "print('open', flush=True); sys.stdin.read()", str(data / "l2")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        assert_refused(start(tmp_path, data_dir=data), f"data_dir {data}",
                       "is open in another process", f"pid {holder.pid}")
    finally:
        holder.communicate(input="", timeout=60)  # stdin closed: it exits
    again = server_factory(data_dir=data, unix=False).start()  # alone again: it starts
    with Client(again.tcp, namespace="ns") as client:
        assert client.get([b"k"]) == [b"v" * 4096]


# --------------------------------------------------------------------- unix sockets


def test_a_file_at_the_unix_socket_path_is_kept_and_refused(tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("precious config\n")
    assert_refused(start(tmp_path, "--server-unix-socket", str(precious)),
                   f"server.unix_socket {precious} exists and is not a socket")
    assert precious.read_text() == "precious config\n"


def test_a_file_at_the_data_plane_socket_path_is_kept_and_refused(tmp_path: Path) -> None:
    sock = tmp_path / "kv.sock"
    precious = tmp_path / "kv.sock.dp"  # the data plane's default path beside it
    precious.write_text("precious\n")
    assert_refused(start(tmp_path, "--server-unix-socket", str(sock)),
                   f"server.data_plane_unix {precious} exists and is not a socket")
    assert precious.read_text() == "precious\n"


def test_a_live_servers_sockets_are_not_taken_over(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    first = server_factory().start()
    assert_refused(start(tmp_path, "--server-unix-socket", first.unix),
                   f"server.unix_socket {first.unix}: another server is listening there")
    own = tmp_path / "own.sock"
    assert_refused(start(tmp_path, "--server-unix-socket", str(own),
                         "--server-data-plane-unix", f"{first.unix}.dp"),
                   f"server.data_plane_unix {first.unix}.dp: another server is listening")
    with Client(first.unix_target, namespace="ns") as client:  # still reachable there
        client.put({b"k": b"v"})
        assert client.get([b"k"]) == [b"v"]
    assert Path(f"{first.unix}.dp").is_socket()


def test_a_stale_socket_is_replaced(tmp_path: Path,
                                    server_factory: type[ServerProcess]) -> None:
    """What a killed server leaves: a socket nobody accepts on."""
    path = tmp_path / "stale.sock"
    for stale in (path, Path(f"{path}.dp")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(stale))
    server = server_factory("--server-unix-socket", str(path)).start()
    with Client(f"unix:{path}", namespace="ns") as client:
        client.put({b"k": b"v"})
        assert client.get([b"k"]) == [b"v"]
    assert server.terminate() == 0


# ------------------------------------------------- errors that were tracebacks or unnamed


def test_zero_workers(tmp_path: Path) -> None:
    assert_refused(start(tmp_path, "--server-workers", "0"), "server.workers", "0")


def test_an_arena_path_that_cannot_be_created(tmp_path: Path) -> None:
    assert_refused(start(tmp_path, "--l1-shm-path", "/proc/nope/arena"),
                   "l1.shm_path /proc/nope/arena", "No such file or directory")


def _memory_and_swap() -> int:
    total = 0
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith(("MemTotal:", "SwapTotal:")):
                total += int(line.split()[1]) * 1024
    return total


def test_an_arena_larger_than_memory_and_swap(tmp_path: Path) -> None:
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
        pytest.skip("vm.overcommit_memory=1 maps any size: the arena fails only when touched")
    gib = 4 * _memory_and_swap() // 1024**3 + 1
    assert_refused(start(tmp_path, "--l1-capacity", f"{gib}GiB", "--l2-enabled", "false"),
                   f"l1.capacity {gib} GiB", "cannot map that much memory")


# --------------------------------------------------------- a refused start leaves nothing


def test_a_refusal_after_the_arena_is_made_removes_its_file(tmp_path: Path) -> None:
    """An L3 directory that cannot be made is found as the store opens, after
    the L1 arena's file was made (and L2 opened): the refusal releases them.
    Before, the file stayed behind in /dev/shm, holding its memory, after
    every such failed start."""
    arena = tmp_path / "arena"
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")  # (a file as the parent fails for root too)
    url = f"file://{not_a_dir}/l3"
    assert_refused(start(tmp_path, "--l1-shm-path", str(arena), "--l3-url", url),
                   f"l3.url {url!r}", "cannot use directory")
    assert not arena.exists()


def test_a_taken_metrics_port_leaves_no_arena_file(tmp_path: Path) -> None:
    """The metrics listener binds once the store is made, before it starts."""
    pytest.importorskip("prometheus_client", reason="the metrics need their extra")
    arena = tmp_path / "arena"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        assert_refused(start(tmp_path, "--l1-shm-path", str(arena),
                             "--server-metrics-listen", address),
                       f"server.metrics_listen {address}")
    assert not arena.exists()


def test_a_ready_file_that_cannot_be_written_stops_the_server_cleanly(
        tmp_path: Path, server_factory: type[ServerProcess]) -> None:
    """The ready file is written last, once the server serves: a failure
    there (its directory a file here; a full disk in the field) is a refusal
    in one line naming the path, after a clean stop, not an OSError naming
    a temporary file, exit 1, with the arena file and the sockets left."""
    arena = tmp_path / "arena"
    sock = tmp_path / "kv.sock"
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    ready = not_a_dir / "ready.json"
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(data),
         "--server-listen", "127.0.0.1:0", "--server-unix-socket", str(sock),
         "--l1-capacity", "8MiB", "--l1-prefault", "false", "--l1-shm-path", str(arena),
         "--ready-file", str(ready)],
        env={**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}, capture_output=True, text=True,
        timeout=120)
    assert_refused(result, f"--ready-file {ready}", "Not a directory")
    assert not arena.exists()
    assert not sock.exists() and not Path(f"{sock}.dp").exists()
    # Stopped, not abandoned: the same data dir and arena path serve at once.
    again = server_factory("--l1-shm-path", str(arena), data_dir=data, unix=False).start()
    with Client(again.tcp, namespace="ns") as client:
        client.put({b"k": b"v"})
        assert client.get([b"k"]) == [b"v"]
