"""obstore is the optional ``l3`` extra: without it the server serves with L3
off, and a configuration that asks for L3 fails at start with one clear line.

The child processes see an ``obstore`` that fails to import the way a missing
module does (a stand-in package first on PYTHONPATH), so these run in the dev
venv, where obstore is installed. `.ci/package-smoke.sh` checks the same on a
real install without the extra.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client

#: What the refusal tells the user to install: obstore at the pin of kvstore's
#: l3 extra, never ``kvstore[l3]`` (on PyPI ``kvstore`` is another project).
[OBSTORE] = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
                          )["project"]["optional-dependencies"]["l3"]
INSTALL = f"pip install '{OBSTORE}' (kvstore's l3 extra)"


@pytest.fixture
def no_obstore(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "no-obstore"
    (blocker / "obstore").mkdir(parents=True)
    (blocker / "obstore" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'obstore'\", name='obstore')\n"
    )
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def test_serves_without_obstore_when_l3_is_off(tmp_path: Path, no_obstore: dict[str, str]
                                               ) -> None:
    with ServerProcess(tmp_path / "data", l1_capacity="16MiB", env=no_obstore) as server:
        with Client(server.unix_target, namespace="no-l3") as kv:
            kv.put([(b"k", b"block bytes")], ack="local")
            assert kv.get([b"k"]) == [b"block bytes"]
        assert server.terminate() == 0


def test_l3_configured_without_obstore_is_one_clear_error(tmp_path: Path,
                                                          no_obstore: dict[str, str]) -> None:
    url = f"file://{tmp_path / 'l3'}"
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "data"),
         "--server-listen", "", "--server-unix-socket", str(tmp_path / "kv.sock"),
         "--l1-capacity", "16MiB", "--l1-prefault", "false", "--l3-url", url],
        env={**os.environ, **no_obstore}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        f"kvstore: cannot start: L3 is configured (l3.url={url}) but obstore is not installed: "
        f"{INSTALL}\n"
    )


def test_l3_without_obstore_is_refused_before_the_arena_is_made(tmp_path: Path) -> None:
    """The refusal comes from the configuration's checks, before the server
    makes anything: no L1 arena file is left in /dev/shm (it was, after
    every such start), no data directory made. obstore's import is blocked
    in-process here (``sys.modules['obstore'] = None``), as a missing module."""
    arena = tmp_path / "arena"
    data = tmp_path / "data"
    code = ("import sys; sys.modules['obstore'] = None; "
            "from kvstore.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run(
        [sys.executable, "-c", code, "serve", "--data-dir", str(data),
         "--server-listen", "127.0.0.1:0", "--l1-capacity", "32MiB", "--l1-prefault", "false",
         "--l1-shm-path", str(arena), "--l3-url", "s3://x/y"],
        env={**os.environ, "KVSTORE_LOG_LEVEL": "WARNING"}, capture_output=True, text=True,
        timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("kvstore: cannot start: L3 is configured (l3.url=s3://x/y) but "
                           f"obstore is not installed: {INSTALL}\n")
    assert not arena.exists()
    assert not data.exists()


def test_config_effective_refuses_l3_without_obstore(no_obstore: dict[str, str]) -> None:
    """``kvstore config --effective`` refuses what serve would (it printed the
    configuration and exited 0)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kvstore", "config", "--effective", "--l3-url", "s3://b/p"],
        env={**os.environ, **no_obstore}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout == ""
    assert proc.stderr == ("kvstore: L3 is configured (l3.url=s3://b/p) but obstore is not "
                           f"installed: {INSTALL}\n")
    with_l3_off = subprocess.run([sys.executable, "-m", "kvstore", "config", "--effective"],
                                 env={**os.environ, **no_obstore}, capture_output=True,
                                 text=True, timeout=60)
    assert with_l3_off.returncode == 0, with_l3_off.stderr


def test_the_object_tier_says_the_same_without_obstore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tier's own check (an ObjectTier made without the configuration's
    validation) names the same package, not ``kvstore[l3]``."""
    from kvstore.config import L3Config
    from kvstore.errors import InvalidConfig
    from kvstore.tiers import object as object_tier

    monkeypatch.setattr(object_tier, "obstore", None)
    with pytest.raises(InvalidConfig) as info:
        object_tier.ObjectTier.from_config(L3Config(url="s3://b/p"))
    assert str(info.value) == ("L3 is configured (l3.url=s3://b/p) but obstore is not "
                               f"installed: {INSTALL}")
