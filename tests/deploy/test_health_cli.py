"""`kvstore health`, the probe command: its exit status is the answer
(0 SERVING, 1 NOT_SERVING, 2 unreachable or unknown service)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def kvstore(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    return subprocess.run([sys.executable, "-m", "kvstore", *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture
def health_server() -> Iterator[tuple[str, health.HealthServicer]]:
    """A gRPC server with the standard health service, states set by the test."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(None)


def test_a_running_kvstore_server_is_serving(shared_server: object) -> None:
    for target in (shared_server.tcp, shared_server.unix_target):  # type: ignore[attr-defined]
        out = kvstore("health", "--target", target)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "SERVING"
    out = kvstore("health", "--target", shared_server.tcp,  # type: ignore[attr-defined]
                  "--service", "kvstore.v1.KVStore")
    assert (out.returncode, out.stdout.strip()) == (0, "SERVING")


def test_not_serving_exits_1(health_server: tuple[str, health.HealthServicer]) -> None:
    target, servicer = health_server
    servicer.set("kvstore.v1.KVStore/L3", health_pb2.HealthCheckResponse.NOT_SERVING)
    out = kvstore("health", "--target", target, "--service", "kvstore.v1.KVStore/L3")
    assert (out.returncode, out.stdout.strip()) == (1, "NOT_SERVING")
    servicer.set("kvstore.v1.KVStore/L3", health_pb2.HealthCheckResponse.SERVING)
    out = kvstore("health", "--target", target, "--service", "kvstore.v1.KVStore/L3")
    assert (out.returncode, out.stdout.strip()) == (0, "SERVING")


def test_unknown_service_exits_2(shared_server: object) -> None:
    out = kvstore("health", "--target", shared_server.tcp,  # type: ignore[attr-defined]
                  "--service", "no.such.Service")
    assert out.returncode == 2
    assert "NOT_FOUND" in out.stderr and "no.such.Service" in out.stderr


def test_unreachable_server_exits_2(tmp_path: Path) -> None:
    out = kvstore("health", "--target", f"unix:{tmp_path}/absent.sock", "--timeout", "3")
    assert out.returncode == 2
    assert out.stderr.startswith("kvstore: health of the server at unix:")
    assert "UNAVAILABLE" in out.stderr or "DEADLINE_EXCEEDED" in out.stderr


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_timeout_that_is_no_positive_number_is_refused_as_usage(
        shared_server: object, timeout: str) -> None:
    # --timeout 0 was taken, and a healthy server reported unreachable (exit 2).
    out = kvstore("health", "--target", shared_server.tcp,  # type: ignore[attr-defined]
                  "--timeout", timeout)
    assert out.returncode == 2
    assert "argument --timeout" in out.stderr and "health of the server" not in out.stderr


def test_a_bad_target_exits_2() -> None:
    out = kvstore("health", "--target", "unix://relative/path")
    assert out.returncode == 2
    assert "InvalidArgument" in out.stderr


@pytest.mark.parametrize("service", ["", "kvstore.v1.KVStore/L3", "é" * 200])
def test_hand_coded_health_messages_match_the_proto(service: str) -> None:
    from kvstore.cli import decode_health_status, encode_health_request

    assert encode_health_request(service) == health_pb2.HealthCheckRequest(
        service=service).SerializeToString()
    for status in health_pb2.HealthCheckResponse.ServingStatus.values():
        raw = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_health_status(raw) == \
            health_pb2.HealthCheckResponse.ServingStatus.Name(status)
