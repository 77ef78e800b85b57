"""Start a kvstore server subprocess for a benchmark and wait until it listens.

The server writes ``{"tcp": "127.0.0.1:PORT", "unix": path or null, "pid": N}``
to its ``--ready-file`` once it serves; waiting is a bounded poll on that file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


class BenchServerError(RuntimeError):
    pass


class BenchServer:
    """``with BenchServer(l1_capacity="1GiB") as s: Client(s.tcp)``."""

    def __init__(self, *flags: str, l1_capacity: str = "1GiB", l2: bool = False,
                 unix: bool = False, data_dir: str | None = None) -> None:
        self.flags = list(flags)
        self.l1_capacity = l1_capacity
        self.l2 = l2
        self.unix_enabled = unix
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcp = ""
        self.unix = ""
        self.command: list[str] = []

    @property
    def unix_target(self) -> str:
        return f"unix:{self.unix}"

    def start(self, timeout: float = 60.0) -> BenchServer:
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kvstore-bench-")
            self.data_dir = self._tmp.name
        data = Path(self.data_dir)
        ready = data / "ready.json"
        ready.unlink(missing_ok=True)
        self.command = [
            sys.executable, "-m", "kvstore", "serve",
            "--server-listen", "127.0.0.1:0",
            "--ready-file", str(ready),
            "--data-dir", str(data),
            "--l1-capacity", self.l1_capacity,
            "--l2-enabled", "true" if self.l2 else "false",
        ]
        if self.unix_enabled:
            self.command += ["--server-unix-socket", str(data / "kvstore.sock")]
        self.command += self.flags
        self.log_path = data / "server.log"
        env = {**os.environ, "KVSTORE_LOG_LEVEL": os.environ.get("KVSTORE_LOG_LEVEL", "WARNING")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         env=env)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise BenchServerError(
                    f"server exited with status {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise BenchServerError(f"server not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        info: dict[str, Any] = json.loads(ready.read_text())
        self.tcp = info["tcp"] or ""
        self.unix = info.get("unix") or ""
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except (AttributeError, FileNotFoundError):
            return ""

    def rss_bytes(self, field: str = "VmRSS") -> int:
        """Resident memory from /proc/PID/status: VmRSS (all), RssAnon (the
        process's own memory) or RssFile (mapped file pages, e.g. LMDB's)."""
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> BenchServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_from_tree(tree: str, *flags: str, **kwargs: Any) -> BenchServer:
    """A started BenchServer whose code comes from ``tree``, an older checkout
    ("" = this one): the same-run baseline of ``--before-tree`` benchmarks."""
    env_before, cwd = os.environ.get("PYTHONPATH"), os.getcwd()
    if tree:
        # `python -m kvstore` imports from its working directory first.
        os.environ["PYTHONPATH"] = str(Path(tree).resolve())
        os.chdir(tree)
    try:
        return BenchServer(*flags, **kwargs).start()
    finally:
        if tree:
            os.chdir(cwd)
            if env_before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = env_before
