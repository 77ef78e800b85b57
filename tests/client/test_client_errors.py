"""gRPC status → kvstore exception mapping."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from kvstore.client._errors import error_from_rpc
from kvstore.errors import (
    BlockTooLarge,
    CapacityExhausted,
    ConnectionFailed,
    InvalidArgument,
    KVStoreError,
    TierUnavailable,
)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, metadata: Any = ()) -> None:
        self._code, self._details, self._md = code, details, metadata

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._md


def test_metadata_names_the_class() -> None:
    err = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "block is 9 bytes, max 8",
                       (("other", "x"), ("kvstore-error", "BlockTooLarge")))
    exc = error_from_rpc(err, "h:1")
    assert type(exc) is BlockTooLarge
    assert str(exc) == "block is 9 bytes, max 8"
    assert exc.grpc_code == "INVALID_ARGUMENT"  # type: ignore[attr-defined]


def test_metadata_bytes_value() -> None:
    err = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "L3 down",
                       [("kvstore-error", b"TierUnavailable")])
    assert type(error_from_rpc(err, "h:1")) is TierUnavailable


@pytest.mark.parametrize(("code", "cls"), [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidArgument),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, CapacityExhausted),
    (grpc.StatusCode.INTERNAL, KVStoreError),
    (grpc.StatusCode.UNIMPLEMENTED, KVStoreError),
])
def test_fallback_by_code(code: grpc.StatusCode, cls: type) -> None:
    exc = error_from_rpc(FakeRpcError(code, "msg", None), "h:1")
    assert type(exc) is cls and str(exc) == "msg"


def test_unknown_class_name_falls_back_to_code() -> None:
    err = FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "m", (("kvstore-error", "FutureError"),))
    assert type(error_from_rpc(err, "h:1")) is InvalidArgument


def test_unavailable_without_name_is_connection_failed() -> None:
    err = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")
    exc = error_from_rpc(err, "10.0.0.1:50051")
    assert type(exc) is ConnectionFailed
    assert "10.0.0.1:50051" in str(exc) and "failed to connect" in str(exc)


def test_empty_details() -> None:
    exc = error_from_rpc(FakeRpcError(grpc.StatusCode.INTERNAL, "", ()), "h:1")
    assert "INTERNAL" in str(exc) and "h:1" in str(exc)


def test_error_without_status_methods() -> None:
    exc = error_from_rpc(grpc.RpcError(), "h:1")
    assert type(exc) is KVStoreError


def test_cancelled_without_a_kvstore_error_is_a_cut_call() -> None:
    """A stopping server cancels calls it had received but not started: the
    status is CANCELLED with no kvstore class. That is a ConnectionFailed
    (retried elsewhere or after the restart, as UNAVAILABLE is), and still a
    Cancelled for code that caught those."""
    from kvstore.errors import CallCut, Cancelled

    exc = error_from_rpc(FakeRpcError(grpc.StatusCode.CANCELLED, "Cancelled", ()), "h:1")
    assert type(exc) is CallCut
    assert isinstance(exc, ConnectionFailed) and isinstance(exc, Cancelled)
    assert "may be stopping" in str(exc) and exc.grpc_code == "CANCELLED"  # type: ignore[attr-defined]
    named = FakeRpcError(grpc.StatusCode.CANCELLED, "x", (("kvstore-error", "Cancelled"),))
    assert type(error_from_rpc(named, "h:1")) is Cancelled
