"""Mooncake Store as a peer: a private master and one memory-holding node.

Mooncake's non-CUDA wheel (``mooncake-transfer-engine-non-cuda``) goes into
a separate virtual environment (its pins are not kvstore's):

    python3 -m venv /tmp/mooncake-venv
    /tmp/mooncake-venv/bin/pip install mooncake-transfer-engine-non-cuda
    apt-get install libibverbs1 librdmacm1 libnuma1   # its binaries link them

``find_mooncake`` checks that venv (same Python version as the bench, so the
workers can import its ``mooncake.store`` by path). ``MooncakeCluster``
starts ``mooncake_master`` on a free port and a holder process that mounts
the store's memory segment (``global_segment_size``); the bench's clients
mount none, so every byte crosses the TCP transport to the holder, as for an
engine on another host.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

_HOLDER = """
import sys
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", "P2PHANDSHAKE", int(sys.argv[2]), 16 * 1024 * 1024, "tcp", "",
             sys.argv[1])
print("ready" if rc == 0 else f"setup failed: {rc}", flush=True)
sys.stdin.read()
"""


def find_mooncake(venv: str) -> tuple[str | None, str]:
    """The site-packages holding ``mooncake`` in ``venv``, and a note."""
    if not venv:
        return None, "Mooncake skipped (no --mooncake-venv)"
    here = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = Path(venv) / "lib" / here / "site-packages"
    if not (site / "mooncake" / "store.so").exists() and \
            not any((site / "mooncake").glob("store*.so")):
        return None, (f"Mooncake skipped: no mooncake/store*.so under {site} (pip install "
                      f"mooncake-transfer-engine-non-cuda into a {here} venv)")
    probe = subprocess.run([str(Path(venv) / "bin" / "python"), "-c",
                            "import mooncake.store"], capture_output=True, text=True,
                           timeout=60)
    if probe.returncode:
        return None, f"Mooncake skipped: importing mooncake.store failed: " \
                     f"{probe.stderr.strip().splitlines()[-1:]}"
    return str(site), f"Mooncake Store from {site}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MooncakeCluster:
    def __init__(self, venv: str, site: str, work: Path, segment_bytes: int) -> None:
        self.venv = Path(venv)
        self.site = site
        self.work = work
        self.segment_bytes = segment_bytes
        self.master_addr = ""
        self._master: subprocess.Popen[bytes] | None = None
        self._holder: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int:
        """The holder's pid (the process whose memory serves the Gets)."""
        assert self._holder is not None
        return self._holder.pid

    def start(self, timeout: float = 60.0) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        port = _free_port()
        master = Path(self.site) / "mooncake" / "mooncake_master"
        with open(self.work / "master.log", "wb") as log:
            self._master = subprocess.Popen(
                [str(master), f"--port={port}", "--enable_http_metadata_server=false",
                 f"--metrics_port={_free_port()}"], stdout=log, stderr=subprocess.STDOUT)
        self.master_addr = f"127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if self._master.poll() is not None:
                    raise RuntimeError(
                        f"mooncake_master exited; see {self.work}/master.log") from None
                time.sleep(0.1)
        with open(self.work / "holder.log", "wb") as log:
            self._holder = subprocess.Popen(
                [str(self.venv / "bin" / "python"), "-c", _HOLDER, self.master_addr,
                 str(self.segment_bytes)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self._holder.stdout is not None
        line = self._holder.stdout.readline().strip()
        if line != "ready":
            self.stop()
            raise RuntimeError(f"Mooncake holder: {line or 'exited'}; see {self.work}")

    def stop(self) -> None:
        for proc in (self._holder, self._master):
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._holder = self._master = None
