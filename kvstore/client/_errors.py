"""gRPC status → kvstore exception, the SDK half of the server's error mapping."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from kvstore.errors import (
    ERROR_FOR_CODE,
    CallCut,
    ConnectionFailed,
    KVStoreError,
    error_class_by_name,
)
from kvstore.errors import InvalidBuffer as InvalidBuffer  # (re-exported: the SDK's own errors)
from kvstore.errors import ProtocolError as ProtocolError

if TYPE_CHECKING:
    from kvstore.client._base import TLS

ERROR_METADATA_KEY = "kvstore-error"


def closed_in_flight(target: str) -> ConnectionFailed:
    """What a call gets when the client's ``close()`` comes while it is in
    flight (over gRPC or the data plane, its session open or opening; the
    sync client's gRPC Puts too)."""
    return ConnectionFailed(f"kvstore client for {target} was closed while the call was "
                            "in flight")


def _metadata_value(metadata: Any, key: str) -> str | None:
    if not metadata:
        return None
    for item in metadata:
        try:
            k, v = item
        except (TypeError, ValueError):
            continue
        if k == key:
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


def _call(err: Any, name: str) -> Any:
    fn = getattr(err, name, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except Exception:  # a half-initialised RpcError must not hide the real error
        return None


# A server that requires client certificates closes the handshake of a client
# that has none, or one it does not trust: the client sees the socket closed,
# which read as "server down".
_TLS_HINT_WITH_CERT = (" (over TLS with a client certificate: if the server is up, it may "
                       "have refused the certificate: not signed by a CA in its "
                       "server.tls_client_ca, or expired)")
_TLS_HINT = (" (over TLS: if the server is up, it may require a client certificate "
             "(server.tls_client_ca): pass TLS(cert=..., key=...))")


def error_from_rpc(err: Exception, target: str, tls: TLS | None = None) -> KVStoreError:
    """The kvstore exception for a failed call.

    The class named by the ``kvstore-error`` trailing metadata wins; else the
    most general class for the status code; else :class:`KVStoreError`. The
    message is the status details. An ``UNAVAILABLE`` status without a kvstore
    class means the server could not be reached: :class:`ConnectionFailed`
    naming ``target`` (and, over ``tls``, what a refused handshake may mean).
    """
    code = _call(err, "code")
    code_name = getattr(code, "name", None) or (str(code) if code is not None else "UNKNOWN")
    details = _call(err, "details") or ""
    name = _metadata_value(_call(err, "trailing_metadata"), ERROR_METADATA_KEY)
    cls = error_class_by_name(name) if name else None
    if cls is None:
        cls = ERROR_FOR_CODE.get(code_name, KVStoreError)
    if cls is ConnectionFailed and name is None:
        message = f"cannot reach kvstore server at {target}: {details or code_name}"
        if tls is not None and "refused" not in details:
            message += _TLS_HINT_WITH_CERT if tls.cert is not None else _TLS_HINT
    elif cls is CallCut:
        message = (f"the call was cut before its answer ({details or code_name}): the kvstore "
                   f"server at {target} may be stopping")
    elif details:
        message = details
    else:
        message = f"{code_name} from kvstore server at {target}"
    exc = cls(message)
    exc.grpc_code = code_name  # type: ignore[attr-defined]
    return exc


#: gRPC status code names by number (the data plane's ERROR frames carry the number).
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def error_from_frame(code: int, name: str, message: str, target: str) -> KVStoreError:
    """The kvstore exception for a data plane ERROR frame (docs/dataplane.md):
    the same class a gRPC call failing the same way raises."""
    code_name = _CODE_NAMES.get(code, "UNKNOWN")
    cls = error_class_by_name(name) if name else None
    if cls is None:
        cls = ERROR_FOR_CODE.get(code_name, KVStoreError)
    exc = cls(message or f"{code_name} from kvstore server at {target}")
    exc.grpc_code = code_name  # type: ignore[attr-defined]
    return exc
