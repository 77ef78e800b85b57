"""``kvstore serve`` says in one line what it is, and in one line why it
cannot start: each configuration or environment failure exits non-zero with a
single line on stderr naming the option and the problem, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvstore import Client


def serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``kvstore serve`` that is expected to refuse to start."""
    cmd = [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "data"),
           "--server-listen", "127.0.0.1:0", "--server-unix-socket", "",
           "--l1-capacity", "8MiB", "--l1-prefault", "false", *flags]
    env = {**os.environ, "KVSTORE_LOG_LEVEL": "INFO"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def test_port_in_use(tmp_path: Path, busy_port: int) -> None:
    result = serve(tmp_path, "--server-listen", f"127.0.0.1:{busy_port}")
    assert_one_clear_line(result, "server.listen", str(busy_port), "in use")


@pytest.mark.parametrize("option", ["--server-data-plane-listen", "--server-metrics-listen"])
def test_a_taken_data_plane_or_metrics_port_is_refused_before_the_data_dir_is_made(
        tmp_path: Path, busy_port: int, option: str) -> None:
    """They were found taken only once the data dir, L1 and the index
    rebuild were done (a crash loop paid for each)."""
    result = serve(tmp_path, option, f"127.0.0.1:{busy_port}")
    assert_one_clear_line(result, option[2:].replace("-", "_").replace("server_", "server."),
                          str(busy_port), "in use")
    assert not (tmp_path / "data").exists()


def test_a_data_dir_that_is_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("")
    assert_one_clear_line(serve(tmp_path), f"data_dir {tmp_path / 'data'} is not a directory")


def test_unwritable_data_dir(tmp_path: Path) -> None:
    # A path under a regular file cannot be created, by root either.
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"
    result = serve(tmp_path, "--data-dir", str(data_dir))
    assert_one_clear_line(result, f"data_dir {data_dir}: cannot create or write")


def test_unix_socket_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("s" * 120) / "kvstore.sock"
    result = serve(tmp_path, "--server-unix-socket", str(path))
    assert_one_clear_line(result, "server.unix_socket", "107 bytes")


def test_unix_socket_in_a_path_that_cannot_be_a_directory(tmp_path: Path) -> None:
    # Found only when binding, after the store opened: it is closed again.
    (tmp_path / "a-file").write_text("")
    result = serve(tmp_path, "--server-unix-socket", str(tmp_path / "a-file" / "kvstore.sock"))
    assert_one_clear_line(result, "server.unix_socket", "a-file")


def test_unknown_log_format(tmp_path: Path) -> None:
    assert_one_clear_line(serve(tmp_path, "--log-format", "yaml"), "log_format")


def test_a_tokens_file_that_grants_nothing(tmp_path: Path) -> None:
    """An operator review: an empty (or all-comment) tokens file started a
    server that refused every call, the admin's too, with health SERVING."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# every line commented out\n")
    result = serve(tmp_path, "--auth-tokens-file", str(tokens))
    assert result.returncode == 2
    assert_one_clear_line(result, "auth.tokens_file", "grants nothing")


# ---------------------------------------------------------------------------- TLS


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="openssl is not installed")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two self-signed certificates with their keys: a.pem/a.key, b.pem/b.key."""
    d = tmp_path_factory.mktemp("pairs")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj",
                        f"/CN={name}"], cwd=d, check=True, capture_output=True, timeout=60)
    (d / "garbage.pem").write_text("this is not a certificate\n")
    return d


@needs_openssl
def test_unreadable_certificate(tmp_path: Path, pairs: Path) -> None:
    result = serve(tmp_path, "--server-tls-cert", str(pairs / "garbage.pem"),
                   "--server-tls-key", str(pairs / "a.key"))
    assert_one_clear_line(result, "server.tls_cert", "garbage.pem", "no PEM certificate")


@needs_openssl
def test_unreadable_key(tmp_path: Path, pairs: Path) -> None:
    result = serve(tmp_path, "--server-tls-cert", str(pairs / "a.pem"),
                   "--server-tls-key", str(pairs / "garbage.pem"))
    assert_one_clear_line(result, "server.tls_key", "garbage.pem", "private key")


@needs_openssl
def test_key_not_matching_its_certificate(tmp_path: Path, pairs: Path) -> None:
    result = serve(tmp_path, "--server-tls-cert", str(pairs / "a.pem"),
                   "--server-tls-key", str(pairs / "b.key"))
    assert_one_clear_line(result, "server.tls_key", "b.key", "does not belong", "a.pem")


@needs_openssl
def test_unreadable_client_ca(tmp_path: Path, pairs: Path) -> None:
    result = serve(tmp_path, "--server-tls-cert", str(pairs / "a.pem"),
                   "--server-tls-key", str(pairs / "a.key"),
                   "--server-tls-client-ca", str(pairs / "garbage.pem"))
    assert_one_clear_line(result, "server.tls_client_ca", "garbage.pem")


# ------------------------------------------------------------------ start-up summary


def test_one_start_up_summary_line(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    with Client(server.tcp, namespace="sum") as c:
        c.stats()  # serving
    lines = [line for line in server.log().splitlines() if " serving on " in line]
    assert len(lines) == 1, server.log()
    line = lines[0]
    for part in (f"tcp {server.tcp}", f"unix {server.unix}",
                 "L1 128 MiB (anonymous: reads not checked again)",
                 f"L2 8 GiB in {server.data_dir / 'l2'}", "L3 none", "policy session",
                 f"data dir {server.data_dir}"):
        assert part in line, (part, line)
    assert line.split(" serving on ")[0].split()[-1] not in ("", "kvstore")  # the version


def test_json_log_lines(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("--log-format", "json", "--policy-name", "sieve",
                            env={"KVSTORE_LOG_LEVEL": "INFO"}).start()
    assert server.terminate() == 0
    records = [json.loads(line) for line in server.log_path.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(records[0])
    [summary] = [r for r in records if " serving on " in r["message"]]
    assert summary["level"] == "INFO"
    assert summary["tcp"] == server.tcp and summary["unix"] == server.unix
    assert summary["policy"] == "sieve" and summary["l3_url"] is None
    assert summary["l1_capacity"] == 128 * 1024**2
    assert summary["l1_reads_checked"] is False  # an anonymous arena (l1.verify_reads)
    assert any(r["message"] == "stopped" for r in records)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_passwords_in_urls_never_reach_the_log(server_factory, log_format: str) -> None:  # type: ignore[no-untyped-def]
    """A user:password@ written into l3.endpoint is redacted in every log line
    (the L3 listing's warning printed it, through the object store's own
    error text), as `config --effective` redacts it; one in l3.url is refused
    (test_config_cli). The start-up line names the metrics address, and
    the ready file is removed when the server stops (it outlived it)."""
    pytest.importorskip("obstore")
    server = server_factory(
        "--log-format", log_format, "--l3-url", "s3://bucket/pre",
        "--l3-endpoint", "http://epuser:EndPw777@127.0.0.1:9", "--l3-timeout-s", "1",
        "--l3-retries", "0", "--server-metrics-listen", "127.0.0.1:0",
        env={"KVSTORE_LOG_LEVEL": "INFO", "KVSTORE_L3_ACCESS_KEY_ID": "test",
             "KVSTORE_L3_SECRET_ACCESS_KEY": "test"}).start()  # (keys: no metadata service)
    ready = max(server.data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(ready.read_text())["metrics"]
    deadline = time.monotonic() + 30
    while "L3 listing failed" not in server.log():  # the warning that carried the endpoint's
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)  # polling the log, bounded
    assert server.terminate() == 0
    log = server.log()
    assert "EndPw777" not in log, log
    assert "http://<redacted>@127.0.0.1:9" in log
    assert f"metrics http://{metrics}/metrics" in log
    assert not ready.exists()


def test_a_sigterm_during_start_up_stops_it_cleanly(tmp_path: Path) -> None:
    """A SIGTERM that comes while the server is still starting (here: while
    it pre-faults a 512 MiB arena in /dev/shm) stops it as soon as it has
    started: exit 0, the arena file removed, no ready file. (The default
    action ended it there: exit 143, no log line, and the arena's RAM left
    held in /dev/shm.)"""
    arena = Path(f"/dev/shm/kvstore-test-{os.getpid()}-{tmp_path.name}-early")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", str(tmp_path / "data"),
         "--server-listen", "127.0.0.1:0", "--l1-shm-path", str(arena),
         "--l1-capacity", "512MiB", "--l1-prefault", "true", "--ready-file", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ,
                                                             "KVSTORE_LOG_LEVEL": "INFO"})
    try:
        deadline = time.monotonic() + 60
        while not arena.exists():  # made as the server is built, after its signal handlers
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)  # polling a file with a deadline
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        left = arena.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
        arena.unlink(missing_ok=True)
    assert proc.returncode == 0, out.decode()
    assert b"stopped" in out
    assert not ready.exists()
    assert not left
