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
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client


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
        "pip install 'kvstore[l3]'\n"
    )
