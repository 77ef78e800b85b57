"""Block format v1, pure Python + numpy: the specification.

``native/_native.pyx`` implements the same functions and must produce the same
bytes, the same results and the same errors (class and message); the tests in
``tests/block`` compare the two. ``docs/block-format.md`` describes the bytes.

Page arrays are numpy arrays shaped ``[num_pages, page_tokens, kv_heads,
head_dim]``, one per layer for K and (unless the cache is a single latent, as
in MLA) one per layer for V. Each page must be C-contiguous; the page axis may
have any stride (so ``kv[:, 0]`` of a ``[pages, 2, tokens, heads, dim]`` array
works). A block holds ``tokens`` tokens taken from the pages listed in
``page_ids``, in order; the last page may be partly used.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvstore.block.crc32c import crc32c
from kvstore.block.format import (
    HEADER_CHECKSUM_OFFSET,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAGIC,
    MAX_U32,
    VERSION,
    BlockHeader,
    ChecksumAlgorithm,
    DType,
    Layout,
    resolve_dtype,
)
from kvstore.errors import CorruptBlock, InvalidBlock

IMPLEMENTATION = "pure"

#: What callers may pass as a block or a destination buffer.
BufferLike = Any  # bytes | bytearray | memoryview | np.ndarray | mmap (buffer protocol)

_RESERVED = bytes(12)

# -- buffers --------------------------------------------------------------------------


def _readable(buf: BufferLike) -> memoryview:
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("the buffer must be C-contiguous")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _writable(buf: BufferLike, name: str) -> memoryview:
    view = _readable(buf)
    if view.readonly:
        raise ValueError(f"{name} is read-only")
    return view


# -- checksum -------------------------------------------------------------------------


def checksum(data: BufferLike, seed: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``seed`` (a previous result)."""
    return crc32c(_readable(data), seed)


def copy_and_checksum(dst: BufferLike, dst_offset: int, src: BufferLike, seed: int = 0,
                      streaming: bool | None = None) -> int:
    """Copy ``src`` into ``dst[dst_offset:]`` and return the CRC-32C of ``src``
    continuing from ``seed``. (``streaming``, the native build's choice of
    store instructions, changes nothing here.)"""
    d = _writable(dst, "dst")
    s = _readable(src)
    n = len(s)
    if dst_offset < 0 or dst_offset + n > len(d):
        raise ValueError(
            f"copy of {n} bytes at offset {dst_offset} overflows a {len(d)}-byte buffer"
        )
    d[dst_offset : dst_offset + n] = s
    return crc32c(s, seed)


# -- header ---------------------------------------------------------------------------


def encode_header(
    *, dtype: DType, layers: int, kv_count: int, tokens: int, kv_heads: int, head_dim: int,
    payload_bytes: int, payload_checksum: int,
) -> bytes:
    """The 64 header bytes of a v1 block."""
    body = HEADER_STRUCT.pack(
        MAGIC, VERSION, HEADER_SIZE, int(dtype), int(Layout.LAYER_KV_TOKEN_HEAD_DIM),
        kv_count, int(ChecksumAlgorithm.CRC32C), 0, layers, tokens, kv_heads, head_dim,
        payload_bytes, payload_checksum, _RESERVED,
    )
    return body + crc32c(body).to_bytes(4, "little")


def _parse(view: memoryview) -> BlockHeader:
    n = len(view)
    if n >= 4 and bytes(view[:4]) != MAGIC:
        raise InvalidBlock(
            f"not a kvstore block: magic {bytes(view[:4])!r}, expected {MAGIC!r}"
        )
    if n < HEADER_SIZE:
        raise InvalidBlock(
            f"truncated block: {n} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    (_, version, header_size, dtype, layout, kv_count, algorithm, flags, layers, tokens,
     kv_heads, head_dim, payload_bytes, payload_checksum,
     reserved) = HEADER_STRUCT.unpack_from(view)
    if version != VERSION:
        raise InvalidBlock(
            f"unsupported block format version {version} (this reader knows {VERSION})"
        )
    if header_size != HEADER_SIZE:
        raise InvalidBlock(f"bad header size {header_size} (version 1 has {HEADER_SIZE})")
    stored = int.from_bytes(view[HEADER_CHECKSUM_OFFSET:HEADER_SIZE], "little")
    computed = crc32c(view[:HEADER_CHECKSUM_OFFSET])
    if stored != computed:
        raise CorruptBlock(
            f"header checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}"
        )
    if dtype not in DType._value2member_map_:
        raise InvalidBlock(f"unknown dtype code {dtype}")
    if layout not in Layout._value2member_map_:
        raise InvalidBlock(f"unknown layout code {layout}")
    if kv_count not in (1, 2):
        raise InvalidBlock(f"K/V count must be 1 or 2, not {kv_count}")
    if algorithm not in ChecksumAlgorithm._value2member_map_:
        raise InvalidBlock(f"unknown checksum algorithm code {algorithm}")
    if flags:
        raise InvalidBlock(f"unknown flags 0x{flags:08x}")
    if reserved != _RESERVED:
        raise InvalidBlock("reserved header bytes 48-59 are not zero")
    for what, value in (("layer count", layers), ("token count", tokens),
                        ("kv head count", kv_heads), ("head dim", head_dim)):
        if value == 0:
            raise InvalidBlock(f"{what} is zero")
    dt = DType(dtype)
    expected = layers * kv_count * tokens * kv_heads * head_dim * dt.itemsize
    if payload_bytes != expected:
        raise InvalidBlock(
            f"payload length {payload_bytes} disagrees with the shape: {layers} layers x "
            f"{kv_count} x {tokens} tokens x {kv_heads} heads x {head_dim} x "
            f"{dt.itemsize} bytes = {expected}"
        )
    if payload_checksum > 0xFFFFFFFF:
        raise InvalidBlock(f"CRC-32C value 0x{payload_checksum:x} does not fit in 32 bits")
    return BlockHeader(
        dtype=dt, layers=layers, kv_count=kv_count, tokens=tokens, kv_heads=kv_heads,
        head_dim=head_dim, payload_bytes=payload_bytes, payload_checksum=payload_checksum,
        header_checksum=stored, layout=Layout(layout),
        checksum_algorithm=ChecksumAlgorithm(algorithm), flags=flags, version=version,
    )


def _check_length(view: memoryview, header: BlockHeader) -> None:
    total, n = header.block_bytes, len(view)
    if n < total:
        raise InvalidBlock(f"truncated block: the header says {total} bytes, the buffer has {n}")
    if n > total:
        raise InvalidBlock(f"over-long block: the header says {total} bytes, the buffer has {n}")


def parse_header(buf: BufferLike) -> BlockHeader:
    """Parse and check the header at the start of ``buf`` (which may hold only
    the header, or more). Raises InvalidBlock for a malformed header and
    CorruptBlock when the header's own checksum does not match."""
    return _parse(_readable(buf))


def verify(buf: BufferLike) -> BlockHeader:
    """Check a whole block: header, exact length, payload checksum.

    Raises InvalidBlock (malformed, truncated, over-long) or CorruptBlock
    (a checksum does not match); returns the header."""
    view = _readable(buf)
    header = _parse(view)
    _check_length(view, header)
    actual = crc32c(view[HEADER_SIZE:])
    if actual != header.payload_checksum:
        raise CorruptBlock(
            f"payload checksum mismatch: the header says 0x{header.payload_checksum:08x}, "
            f"the payload has 0x{actual:08x}"
        )
    return header


# -- page arrays ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Geometry:
    arrays: list[np.ndarray]  # payload order: K0, V0, K1, V1, ... (no V when kv_count 1)
    page_ids: list[int]
    layers: int
    kv_count: int
    dtype: DType
    page_tokens: int
    kv_heads: int
    head_dim: int
    tokens: int

    @property
    def token_bytes(self) -> int:
        return self.kv_heads * self.head_dim * self.dtype.itemsize


def _geometry(
    k_pages: Sequence[np.ndarray], v_pages: Sequence[np.ndarray] | None,
    page_ids: Sequence[int], tokens: int | None, dtype: DType | str | int | None,
    writable: bool,
) -> _Geometry:
    layers = len(k_pages)
    if layers == 0:
        raise ValueError("k_pages is empty: a block needs at least one layer")
    if v_pages is not None and len(v_pages) != layers:
        raise ValueError(f"v_pages has {len(v_pages)} layers, k_pages has {layers}")
    kv_count = 1 if v_pages is None else 2
    arrays: list[np.ndarray] = []
    names: list[str] = []
    for layer in range(layers):
        arrays.append(k_pages[layer])
        names.append(f"k_pages[{layer}]")
        if v_pages is not None:
            arrays.append(v_pages[layer])
            names.append(f"v_pages[{layer}]")
    first = arrays[0]
    for arr, name in zip(arrays, names, strict=True):
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name} must be a numpy array, not {type(arr).__name__}")
        if arr.ndim != 4:
            raise ValueError(
                f"{name} must have 4 dimensions [num_pages, page_tokens, kv_heads, "
                f"head_dim], not shape {arr.shape}"
            )
        if 0 in arr.shape:
            raise ValueError(f"{name} has an empty dimension: shape {arr.shape}")
        if arr.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"{name} has pages of shape {arr.shape[1:]}, {names[0]} has {first.shape[1:]}"
            )
        if arr.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {arr.dtype}, {names[0]} has {first.dtype}")
        _, pt, heads, dim = arr.shape
        item = arr.dtype.itemsize
        for size, stride, want in ((pt, arr.strides[1], heads * dim * item),
                                   (heads, arr.strides[2], dim * item),
                                   (dim, arr.strides[3], item)):
            if size > 1 and stride != want:
                raise ValueError(f"{name}: each page must be C-contiguous (strides {arr.strides})")
        if writable and not arr.flags.writeable:
            raise ValueError(f"{name} is read-only")
    dt = resolve_dtype(first.dtype, dtype)
    _, page_tokens, kv_heads, head_dim = first.shape
    for what, value in (("layer count", layers), ("page_tokens", page_tokens),
                        ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if value > MAX_U32:
            raise ValueError(f"{what} {value} does not fit the header (u32)")

    ids = [operator.index(p) for p in page_ids]
    if not ids:
        raise ValueError("page_ids is empty")
    for i, p in enumerate(ids):
        if p < 0:
            raise ValueError(f"page_ids[{i}] = {p} is negative")
    top = max(ids)
    for arr, name in zip(arrays, names, strict=True):
        if top >= arr.shape[0]:
            i = next(i for i, p in enumerate(ids) if p >= arr.shape[0])
            raise ValueError(
                f"page_ids[{i}] = {ids[i]} is out of range for {name} ({arr.shape[0]} pages)"
            )
    if tokens is None:
        tokens = len(ids) * page_tokens
    else:
        tokens = operator.index(tokens)
        if tokens < 1 or tokens > MAX_U32:
            raise ValueError(f"tokens must be in [1, 2**32), not {tokens}")
        need = -(-tokens // page_tokens)
        if need != len(ids):
            raise ValueError(
                f"{tokens} tokens fill {need} pages of {page_tokens} tokens, "
                f"but {len(ids)} page ids were given"
            )
    if tokens > MAX_U32:
        raise ValueError(f"tokens must be in [1, 2**32), not {tokens}")
    return _Geometry(arrays, ids, layers, kv_count, dt, page_tokens, kv_heads, head_dim, tokens)


def _page_bytes(arr: np.ndarray, page: int) -> np.ndarray:
    """One page of ``arr`` as a flat uint8 view (writable if ``arr`` is)."""
    return arr[page].reshape(-1).view(np.uint8)


# -- pack / unpack --------------------------------------------------------------------


def pack(
    k_pages: Sequence[np.ndarray], v_pages: Sequence[np.ndarray] | None,
    page_ids: Sequence[int], *, tokens: int | None = None,
    dtype: DType | str | int | None = None, out: BufferLike | None = None,
) -> memoryview:
    """Gather ``tokens`` tokens (default: all of the listed pages) from the
    pages ``page_ids`` of every layer into one block.

    Writes into ``out`` (any writable C-contiguous buffer at least
    ``block_size(...)`` bytes long) when given, else into a new buffer; returns
    a memoryview of exactly the block's bytes. ``v_pages=None`` makes a K-only
    (kv_count 1, MLA-style) block. ``dtype`` names the element type when the
    numpy dtype does not (uint16 views of bf16, uint8 views of fp8)."""
    g = _geometry(k_pages, v_pages, page_ids, tokens, dtype, writable=False)
    span = g.tokens * g.token_bytes  # bytes per layer per K/V
    payload_bytes = span * len(g.arrays)
    size = HEADER_SIZE + payload_bytes
    if out is None:
        view = memoryview(bytearray(size))
    else:
        view = _writable(out, "out")
        if len(view) < size:
            raise ValueError(f"out has {len(view)} bytes, the block needs {size}")
        view = view[:size]
    payload = np.frombuffer(view, dtype=np.uint8, count=payload_bytes, offset=HEADER_SIZE)
    page_bytes = g.page_tokens * g.token_bytes
    pos = 0
    for arr in g.arrays:
        left = span
        for page in g.page_ids:
            n = min(page_bytes, left)
            payload[pos : pos + n] = _page_bytes(arr, page)[:n]
            pos += n
            left -= n
    view[:HEADER_SIZE] = encode_header(
        dtype=g.dtype, layers=g.layers, kv_count=g.kv_count, tokens=g.tokens,
        kv_heads=g.kv_heads, head_dim=g.head_dim, payload_bytes=payload_bytes,
        payload_checksum=crc32c(payload),
    )
    return view


def unpack_into(
    buf: BufferLike, k_pages: Sequence[np.ndarray], v_pages: Sequence[np.ndarray] | None,
    page_ids: Sequence[int], *, dtype: DType | str | int | None = None, verify: bool = True,
) -> BlockHeader:
    """Scatter a block into the pages ``page_ids`` of every layer.

    The block must match the arrays (layers, K/V count, heads, head dim,
    dtype) and fill exactly ``len(page_ids)`` pages of the arrays' page size
    (which may differ from the packer's); bytes of the last page past the
    block's tokens are left as they were. Page ids must not repeat. With
    ``verify`` (default) the payload checksum is checked; on CorruptBlock the
    pages' contents are unspecified (this reference checks before writing,
    the native module while writing). Returns the header."""
    view = _readable(buf)
    header = _parse(view)
    _check_length(view, header)
    g = _geometry(k_pages, v_pages, page_ids, header.tokens, dtype, writable=True)
    _check_destination(header, g)
    payload = np.frombuffer(view, dtype=np.uint8, offset=HEADER_SIZE)
    if verify:
        actual = crc32c(payload)
        if actual != header.payload_checksum:
            raise CorruptBlock(
                f"payload checksum mismatch: the header says 0x{header.payload_checksum:08x}, "
                f"the payload has 0x{actual:08x}"
            )
    span = g.tokens * g.token_bytes
    page_bytes = g.page_tokens * g.token_bytes
    pos = 0
    for arr in g.arrays:
        left = span
        for page in g.page_ids:
            n = min(page_bytes, left)
            _page_bytes(arr, page)[:n] = payload[pos : pos + n]
            pos += n
            left -= n
    return header


def _check_destination(header: BlockHeader, g: _Geometry) -> None:
    if header.layers != g.layers:
        raise ValueError(f"the block has {header.layers} layers, k_pages has {g.layers}")
    if header.kv_count == 2 and g.kv_count == 1:
        raise ValueError("the block has K and V, but v_pages is None")
    if header.kv_count == 1 and g.kv_count == 2:
        raise ValueError("the block has no V (kv_count 1), but v_pages was given")
    if (header.kv_heads, header.head_dim) != (g.kv_heads, g.head_dim):
        raise ValueError(
            f"the block has {header.kv_heads} kv heads x {header.head_dim} head dim, "
            f"the pages have {g.kv_heads} x {g.head_dim}"
        )
    if header.dtype != g.dtype:
        raise ValueError(f"the block holds {header.dtype.label}, the pages hold {g.dtype.label}")
    seen: dict[int, int] = {}
    for j, p in enumerate(g.page_ids):
        i = seen.setdefault(p, j)
        if i != j:
            raise ValueError(f"page_ids[{j}] = {p} repeats page_ids[{i}]")


# -- chained block keys ---------------------------------------------------------------

KEY_BYTES = 32
KEY_DOMAIN = b"kvstore/block_keys/v1"


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _key_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_BYTES).digest()


def root_key(namespace_salt: bytes) -> bytes:
    """The parent of a chain's first key: BLAKE2b-256 of the domain string,
    the salt's length (u32 LE) and the salt."""
    salt = bytes(namespace_salt)
    return _key_hash(KEY_DOMAIN + _u32(len(salt)) + salt)


def _check_key_args(block_tokens: int, namespace_salt: object, extra: object) -> int:
    for name, value in (("namespace_salt", namespace_salt), ("extra", extra)):
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    bt = operator.index(block_tokens)
    if bt < 1 or bt > MAX_U32:
        raise ValueError(f"block_tokens must be in [1, 2**32), not {bt}")
    return bt


def block_keys(
    tokens: Sequence[int] | np.ndarray, block_tokens: int, namespace_salt: bytes,
    extra: bytes = b"",
) -> list[bytes]:
    """One 32-byte key per full block of ``block_tokens`` tokens (a trailing
    partial block gets none).

    ``key_i = BLAKE2b-256(key_{i-1} ‖ u32(block_tokens) ‖ tokens of block i as
    u32 LE ‖ u32(len(extra)) ‖ extra)``, with ``key_{-1} = root_key(salt)``.
    Every token id must be in [0, 2**32)."""
    bt = _check_key_args(block_tokens, namespace_salt, extra)
    ids = [operator.index(t) for t in tokens]
    for i, t in enumerate(ids):
        if t < 0 or t > MAX_U32:
            raise ValueError(f"tokens[{i}] = {t} is not a valid token id (0 <= id < 2**32)")
    head = _u32(bt)
    tail = _u32(len(extra)) + bytes(extra)
    keys: list[bytes] = []
    parent = root_key(bytes(namespace_salt))
    for b in range(len(ids) // bt):
        body = b"".join(_u32(t) for t in ids[b * bt : (b + 1) * bt])
        parent = _key_hash(parent + head + body + tail)
        keys.append(parent)
    return keys
