"""L2 holds every namespace's blocks: the directories kvstore creates for it
are 0700 and LMDB's files 0600 whatever the umask; a data directory the
operator made is left as it is, with one warning line when other users may
enter it."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, which the servers started meanwhile inherit."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory other users may enter (pytest's own tmp_path sits in a
    0700 directory, which no other user can pass)."""
    path = Path(tempfile.mkdtemp(prefix="kvstore-perm-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def put_local(server: ServerProcess) -> None:
    with Client(server.tcp, namespace="tenant-a") as client:
        client.put({b"k": b"tenant A's prompt cache"}, ack="local")


def test_l2_is_created_private_under_umask_022(
        umask_022: None, open_dir: Path, server_factory: type[ServerProcess]) -> None:
    data = open_dir / "kvstore-data"
    server = server_factory("--data-dir", str(data), unix=False,
                            env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    put_local(server)
    assert mode(data) == 0o700 and mode(data / "l2") == 0o700
    for name in ("data.mdb", "lock.mdb"):
        assert mode(data / "l2" / name) == 0o600, name
    assert "other users may read" not in server.log()


def test_an_open_data_dir_is_kept_with_one_warning(
        umask_022: None, open_dir: Path, server_factory: type[ServerProcess]) -> None:
    data = open_dir / "operator-made"
    data.mkdir(mode=0o755)
    server = server_factory("--data-dir", str(data), unix=False).start()
    put_local(server)
    assert mode(data) == 0o755  # the operator's choice: not changed behind their back
    assert mode(data / "l2" / "data.mdb") == 0o600
    warnings = [line for line in server.log().splitlines() if "other users may read" in line]
    assert len(warnings) == 1 and f"data_dir {data} is mode 0755" in warnings[0], server.log()
