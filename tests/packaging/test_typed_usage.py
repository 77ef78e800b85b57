"""The SDK's type hints accept what the README documents (an SDK review ran
``mypy --strict`` on README-style code: memoryview and bytearray keys, a
2-D array for get_into and a numpy timeout were rejected). A user's program,
checked with the project's mypy; errors in kvstore's own modules (checked
from source here, without grpc's stubs) are not this test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

USER_PROGRAM = '''
from __future__ import annotations

import numpy as np

from kvstore import AsyncClient, Client


def sync_use() -> None:
    with Client("127.0.0.1:50051", namespace="chat", timeout=np.float32(2.0)) as kv:
        kv.put({memoryview(b"k"): b"v"})
        kv.put({bytearray(b"k2"): np.zeros(8, np.uint8)})
        kv.put([(b"k3", bytearray(8)), (memoryview(b"k4"), memoryview(b"v"))])
        got = kv.get([memoryview(b"k1"), bytearray(b"k2"), b"k3"])
        assert got[0] is None or isinstance(got[0], bytes)
        sizes = kv.get_into([b"k1", b"k2"], np.zeros((2, 8), np.uint8))
        kv.get_into([b"k1"], [bytearray(8)])
        print(sizes, kv.lookup([memoryview(b"k1")]).found, kv.delete([bytearray(b"k1")]))


async def async_use() -> None:
    async with AsyncClient("127.0.0.1:50051", namespace="chat", timeout=3) as kv:
        await kv.put({memoryview(b"k"): b"v"})
        await kv.get_into([bytearray(b"k")], np.zeros((1, 8), np.uint8))
'''


def test_readme_style_calls_type_check(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text(USER_PROGRAM)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / ".cache"),
         "--no-error-summary", "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"MYPYPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    mine = [line for line in result.stdout.splitlines()
            if line.startswith(("user.py:", str(user)))]
    assert not mine, "\n".join(mine)
    assert "error" not in result.stderr.lower(), result.stderr
