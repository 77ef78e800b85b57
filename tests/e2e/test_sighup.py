"""SIGHUP never kills a server: with auth.tokens_file it rereads the grants,
without one it says there is nothing to reload and carries on; and it is
handled from early in the start-up (its default action would kill a server
halfway through its index rebuild)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from serverproc import ServerProcess

from kvstore import Client

#: SIGHUP's bit in the masks of /proc/PID/status (signal n is bit n - 1).
HUP_BIT = 1 << (signal.SIGHUP - 1)


def hup_disposition_set(pid: int) -> bool:
    """Whether the process ignores or catches SIGHUP (no longer dies of it)."""
    with open(f"/proc/{pid}/status") as fh:
        masks = dict(line.split(":", 1) for line in fh if line.startswith(("SigIgn", "SigCgt")))
    return any(int(v, 16) & HUP_BIT for v in masks.values())


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.01)  # a bounded poll, not synchronisation by sleep


def test_sighup_without_a_tokens_file_is_logged_and_the_server_carries_on(
        server_factory: type[ServerProcess]) -> None:
    server = server_factory(env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    with Client(server.tcp, namespace="hup") as client:
        client.put({b"before": b"memory-level"})  # ack=memory: only the SIGTERM flush saves it
        os.kill(server.pid, signal.SIGHUP)
        wait_for(lambda: "nothing to reload" in server.log() or not server.alive(),
                 "'nothing to reload' line")
        assert server.alive(), server.log()
        client.put({b"after": b"still serving"})
    assert server.terminate() == 0
    assert "flushing L2" in server.log()
    server.start()
    with Client(server.tcp, namespace="hup") as client:
        assert client.get([b"before", b"after"]) == [b"memory-level", b"still serving"]


def test_sighup_during_start_up_does_not_kill_the_server(tmp_path: Path) -> None:
    """The handler is in long before the server is ready: a SIGHUP sent as soon
    as it is (here while the store is still starting) leaves it starting."""
    ready = tmp_path / "ready.json"
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "data"),
         "--server-listen", "127.0.0.1:0", "--l1-capacity", "64MiB", "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "KVSTORE_LOG_LEVEL": "INFO"})
    log.close()
    try:
        wait_for(lambda: hup_disposition_set(proc.pid) or ready.exists() or
                 proc.poll() is not None, "SIGHUP handler")
        assert not ready.exists(), "SIGHUP was not handled until the server was ready"
        os.kill(proc.pid, signal.SIGHUP)
        wait_for(lambda: ready.exists() or proc.poll() is not None, "ready file")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sighup_says_which_edits_of_the_config_file_wait_for_a_restart(
        server_factory: type[ServerProcess], tmp_path: Path) -> None:
    """Found by a review: an edit of the config file (server.namespaces,
    another tokens_file) and a SIGHUP were ignored without a word; the
    operator believed them applied."""
    conf = tmp_path / "kvstore.toml"
    conf.write_text("[server]\nnamespaces = [\"a\", \"b\"]\n")
    server = server_factory("--config", str(conf), env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    conf.write_text("[server]\nnamespaces = [\"a\"]\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: "SIGHUP: the configuration changed" in server.log(), "warning")
    assert "server.namespaces" in server.log()
    with Client(server.tcp, namespace="b") as client:  # not applied: b is still served
        assert client.put({b"k": b"v"}).stored == 1
    conf.write_text("[server]\nnamespaces = 7\n")
    os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: "the configuration no longer loads" in server.log(), "warning")
    assert server.alive()
