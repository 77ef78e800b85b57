"""The README's SDK example runs as written against a real server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_sdk_example_runs(shared_server) -> None:  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    env = {**os.environ, "KVSTORE_TARGET": shared_server.tcp}
    out = subprocess.run([sys.executable, "-c", blocks[0]], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usable prefix: 2 blocks" in out.stdout
