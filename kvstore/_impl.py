"""The one door to the native code: it chooses the hot path's implementation, once.

``KVSTORE_PURE=1`` (read once, at first import) selects the pure-Python
reference (:mod:`kvstore.block.reference`); unset, empty or ``0`` selects the
Cython extension :mod:`kvstore._native`. Any other value is an error. No
other module imports the extension: everything native (the store, the
checksums, the SDK's shared-memory client, the benchmarks, the tests that
compare the two implementations) comes from here.

There is no silent fallback: if the extension is missing, stale or fails to
import and ``KVSTORE_PURE`` is not ``1``, importing this module raises
ImportError. A missing build is a bug (the reference is 10-100x slower and
would quietly turn a latency target into a miss); build it with
``python setup.py build_ext --inplace`` or opt in to the reference.

The extension's signatures are in ``kvstore/_native.pyi``; mypy checks the
reference against them through the two imports below.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from types import ModuleType

#: The names every implementation exports (kvstore.block re-exports them).
API = (
    "pack",
    "unpack_into",
    "verify",
    "parse_header",
    "block_keys",
    "checksum",
    "copy_and_checksum",
)

#: Native functions outside the block API, each with its own fallback below.
NATIVE_EXTRAS = ("cold_contains", "wait_readable")


def _how_to_get_native() -> str:
    """What to do when the extension is missing. A checkout's kvstore/ on the
    path (Python run in the checkout after `pip install .`) hides the
    installed package, built extension and all: the advice to build in
    place then failed (the venv has no build tools)."""
    here = Path(__file__).resolve().parent
    try:
        installed = Path(str(importlib.metadata.distribution("kvstore").locate_file("kvstore")))
        installed = installed.resolve()
    except (importlib.metadata.PackageNotFoundError, OSError):
        installed = None
    if installed is not None and installed != here and (installed / "__init__.py").is_file():
        return (f"this kvstore is imported from {here}, which hides the one installed in "
                f"{installed.parent}: run from another directory, or install the checkout "
                "with `pip install -e .`")
    return ("build it: `pip install -e .` in the checkout (or ./dev.sh setup); "
            "KVSTORE_PURE=1 runs on the pure-Python reference instead (10-100x slower)")


def _choose() -> tuple[str, ModuleType | None]:
    """("pure", None) or ("native", the extension module)."""
    flag = os.environ.get("KVSTORE_PURE", "")
    if flag not in ("", "0", "1"):
        raise ImportError(f"KVSTORE_PURE must be 0 or 1, not {flag!r}")
    if flag == "1":
        return "pure", None
    try:
        module = importlib.import_module("kvstore._native")
    except ImportError as exc:
        raise ImportError(
            f"the native extension kvstore._native cannot be imported ({exc}); "
            f"{_how_to_get_native()}"
        ) from exc
    missing = [name for name in (*API, *NATIVE_EXTRAS) if not hasattr(module, name)]
    if missing:
        raise ImportError(
            f"kvstore._native ({module.__file__}) is a stale build without {', '.join(missing)}; "
            "rebuild it with `python setup.py build_ext --inplace`"
        )
    return "native", module


IMPLEMENTATION, native = _choose()
"""``native``: the extension module, for the tests and benchmarks that compare
it with the reference or use its tuning switches; None with KVSTORE_PURE=1."""

if native is not None:
    from kvstore._native import (
        block_keys,
        checksum,
        copy_and_checksum,
        pack,
        parse_header,
        unpack_into,
        verify,
    )
    from kvstore._native import cold_contains as _native_cold_contains
else:
    # mypy checks that each reference function fits the native signature.
    from kvstore.block.reference import (
        block_keys,
        checksum,
        copy_and_checksum,
        pack,
        parse_header,
        unpack_into,
        verify,
    )

#: The compact index's batch probe (kvstore.store.coldindex), native only: with
#: KVSTORE_PURE=1 it is None and the index uses its numpy version (the
#: specification, which the tests compare it with).
cold_contains = _native_cold_contains if native is not None else None

#: Busy poll of a socket for the SDK's data plane (GIL released in the native
#: one); kvstore._spin.wait_readable is the specification.
if native is not None:
    from kvstore._native import wait_readable
else:
    from kvstore._spin import wait_readable

__all__ = [
    "API",
    "IMPLEMENTATION",
    "block_keys",
    "checksum",
    "cold_contains",
    "copy_and_checksum",
    "native",
    "pack",
    "parse_header",
    "unpack_into",
    "verify",
    "wait_readable",
]
