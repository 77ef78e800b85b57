"""A process limit met while L2 opens (open files, memory) is said as such and
never taken for damage: with l2.recover a sound L2 was moved aside and its
blocks were gone at the next start. And the server refuses, in one line, an
open-file limit too low to start, after raising its soft limit to the hard one."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import lmdb
import pytest

from kvstore.errors import InvalidConfig
from kvstore.tiers import lmdb_tier
from kvstore.tiers.lmdb_tier import LMDBTier


@pytest.mark.parametrize("failure", [
    lmdb.Error("/x/l2: Too many open files"),
    lmdb.MemoryError("/x/l2: Cannot allocate memory"),
    OSError(errno.EMFILE, os.strerror(errno.EMFILE)),
])
def test_a_limit_met_at_open_is_not_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           failure: BaseException) -> None:
    path = tmp_path / "l2"
    asyncio.run(LMDBTier(path, capacity=1 << 30, initial_map_size=1 << 20).close())

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise failure

    monkeypatch.setattr(lmdb_tier.lmdb, "open", refuse)
    with pytest.raises(InvalidConfig, match=r"cannot be opened: .*not damage"):
        LMDBTier(path, capacity=1 << 30, initial_map_size=1 << 20, recover=True)
    assert path.is_dir()
    assert not list(tmp_path.glob("l2.damaged-*"))  # left where it is


def test_real_damage_is_still_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l2"
    asyncio.run(LMDBTier(path, capacity=1 << 30, initial_map_size=1 << 20).close())
    calls = []

    def corrupt_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            raise lmdb.CorruptedError("mdb_env_open: MDB_CORRUPTED")
        return real_open(*args, **kwargs)

    real_open = lmdb.open
    monkeypatch.setattr(lmdb_tier.lmdb, "open", corrupt_once)
    tier = LMDBTier(path, capacity=1 << 30, initial_map_size=1 << 20, recover=True)
    asyncio.run(tier.close())
    assert len(list(tmp_path.glob("l2.damaged-*"))) == 1  # moved aside, as before


def test_an_open_file_limit_too_low_is_refused_in_one_line(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    out = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path),
         "--server-listen", "127.0.0.1:0", "--l1-capacity", "16MiB", "--l1-prefault", "false"],
        capture_output=True, text=True, timeout=60, preexec_fn=low_limit,
        env={**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "limit on open files is 40" in lines[0], out.stderr


def test_the_soft_open_file_limit_is_raised_to_the_hard_one() -> None:
    from kvstore.server.preflight import check_open_files

    code = ("import resource; from kvstore.server.preflight import check_open_files; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200)); "
            "print(check_open_files(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["200", "200"], out.stderr
    assert check_open_files() >= 64  # (this process: already fine)
