"""Shared helpers for the block tests: implementations, strategies, vectors."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import strategies as st

import kvstore.block as block
from kvstore.block import reference
from kvstore.block.format import DType

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "block-format.md"

PURE = os.environ.get("KVSTORE_PURE", "") == "1"

#: The implementation kvstore.block exports (native, or the reference when pure).
IMPL: Any = block

needs_native = pytest.mark.skipif(PURE, reason="KVSTORE_PURE=1: native comparisons skipped")


def native_module() -> ModuleType:
    """The extension, through kvstore._impl (the one module that imports it)."""
    from kvstore import _impl

    assert _impl.native is not None, "KVSTORE_PURE=1: no native module"
    return _impl.native


@contextmanager
def streaming_stores(threshold: int = 0) -> Iterator[None]:
    """Make the native module use streaming stores from ``threshold`` bytes."""
    native = native_module()
    old = native._streaming_store_threshold(threshold)
    try:
        yield
    finally:
        native._streaming_store_threshold(old)


def implementations() -> list[tuple[str, Any]]:
    """(name, module) pairs to run a behavioural test against."""
    impls: list[tuple[str, Any]] = [("reference", reference)]
    if not PURE:
        impls.append(("native", native_module()))
    return impls


# -- doc vectors -------------------------------------------------------------------


def doc_vectors() -> list[dict[str, Any]]:
    """Every object in the ```json blocks of docs/block-format.md (lists flattened)."""
    text = DOC.read_text(encoding="utf-8")
    out: list[dict[str, Any]] = []
    for body in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        value = json.loads(body)
        out.extend(value if isinstance(value, list) else [value])
    return out


# -- page arrays -------------------------------------------------------------------

#: (DType, numpy dtype of the arrays, pass dtype= explicitly)
DTYPE_CASES: list[tuple[DType, str, bool]] = [
    (DType.F16, "float16", False),
    (DType.F16, "uint16", True),
    (DType.BF16, "uint16", True),
    (DType.F32, "float32", False),
    (DType.F8_E4M3, "uint8", True),
    (DType.F8_E5M2, "uint8", True),
    (DType.I8, "int8", False),
    (DType.U8, "uint8", False),
]


@dataclass
class Case:
    """Page arrays and the arguments of one pack call."""

    k: list[np.ndarray]
    v: list[np.ndarray] | None
    page_ids: list[int]
    tokens: int
    dtype: DType
    explicit: bool
    page_tokens: int

    @property
    def dtype_arg(self) -> DType | None:
        return self.dtype if self.explicit else None

    def pack_with(self, impl: Any, **kw: Any) -> memoryview:
        return impl.pack(self.k, self.v, self.page_ids, tokens=self.tokens,
                         dtype=self.dtype_arg, **kw)

    def empty_like(
        self, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
        """Fresh random destination arrays of the same shapes and dtype."""
        def fresh(a: np.ndarray) -> np.ndarray:
            raw = rng.integers(0, 256, size=a.nbytes, dtype=np.uint8)
            return raw.view(a.dtype).reshape(a.shape)

        return [fresh(a) for a in self.k], None if self.v is None else [fresh(a) for a in self.v]

    def expected_payload(self) -> bytes:
        """The payload computed independently of both implementations."""
        parts = []
        arrays = [a for layer in range(len(self.k))
                  for a in ([self.k[layer]] if self.v is None else [self.k[layer], self.v[layer]])]
        for a in arrays:
            pages = np.concatenate([a[p][None] for p in self.page_ids])
            parts.append(pages.tobytes()[: self.tokens * pages[0, 0].nbytes])
        return b"".join(parts)


def make_pool(rng: np.random.Generator, shape: tuple[int, ...], np_dtype: str,
              strided: bool) -> np.ndarray:
    """Random page pool; ``strided`` makes the page axis non-contiguous (the K
    half of a [pages, 2, ...] array, as some engines lay it out)."""
    item = np.dtype(np_dtype).itemsize
    if strided:
        full = (shape[0], 2, *shape[1:])
        raw = rng.integers(0, 256, size=int(np.prod(full)) * item, dtype=np.uint8)
        return raw.view(np_dtype).reshape(full)[:, 1]
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * item, dtype=np.uint8)
    return raw.view(np_dtype).reshape(shape)


@st.composite
def cases(draw: st.DrawFn, max_layers: int = 3, unique_pages: bool = True) -> Case:
    dtype, np_dtype, explicit = draw(st.sampled_from(DTYPE_CASES))
    layers = draw(st.integers(1, max_layers))
    kv_count = draw(st.sampled_from([1, 2]))
    num_pages = draw(st.integers(1, 6))
    page_tokens = draw(st.integers(1, 5))
    heads = draw(st.integers(1, 3))
    dim = draw(st.integers(1, 9))
    strided = draw(st.booleans())
    if unique_pages:
        ids = draw(st.lists(st.integers(0, num_pages - 1), min_size=1, max_size=num_pages,
                            unique=True))
    else:
        ids = draw(st.lists(st.integers(0, num_pages - 1), min_size=1, max_size=8))
    tokens = draw(st.integers((len(ids) - 1) * page_tokens + 1, len(ids) * page_tokens))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    shape = (num_pages, page_tokens, heads, dim)
    k = [make_pool(rng, shape, np_dtype, strided) for _ in range(layers)]
    v = [make_pool(rng, shape, np_dtype, strided) for _ in range(layers)] if kv_count == 2 else None
    return Case(k, v, ids, tokens, dtype, explicit, page_tokens)


def error_of(fn: Any, *args: Any, **kw: Any) -> tuple[type[BaseException], str] | None:
    """(class, message) of what ``fn`` raises, or None."""
    try:
        fn(*args, **kw)
    except Exception as exc:
        return type(exc), str(exc)
    return None
