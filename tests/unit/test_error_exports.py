"""The README says errors are the classes in ``kvstore.errors``, and the SDK
example imports them from ``kvstore``: every error class the README names
imports from both, the same class (``InvalidBuffer`` and ``ProtocolError``
lived in the client only, ``PermissionDenied``, ``StaleLease``... in
``kvstore.errors`` only)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kvstore
import kvstore.client
import kvstore.errors
from kvstore.errors import KVStoreError

README = Path(__file__).resolve().parents[2] / "README.md"


def _error_classes(module: object) -> set[str]:
    return {name for name, value in vars(module).items()
            if isinstance(value, type) and issubclass(value, KVStoreError)}


def test_every_error_the_readme_names_imports_from_kvstore_and_kvstore_errors() -> None:
    words = set(re.findall(r"\b[A-Z][A-Za-z]+\b", README.read_text()))
    known = _error_classes(kvstore.errors) | _error_classes(kvstore.client) | {
        name for name in kvstore.__all__
        if isinstance(v := getattr(kvstore, name), type) and issubclass(v, KVStoreError)}
    named = words & known
    # (a guard: the README names these, so the check below sees them)
    assert {"InvalidBuffer", "PermissionDenied", "Unauthenticated", "StaleLease",
            "ReservationExpired", "CallCut", "KVStoreError"} <= named
    missing = [name for name in sorted(named)
               if getattr(kvstore.errors, name, None) is None
               or getattr(kvstore.errors, name) is not getattr(kvstore, name, None)
               or name not in kvstore.__all__]
    assert not missing, f"named in the README, not in both kvstore and kvstore.errors: {missing}"


def test_every_class_of_kvstore_errors_is_exported_from_kvstore() -> None:
    assert _error_classes(kvstore.errors) <= set(kvstore.__all__)


def test_the_sdk_raises_the_class_kvstore_errors_names() -> None:
    assert kvstore.client.InvalidBuffer is kvstore.errors.InvalidBuffer
    assert kvstore.client.ProtocolError is kvstore.errors.ProtocolError
    assert issubclass(kvstore.errors.InvalidBuffer, kvstore.errors.InvalidArgument)
    assert issubclass(kvstore.errors.InvalidBuffer, TypeError)


def test_importing_the_errors_loads_no_client() -> None:
    """``kvstore.errors`` is domain code (the server and the store import it):
    importing it, or every error from ``kvstore``, loads neither the SDK nor grpc."""
    code = ("import sys, kvstore, kvstore.errors as e; "
            "[getattr(kvstore, n) for n, v in vars(e).items() "
            " if isinstance(v, type) and issubclass(v, e.KVStoreError)]; "
            "from kvstore import InvalidBuffer, PermissionDenied; "
            "loaded = sorted(m for m in sys.modules if m == 'grpc' or "
            "m.startswith(('grpc.', 'kvstore.client'))); print(loaded)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_client_the_readme_names_imports_from_kvstore() -> None:
    """The README names kvstore.Client, kvstore.AsyncClient and ShmClient
    together; `from kvstore import ShmClient` raised ImportError (an SDK
    review)."""
    from kvstore import AsyncClient, Client, ShmClient
    from kvstore.client.shm import ShmClient as where_it_lives

    assert ShmClient is where_it_lives
    assert {"Client", "AsyncClient", "ShmClient"} <= set(kvstore.__all__)
    assert Client is kvstore.client.Client and AsyncClient is kvstore.client.AsyncClient
