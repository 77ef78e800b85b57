"""A real kvstore server in a subprocess, for end-to-end tests and benches.

The server is started with ``--ready-file``: it writes the addresses it bound
(TCP port 0 becomes an ephemeral port) once it is serving, so waiting for it
is a bounded poll on that file, never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class ServerFailed(RuntimeError):
    pass


class ServerProcess:
    def __init__(self, data_dir: Path, *flags: str, unix: bool = True,
                 l1_capacity: str = "128MiB", env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.flags = list(flags)
        self.unix_enabled = unix
        self.l1_capacity = l1_capacity
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcp: str = ""
        self.unix: str = ""
        self.log_path = self.data_dir / "server.log"
        self._run = 0

    @property
    def unix_target(self) -> str:
        return f"unix:{self.unix}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        self._run += 1
        ready = self.data_dir / f"ready-{self._run}.json"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable, "-m", "kvstore", "serve",
            "--data-dir", str(self.data_dir),
            "--server-listen", "127.0.0.1:0",
            "--l1-capacity", self.l1_capacity,
            "--l1-prefault", "false",
            "--ready-file", str(ready),
        ]
        if self.unix_enabled:
            cmd += ["--server-unix-socket", str(self.data_dir / "kvstore.sock")]
        cmd += self.flags
        level = os.environ.get("KVSTORE_TEST_LOG_LEVEL", "WARNING")
        env = {**os.environ, "KVSTORE_LOG_LEVEL": level, **self.env}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServerFailed(f"server not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.02)  # polling a file with a deadline, not synchronisation by sleep
        info = json.loads(ready.read_text())
        self.tcp = info["tcp"]
        self.unix = info["unix"] or ""
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise ServerFailed("no VmRSS")

    def metric(self, name: str) -> float | None:
        """One unlabelled sample of the server's Prometheus endpoint (started
        with ``--server-metrics-listen``); None when it does not export it."""
        return self.metrics(name)[name]

    def exported(self, name: str) -> float:
        """:meth:`metric`, for a sample the server must export."""
        value = self.metric(name)
        if value is None:
            raise AssertionError(f"the server exports no {name}")
        return value

    def metrics(self, *names: str) -> dict[str, float | None]:
        """Unlabelled samples read from one scrape (two scrapes apart would see
        the requests made between them, the scrape itself among them)."""
        ready = max(self.data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
        address = json.loads(ready.read_text())["metrics"]
        found: dict[str, float | None] = dict.fromkeys(names)
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                name, _, rest = line.partition(" ")
                if name in found and found[name] is None:
                    found[name] = float(rest.split()[0])
        return found

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: in-flight calls finish, L2 is flushed."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise ServerFailed(f"server ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._remove_shm()

    def _remove_shm(self) -> None:
        """A killed server cannot remove its shared-memory arena: do it here
        (the file would otherwise hold its size in /dev/shm)."""
        flags = self.flags
        for i, flag in enumerate(flags[:-1]):
            if flag == "--l1-shm-path" and flags[i + 1].startswith("/dev/shm/"):
                Path(flags[i + 1]).unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.kill()
