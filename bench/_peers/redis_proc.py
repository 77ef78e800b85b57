"""Find (or install) Redis and redis-py, and run a private redis-server.

``ensure_redis_server`` looks for ``redis-server`` on PATH (and /usr/bin);
when it is missing and we run as root with apt-get available and installing
is allowed, it runs ``apt-get install -y redis-server`` (Debian's Redis 7).
``ensure_redis_py`` imports redis-py or pip-installs ``redis`` and ``hiredis``
into the running interpreter's environment. Each returns a note saying what it
found, did or skipped; the caller reports the notes.
"""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _which_redis() -> str | None:
    return shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else None)


def ensure_redis_server(allow_install: bool) -> tuple[str | None, str]:
    path = _which_redis()
    if path:
        return path, f"redis-server found at {path}"
    if not allow_install:
        return None, "redis-server not found and installing is off (--no-install): Redis skipped"
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, ("redis-server not found and not running as root, so not installing it "
                      "(apt-get install redis-server): Redis skipped")
    if not shutil.which("apt-get"):
        return None, "redis-server not found and no apt-get here: Redis skipped"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print("peers: redis-server missing; running apt-get install -y redis-server ...",
          file=sys.stderr, flush=True)
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "redis-server"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:  # stale package lists: update once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    path = _which_redis()
    if r.returncode != 0 or not path:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        return None, f"apt-get install redis-server failed ({r.returncode}): {' | '.join(tail)}"
    return path, f"redis-server was missing: installed it with apt-get ({path})"


def ensure_redis_py(allow_install: bool) -> tuple[bool, str]:
    try:
        redis = importlib.import_module("redis")
    except ImportError:
        if not allow_install:
            return False, "redis-py not installed and installing is off: Redis skipped"
        print("peers: redis-py missing; pip-installing redis and hiredis into "
              f"{sys.prefix} ...", file=sys.stderr, flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "redis", "hiredis"],
                           capture_output=True, text=True)
        importlib.invalidate_caches()
        try:
            redis = importlib.import_module("redis")
        except ImportError:
            tail = (r.stderr or r.stdout).strip().splitlines()[-2:]
            return False, f"pip install redis failed: {' | '.join(tail)}: Redis skipped"
        note = f"redis-py was missing: pip-installed redis {redis.__version__} (+hiredis)"
    else:
        note = f"redis-py {redis.__version__} found"
    try:
        import hiredis  # noqa: F401

        note += ", hiredis parser"
    except ImportError:
        note += ", pure-Python parser (hiredis not installed)"
    return True, note


def redis_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith("v="):
            return part[2:]
    return out.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on 127.0.0.1:<ephemeral> and a unix socket."""

    def __init__(self, path: str, workdir: Path, maxmemory: str = "4gb") -> None:
        self.path = path
        self.workdir = Path(workdir)
        self.maxmemory = maxmemory
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.unix = str(self.workdir / "redis.sock")
        self.command: list[str] = []

    def start(self, timeout: float = 20.0) -> RedisServer:
        import redis

        self.workdir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _ in range(3):  # the ephemeral port may be taken between probe and bind
            self.port = _free_port()
            self.command = [
                self.path, "--port", str(self.port), "--bind", "127.0.0.1",
                "--unixsocket", self.unix, "--unixsocketperm", "700",
                "--save", "", "--appendonly", "no", "--protected-mode", "no",
                "--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction",
                "--dir", str(self.workdir), "--daemonize", "no", "--logfile", "",
            ]
            log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping()
                    return self
                except redis.exceptions.ConnectionError:
                    time.sleep(0.02)  # polling with a deadline
            last = (self.workdir / "redis.log").read_text(errors="replace")[-800:]
            self.stop()
        raise RuntimeError(f"redis-server did not start:\n{last}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
