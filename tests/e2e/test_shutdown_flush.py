"""A SIGTERM flushes the blocks only in memory to L2; when the disk cannot take
them all, the server keeps those that fit and says, in its log and its exit
status, that the others are lost (a supervisor sees a failed stop)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from serverproc import ServerProcess

from kvstore import Client

MiB = 1024**2


def block(i: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return (seed * (MiB // 32))[:MiB]


def test_a_flush_the_disk_cannot_take_keeps_what_fits_and_fails_the_stop(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    ready = tmp_path / "ready.json"
    log = tmp_path / "server.log"
    # A 16 MiB file-size limit (ulimit -f, in KiB) stands in for a full disk:
    # LMDB's commits past it fail as on a disk with no room left.
    cmd = ["sh", "-c", 'ulimit -f 16384 && exec "$@"', "sh",
           sys.executable, "-m", "kvstore", "serve", "--data-dir", str(data),
           "--server-listen", "127.0.0.1:0", "--server-unix-socket", "",
           "--l1-capacity", "96MiB", "--l1-prefault", "false", "--ready-file", str(ready)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "KVSTORE_LOG_LEVEL": "INFO"})
        try:
            deadline = time.monotonic() + 60
            while not ready.exists():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.02)  # a bounded poll on the ready file
            target = json.loads(ready.read_text())["tcp"]
            with Client(target, namespace="f") as c:
                for i in range(40):
                    c.put({f"b{i}".encode(): block(i)}, ack="memory")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(120) == 1, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    text = log.read_text()
    assert "could not be written to L2" in text and "are lost" in text, text
    assert "bytes free on its disk" in text, text

    # Without the limit: what fitted is there, byte for byte; nothing is damaged.
    with ServerProcess(data, unix=False) as server, Client(server.tcp, namespace="f") as c:
        got = c.get([f"b{i}".encode() for i in range(40)])
    kept = [i for i, g in enumerate(got) if g is not None]
    assert all(got[i] == block(i) for i in kept)
    # (LMDB needs room for its copy-on-write pages too: about half the disk)
    assert len(kept) >= 4, f"only {len(kept)} of 40 blocks kept on a 16 MiB disk"
