"""The one place that chooses the implementation of the hot path.

``KVSTORE_PURE=1`` (read once, at first import) selects the pure-Python
reference (:mod:`kvstore.block.reference`); unset, empty or ``0`` selects the
Cython extension :mod:`kvstore._native`. Any other value is an error.

There is no silent fallback: if the extension is missing, stale or fails to
import and ``KVSTORE_PURE`` is not ``1``, importing this module raises
ImportError. A missing build is a bug (the reference is 10-100x slower and
would quietly turn a latency target into a miss); build it with
``python setup.py build_ext --inplace`` or opt in to the reference.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any

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


def _choose() -> tuple[str, ModuleType]:
    flag = os.environ.get("KVSTORE_PURE", "")
    if flag not in ("", "0", "1"):
        raise ImportError(f"KVSTORE_PURE must be 0 or 1, not {flag!r}")
    if flag == "1":
        return "pure", importlib.import_module("kvstore.block.reference")
    try:
        module = importlib.import_module("kvstore._native")
    except ImportError as exc:
        raise ImportError(
            f"the native extension kvstore._native cannot be imported ({exc}); build it with "
            "`python setup.py build_ext --inplace` (or ./dev.sh setup), or set KVSTORE_PURE=1 "
            "to run on the pure-Python reference"
        ) from exc
    missing = [name for name in API if not hasattr(module, name)]
    if missing:
        raise ImportError(
            f"kvstore._native ({module.__file__}) is a stale build without {', '.join(missing)}; "
            "rebuild it with `python setup.py build_ext --inplace`"
        )
    return "native", module


IMPLEMENTATION, _module = _choose()

pack: Any = _module.pack
unpack_into: Any = _module.unpack_into
verify: Any = _module.verify
parse_header: Any = _module.parse_header
block_keys: Any = _module.block_keys
checksum: Any = _module.checksum
copy_and_checksum: Any = _module.copy_and_checksum

#: The compact index's batch probe (kvstore.coldindex), native only: with
#: KVSTORE_PURE=1 it is None and the index uses its numpy version (the
#: specification, which the tests compare it with).
cold_contains: Any = getattr(_module, "cold_contains", None) if IMPLEMENTATION == "native" \
    else None
