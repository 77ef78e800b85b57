"""The L2 layout marker: what an environment records of the release that
wrote it, and a refusal of one that needs a newer release to be read
safely (a release that ignored newer records served deleted blocks and
deleted acknowledged ones: docs/reliability.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import lmdb
import pytest

import kvstore
from kvstore.errors import InvalidConfig
from kvstore.tiers import lmdb_tier
from kvstore.tiers.lmdb_tier import LMDBTier

ROOT = Path(__file__).resolve().parents[2]


def marker(path: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    try:
        db = env.open_db(b"kvstore")
        with env.begin(db=db) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor().iternext()}
    finally:
        env.close()


def set_marker(path: Path, **fields: str) -> None:
    env = lmdb.open(str(path), max_dbs=8, subdir=True)
    try:
        db = env.open_db(b"kvstore")
        with env.begin(db=db, write=True) as txn:
            for key, value in fields.items():
                txn.put(key.encode(), value.encode())
    finally:
        env.close()


def open_tier(path: Path, recover: bool = False) -> LMDBTier:
    return LMDBTier(path, capacity=1 << 30, initial_map_size=1 << 20, recover=recover)


def test_the_package_and_pyproject_name_one_release() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == kvstore.__version__


def test_an_environment_records_its_layout_and_writer(tmp_path: Path) -> None:
    open_tier(tmp_path / "l2").close_sync()
    fields = marker(tmp_path / "l2")
    instance = fields.pop(b"instance")  # the environment's id (the data dir's l2.state)
    assert len(instance) == 32 and int(instance, 16) >= 0
    assert fields == {
        b"format": str(lmdb_tier.FORMAT).encode(),
        b"readable_by": str(lmdb_tier.READABLE_BY).encode(),
        b"written_by": f"kvstore {kvstore.__version__}".encode()}
    open_tier(tmp_path / "l2").close_sync()
    assert marker(tmp_path / "l2")[b"instance"] == instance  # kept across opens


def test_an_environment_without_a_marker_opens_and_gets_one(tmp_path: Path) -> None:
    """What the releases before the marker wrote: read as before."""
    env = lmdb.open(str(tmp_path / "l2"), max_dbs=4, subdir=True)
    for name in (b"data", b"meta", b"l3gone"):
        env.open_db(name)
    env.close()
    open_tier(tmp_path / "l2").close_sync()
    assert marker(tmp_path / "l2")[b"format"] == str(lmdb_tier.FORMAT).encode()


@pytest.mark.parametrize("recover", [False, True])
def test_a_layout_for_a_newer_release_is_refused_and_left_alone(
        tmp_path: Path, recover: bool) -> None:
    path = tmp_path / "l2"
    open_tier(path).close_sync()
    set_marker(path, format="9", readable_by=str(lmdb_tier.FORMAT + 1),
               written_by="kvstore 9.0.0")
    with pytest.raises(InvalidConfig) as refused:
        open_tier(path, recover=recover)
    message = str(refused.value)
    for part in (str(path), "kvstore 9.0.0", f"kvstore {kvstore.__version__}",
                 f"reads up to {lmdb_tier.FORMAT}"):
        assert part in message, (part, message)
    # not damage: never moved aside (l2.recover), and its marker is untouched
    assert path.exists() and not list(tmp_path.glob("l2.damaged-*"))
    assert marker(path)[b"written_by"] == b"kvstore 9.0.0"


def test_a_newer_layout_a_release_may_read_is_opened_and_kept(tmp_path: Path) -> None:
    """Additions a newer release declares readable by this one: opened, and
    its marker is not lowered."""
    path = tmp_path / "l2"
    open_tier(path).close_sync()
    set_marker(path, format=str(lmdb_tier.FORMAT + 1), readable_by=str(lmdb_tier.FORMAT),
               written_by="kvstore 9.0.0")
    open_tier(path).close_sync()
    assert marker(path)[b"format"] == str(lmdb_tier.FORMAT + 1).encode()


def test_a_tiny_initial_map_opens_a_fresh_environment(tmp_path: Path) -> None:
    """l2.initial_map_size 16 KiB on a fresh data dir: LMDB could not create
    its databases in the map (MDB_MAP_FULL), the server called the new file
    damaged, and l2.recover moved it aside. It counts as 1 MiB now."""
    tier = LMDBTier(tmp_path / "l2", capacity=1 << 30, initial_map_size=16 << 10)
    assert tier.usage().blocks == 0
    tier.close_sync()
    assert not list(tmp_path.glob("l2.damaged-*"))
