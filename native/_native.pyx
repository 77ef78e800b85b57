# cython: language_level=3
"""Native hot path of kvstore (see kvstore/_impl.py for how it is chosen).

The pure-Python modules are the specification; every function here matches
its reference (kvstore/block/reference.py) byte for byte, result for result
and error for error (class and message). The C loops live in kv_crc32c.h and
kv_block.h.
"""

cimport cython
cimport numpy as cnp
from cpython.buffer cimport (
    PyBUF_STRIDES,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import hashlib
import operator

import numpy as np

from kvstore.block.format import (
    BlockHeader,
    ChecksumAlgorithm,
    DType,
    Layout,
    resolve_dtype,
)
from kvstore.errors import CorruptBlock, InvalidBlock

cnp.import_array()

cdef extern from "kv_block.h" nogil:
    void kv_crc32c_init()
    int kv_crc32c_select(int mode)
    const char *kv_crc32c_impl_name(int mode)
    int kv_crc_mode
    int kv_crc_best
    uint32_t kv_crc32c(uint32_t crc, const void *buf, size_t n)
    uint32_t kv_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n)
    uint32_t kv_crc32c_copy_nt(uint32_t crc, void *dst, const void *src, size_t n)
    size_t kv_nt_min_bytes
    int kv_prefetch_lines
    uint16_t kv_get16(const uint8_t *p)
    uint32_t kv_get32(const uint8_t *p)
    uint64_t kv_get64(const uint8_t *p)
    void kv_encode_header(uint8_t *h, uint8_t dtype, uint8_t kv_count, uint32_t layers,
                          uint32_t tokens, uint32_t kv_heads, uint32_t head_dim,
                          uint64_t payload_bytes, uint32_t payload_crc)
    uint32_t kv_gather(uint8_t *dst, char *const *bases, const Py_ssize_t *strides,
                       size_t narrays, const int64_t *pages, size_t npages,
                       size_t page_bytes, size_t span, uint32_t crc)
    uint32_t kv_scatter(const uint8_t *src, char *const *bases, const Py_ssize_t *strides,
                        size_t narrays, const int64_t *pages, size_t npages,
                        size_t page_bytes, size_t span, int check, uint32_t crc)
    Py_ssize_t kv_first_repeat(const int64_t *ids, Py_ssize_t n, Py_ssize_t *first)
    Py_ssize_t kv_encode_tokens_i64(uint8_t *dst, const int64_t *src, Py_ssize_t n)

kv_crc32c_init()

IMPLEMENTATION = "native"

cdef enum:
    HEADER_SIZE = 64
    HEADER_CRC_OFFSET = 60
    SMALL_ARRAYS = 128  # arrays / page ids described without a malloc
    SMALL_PAGES = 512
    NOGIL_BYTES = 16384  # release the GIL for copies/checksums at least this long

cdef object MAX_U32 = 0xFFFFFFFF

cdef tuple _DTYPES = (None,) + tuple(DType(code) for code in range(1, len(DType) + 1))
cdef dict _dtype_cache = {}
_MAGIC = b"KVCB"


# -- checksum ---------------------------------------------------------------------


def crc32c_implementations():
    """The CRC-32C implementations this CPU can run, best last."""
    return [kv_crc32c_impl_name(m).decode() for m in range(kv_crc_best + 1)]


def crc32c_implementation():
    """The CRC-32C implementation in use ("avx512-vpclmulqdq", "sse4.2" or "table")."""
    return kv_crc32c_impl_name(kv_crc_mode).decode()


def _use_crc32c(name=None):
    """Switch the CRC-32C implementation (tests and benchmarks only; not
    thread-safe). ``None`` restores the best one."""
    if name is None:
        kv_crc32c_select(-1)
        return crc32c_implementation()
    names = crc32c_implementations()
    if name not in names:
        raise ValueError(f"CRC-32C implementation {name!r} is not available here: {names}")
    kv_crc32c_select(names.index(name))
    return name


def _streaming_store_threshold(n=None):
    """Bytes from which copies use streaming stores; set it with ``n`` (tests
    and benchmarks only). Returns the previous value."""
    global kv_nt_min_bytes
    old = kv_nt_min_bytes
    if n is not None:
        kv_nt_min_bytes = n
    return old


def _prefetch_lines(n=None):
    """Cache lines of the next page prefetched during gathers and scatters
    (benchmarks only). Returns the previous value."""
    global kv_prefetch_lines
    old = kv_prefetch_lines
    if n is not None:
        kv_prefetch_lines = n
    return old


cdef int _get_buffer(object obj, Py_buffer *view, bint writable, str name) except -1:
    PyObject_GetBuffer(obj, view, PyBUF_STRIDES)
    if not PyBuffer_IsContiguous(view, b'C'):
        PyBuffer_Release(view)
        raise ValueError("the buffer must be C-contiguous")
    if writable and view.readonly:
        PyBuffer_Release(view)
        raise ValueError(f"{name} is read-only")
    return 0


def checksum(data, seed=0):
    """CRC-32C of ``data``, continuing from ``seed`` (a previous result)."""
    cdef uint32_t s = seed & 0xFFFFFFFF
    cdef Py_buffer view
    _get_buffer(data, &view, False, "data")
    try:
        if view.len >= NOGIL_BYTES:
            with nogil:
                s = kv_crc32c(s, view.buf, <size_t>view.len)
        else:
            s = kv_crc32c(s, view.buf, <size_t>view.len)
    finally:
        PyBuffer_Release(&view)
    return s


def copy_and_checksum(dst, Py_ssize_t dst_offset, src, seed=0, streaming=None):
    """Copy ``src`` into ``dst[dst_offset:]`` and return the CRC-32C of
    ``src`` continuing from ``seed``, in one pass (the GIL is released for
    copies of 16 KiB or more; copies of 8 MiB or more use streaming stores).
    ``streaming`` True or False overrides that choice: a caller copying many
    blocks in a row knows better whether they will still be in cache."""
    cdef uint32_t s = seed & 0xFFFFFFFF
    cdef Py_buffer d, v
    cdef size_t nt_min = kv_nt_min_bytes
    if streaming is not None:
        nt_min = 0 if streaming else <size_t>-1
    _get_buffer(dst, &d, True, "dst")
    try:
        _get_buffer(src, &v, False, "src")
        try:
            if dst_offset < 0 or dst_offset + v.len > d.len:
                raise ValueError(
                    f"copy of {v.len} bytes at offset {dst_offset} overflows a "
                    f"{d.len}-byte buffer")
            if <size_t>v.len >= nt_min:
                if v.len >= NOGIL_BYTES:
                    with nogil:
                        s = kv_crc32c_copy_nt(s, <char *>d.buf + dst_offset, v.buf,
                                              <size_t>v.len)
                else:
                    s = kv_crc32c_copy_nt(s, <char *>d.buf + dst_offset, v.buf, <size_t>v.len)
            elif v.len >= NOGIL_BYTES:
                with nogil:
                    s = kv_crc32c_copy(s, <char *>d.buf + dst_offset, v.buf, <size_t>v.len)
            else:
                s = kv_crc32c_copy(s, <char *>d.buf + dst_offset, v.buf, <size_t>v.len)
        finally:
            PyBuffer_Release(&v)
    finally:
        PyBuffer_Release(&d)
    return s


def copy_into(unsigned char[::1] dst not None, const unsigned char[::1] src not None,
              Py_ssize_t offset=0):
    """Copy ``src`` into ``dst[offset:]`` without holding the GIL."""
    cdef Py_ssize_t n = src.shape[0]
    if offset < 0 or offset + n > dst.shape[0]:
        raise ValueError(f"copy of {n} bytes at offset {offset} overflows a {dst.shape[0]}-byte buffer")
    if n:
        with nogil:
            memcpy(&dst[offset], &src[0], n)
    return n


# -- header -----------------------------------------------------------------------


cdef object _parse(const uint8_t *p, Py_ssize_t n):
    """The checks of reference._parse, in the same order, with the same messages."""
    if n >= 4 and (p[0] != 0x4B or p[1] != 0x56 or p[2] != 0x43 or p[3] != 0x42):
        raise InvalidBlock(f"not a kvstore block: magic {p[:4]!r}, expected {_MAGIC!r}")
    if n < HEADER_SIZE:
        raise InvalidBlock(
            f"truncated block: {n} bytes, shorter than the {HEADER_SIZE}-byte header")
    cdef uint16_t version = kv_get16(p + 4)
    cdef uint16_t header_size = kv_get16(p + 6)
    if version != 1:
        raise InvalidBlock(f"unsupported block format version {version} (this reader knows 1)")
    if header_size != HEADER_SIZE:
        raise InvalidBlock(f"bad header size {header_size} (version 1 has {HEADER_SIZE})")
    cdef uint32_t stored = kv_get32(p + HEADER_CRC_OFFSET)
    cdef uint32_t computed = kv_crc32c(0, p, HEADER_CRC_OFFSET)
    if stored != computed:
        raise CorruptBlock(
            f"header checksum mismatch: stored 0x{stored:08x}, computed 0x{computed:08x}")
    cdef uint8_t dtype = p[8], layout = p[9], kv_count = p[10], algorithm = p[11]
    cdef uint32_t flags = kv_get32(p + 12)
    cdef uint32_t layers = kv_get32(p + 16), tokens = kv_get32(p + 20)
    cdef uint32_t kv_heads = kv_get32(p + 24), head_dim = kv_get32(p + 28)
    cdef uint64_t payload_bytes = kv_get64(p + 32), payload_checksum = kv_get64(p + 40)
    cdef int i
    if dtype < 1 or dtype >= len(_DTYPES):
        raise InvalidBlock(f"unknown dtype code {dtype}")
    if layout != 1:
        raise InvalidBlock(f"unknown layout code {layout}")
    if kv_count != 1 and kv_count != 2:
        raise InvalidBlock(f"K/V count must be 1 or 2, not {kv_count}")
    if algorithm != 1:
        raise InvalidBlock(f"unknown checksum algorithm code {algorithm}")
    if flags:
        raise InvalidBlock(f"unknown flags 0x{flags:08x}")
    for i in range(48, 60):
        if p[i]:
            raise InvalidBlock("reserved header bytes 48-59 are not zero")
    if layers == 0:
        raise InvalidBlock("layer count is zero")
    if tokens == 0:
        raise InvalidBlock("token count is zero")
    if kv_heads == 0:
        raise InvalidBlock("kv head count is zero")
    if head_dim == 0:
        raise InvalidBlock("head dim is zero")
    dt = <object>_DTYPES[dtype]
    cdef object expected = (<object>layers) * kv_count * tokens * kv_heads * head_dim * dt.itemsize
    if payload_bytes != expected:
        raise InvalidBlock(
            f"payload length {payload_bytes} disagrees with the shape: {layers} layers x "
            f"{kv_count} x {tokens} tokens x {kv_heads} heads x {head_dim} x "
            f"{dt.itemsize} bytes = {expected}")
    if payload_checksum > 0xFFFFFFFF:
        raise InvalidBlock(f"CRC-32C value 0x{payload_checksum:x} does not fit in 32 bits")
    return BlockHeader(dt, layers, kv_count, tokens, kv_heads, head_dim, payload_bytes,
                       payload_checksum, stored)


cdef int _check_length(Py_ssize_t n, object header) except -1:
    total = header.block_bytes
    if n < total:
        raise InvalidBlock(f"truncated block: the header says {total} bytes, the buffer has {n}")
    if n > total:
        raise InvalidBlock(f"over-long block: the header says {total} bytes, the buffer has {n}")
    return 0


def parse_header(buf):
    """Parse and check the header at the start of ``buf`` (see reference.parse_header)."""
    cdef Py_buffer view
    _get_buffer(buf, &view, False, "buf")
    try:
        return _parse(<const uint8_t *>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def verify(buf):
    """Check a whole block: header, exact length, payload checksum (see reference.verify)."""
    cdef Py_buffer view
    cdef uint32_t actual
    cdef size_t n
    _get_buffer(buf, &view, False, "buf")
    try:
        header = _parse(<const uint8_t *>view.buf, view.len)
        _check_length(view.len, header)
        n = view.len - HEADER_SIZE
        with nogil:
            actual = kv_crc32c(0, <const uint8_t *>view.buf + HEADER_SIZE, n)
        if actual != header.payload_checksum:
            raise CorruptBlock(
                f"payload checksum mismatch: the header says 0x{header.payload_checksum:08x}, "
                f"the payload has 0x{actual:08x}")
        return header
    finally:
        PyBuffer_Release(&view)


# -- page arrays ------------------------------------------------------------------


@cython.freelist(4)
cdef class _Plan:
    """Validated page arrays and page ids (the checks of reference._geometry)."""
    cdef object ks, vs  # keep the arrays alive while the GIL is released
    cdef Py_ssize_t narrays, layers, kv_count, page_tokens, kv_heads, head_dim, itemsize
    cdef Py_ssize_t npages, tokens
    cdef object dtype
    cdef char **bases
    cdef Py_ssize_t *strides
    cdef Py_ssize_t *counts
    cdef int64_t *pages
    cdef char *bases_small[SMALL_ARRAYS]
    cdef Py_ssize_t strides_small[SMALL_ARRAYS]
    cdef Py_ssize_t counts_small[SMALL_ARRAYS]
    cdef int64_t pages_small[SMALL_PAGES]

    def __cinit__(self):
        self.bases = self.bases_small
        self.strides = self.strides_small
        self.counts = self.counts_small
        self.pages = self.pages_small

    def __dealloc__(self):
        if self.bases != self.bases_small:
            PyMem_Free(self.bases)
            PyMem_Free(self.strides)
            PyMem_Free(self.counts)
        if self.pages != self.pages_small:
            PyMem_Free(self.pages)

    cdef int reserve(self, Py_ssize_t narrays, Py_ssize_t npages) except -1:
        if narrays > SMALL_ARRAYS:
            self.bases = <char **>PyMem_Malloc(narrays * sizeof(char *))
            self.strides = <Py_ssize_t *>PyMem_Malloc(narrays * sizeof(Py_ssize_t))
            self.counts = <Py_ssize_t *>PyMem_Malloc(narrays * sizeof(Py_ssize_t))
            if not self.bases or not self.strides or not self.counts:
                raise MemoryError()
        if npages > SMALL_PAGES:
            self.pages = <int64_t *>PyMem_Malloc(npages * sizeof(int64_t))
            if not self.pages:
                raise MemoryError()
        return 0

    @property
    def token_bytes(self):
        return self.kv_heads * self.head_dim * self.itemsize


cdef inline str _array_name(Py_ssize_t a, Py_ssize_t kv_count):
    if kv_count == 2:
        return f"{'v' if a % 2 else 'k'}_pages[{a // 2}]"
    return f"k_pages[{a}]"


cdef object _resolve(object np_dtype, object explicit):
    try:
        return _dtype_cache[(np_dtype, explicit)]
    except KeyError:
        dt = resolve_dtype(np_dtype, explicit)
        if len(_dtype_cache) < 256:
            _dtype_cache[(np_dtype, explicit)] = dt
        return dt
    except TypeError:  # an unhashable explicit dtype: let resolve_dtype complain
        return resolve_dtype(np_dtype, explicit)


cdef _Plan _plan(object k_pages, object v_pages, object page_ids, object tokens,
                 object dtype, bint writable):
    cdef _Plan g = _Plan.__new__(_Plan)
    cdef Py_ssize_t layers, kv_count, narrays, a, i, npages
    cdef Py_ssize_t pt = 0, heads = 0, dim = 0, item = 0
    cdef cnp.ndarray arr, first = None
    cdef cnp.npy_intp *dims
    cdef cnp.npy_intp *st
    cdef int64_t p, top
    first_obj = None
    g.ks = k_pages if type(k_pages) is tuple else tuple(k_pages)
    layers = len(g.ks)
    if layers == 0:
        raise ValueError("k_pages is empty: a block needs at least one layer")
    if v_pages is not None:
        g.vs = v_pages if type(v_pages) is tuple else tuple(v_pages)
        if len(g.vs) != layers:
            raise ValueError(f"v_pages has {len(g.vs)} layers, k_pages has {layers}")
        kv_count = 2
    else:
        kv_count = 1
    narrays = layers * kv_count
    if type(page_ids) is not list and type(page_ids) is not tuple:
        if isinstance(page_ids, cnp.ndarray) and page_ids.dtype.kind in "iu" and page_ids.ndim == 1:
            page_ids = page_ids.astype(np.int64).tolist()
        else:
            page_ids = list(page_ids)
    npages = len(page_ids)
    g.reserve(narrays, npages)
    for a in range(narrays):
        obj = (<tuple>g.vs)[a // 2] if (kv_count == 2 and a % 2) else (<tuple>g.ks)[a // kv_count]
        if not isinstance(obj, cnp.ndarray):
            raise TypeError(f"{_array_name(a, kv_count)} must be a numpy array, "
                            f"not {type(obj).__name__}")
        arr = <cnp.ndarray>obj
        if cnp.PyArray_NDIM(arr) != 4:
            raise ValueError(
                f"{_array_name(a, kv_count)} must have 4 dimensions [num_pages, page_tokens, "
                f"kv_heads, head_dim], not shape {obj.shape}")
        dims = cnp.PyArray_DIMS(arr)
        st = cnp.PyArray_STRIDES(arr)
        if dims[0] == 0 or dims[1] == 0 or dims[2] == 0 or dims[3] == 0:
            raise ValueError(f"{_array_name(a, kv_count)} has an empty dimension: shape {obj.shape}")
        if first is None:
            first = arr
            first_obj = obj
            pt, heads, dim = dims[1], dims[2], dims[3]
            item = cnp.PyArray_ITEMSIZE(arr)
        else:
            if dims[1] != pt or dims[2] != heads or dims[3] != dim:
                raise ValueError(f"{_array_name(a, kv_count)} has pages of shape {obj.shape[1:]}, "
                                 f"k_pages[0] has {first_obj.shape[1:]}")
            if not cnp.PyArray_EquivTypes(arr.descr, first.descr):
                raise ValueError(f"{_array_name(a, kv_count)} has dtype {obj.dtype}, "
                                 f"k_pages[0] has {first_obj.dtype}")
        if ((pt > 1 and st[1] != heads * dim * item) or (heads > 1 and st[2] != dim * item)
                or (dim > 1 and st[3] != item)):
            raise ValueError(f"{_array_name(a, kv_count)}: each page must be C-contiguous "
                             f"(strides {obj.strides})")
        if writable and not cnp.PyArray_ISWRITEABLE(arr):
            raise ValueError(f"{_array_name(a, kv_count)} is read-only")
        g.bases[a] = cnp.PyArray_BYTES(arr)
        g.strides[a] = st[0]
        g.counts[a] = dims[0]
    g.dtype = _resolve(first_obj.dtype, dtype)
    if layers > MAX_U32:
        raise ValueError(f"layer count {layers} does not fit the header (u32)")
    for what, value in (("page_tokens", pt), ("kv_heads", heads), ("head_dim", dim)):
        if value > MAX_U32:
            raise ValueError(f"{what} {value} does not fit the header (u32)")

    for i in range(npages):
        g.pages[i] = operator.index(page_ids[i])
    if npages == 0:
        raise ValueError("page_ids is empty")
    top = 0
    for i in range(npages):
        p = g.pages[i]
        if p < 0:
            raise ValueError(f"page_ids[{i}] = {p} is negative")
        if p > top:
            top = p
    for a in range(narrays):
        if top >= g.counts[a]:
            for i in range(npages):
                if g.pages[i] >= g.counts[a]:
                    raise ValueError(f"page_ids[{i}] = {g.pages[i]} is out of range for "
                                     f"{_array_name(a, kv_count)} ({g.counts[a]} pages)")
    if tokens is None:
        tokens = npages * pt
    else:
        tokens = operator.index(tokens)
        if tokens < 1 or tokens > MAX_U32:
            raise ValueError(f"tokens must be in [1, 2**32), not {tokens}")
        need = -(-tokens // pt)
        if need != npages:
            raise ValueError(f"{tokens} tokens fill {need} pages of {pt} tokens, "
                             f"but {npages} page ids were given")
    if tokens > MAX_U32:
        raise ValueError(f"tokens must be in [1, 2**32), not {tokens}")
    g.narrays, g.layers, g.kv_count, g.npages, g.tokens = narrays, layers, kv_count, npages, tokens
    g.page_tokens, g.kv_heads, g.head_dim, g.itemsize = pt, heads, dim, item
    return g


def pack(k_pages, v_pages, page_ids, *, tokens=None, dtype=None, out=None):
    """Gather a block from the pages ``page_ids`` of every layer (see reference.pack)."""
    cdef _Plan g = _plan(k_pages, v_pages, page_ids, tokens, dtype, False)
    cdef size_t span = g.tokens * g.kv_heads * g.head_dim * g.itemsize
    cdef size_t page_bytes = g.page_tokens * g.kv_heads * g.head_dim * g.itemsize
    cdef size_t payload = span * g.narrays
    cdef Py_ssize_t size = HEADER_SIZE + payload
    cdef Py_buffer view
    cdef uint8_t *dst
    cdef uint8_t code = g.dtype
    if out is None:
        result = PyByteArray_FromStringAndSize(NULL, size)
        dst = <uint8_t *>PyByteArray_AS_STRING(result)
        _fill(dst, g, span, page_bytes, payload, code)
        return memoryview(result)
    _get_buffer(out, &view, True, "out")
    try:
        if view.len < size:
            raise ValueError(f"out has {view.len} bytes, the block needs {size}")
        _fill(<uint8_t *>view.buf, g, span, page_bytes, payload, code)
    finally:
        PyBuffer_Release(&view)
    mv = memoryview(out)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv[:size]


cdef int _fill(uint8_t *dst, _Plan g, size_t span, size_t page_bytes, size_t payload,
               uint8_t code) except -1:
    cdef uint32_t crc
    with nogil:
        crc = kv_gather(dst + HEADER_SIZE, g.bases, g.strides, g.narrays, g.pages, g.npages,
                        page_bytes, span, 0)
        kv_encode_header(dst, code, <uint8_t>g.kv_count, <uint32_t>g.layers,
                         <uint32_t>g.tokens, <uint32_t>g.kv_heads, <uint32_t>g.head_dim,
                         payload, crc)
    return 0


def unpack_into(buf, k_pages, v_pages, page_ids, *, dtype=None, bint verify=True):
    """Scatter a block into the pages ``page_ids`` of every layer (see
    reference.unpack_into). The checksum is computed while copying; on
    CorruptBlock the pages hold the block's (bad) bytes."""
    cdef Py_buffer view
    cdef _Plan g
    cdef size_t span, page_bytes
    cdef uint32_t actual = 0
    _get_buffer(buf, &view, False, "buf")
    try:
        header = _parse(<const uint8_t *>view.buf, view.len)
        _check_length(view.len, header)
        g = _plan(k_pages, v_pages, page_ids, header.tokens, dtype, True)
        _check_destination(header, g)
        span = g.tokens * g.kv_heads * g.head_dim * g.itemsize
        page_bytes = g.page_tokens * g.kv_heads * g.head_dim * g.itemsize
        with nogil:
            actual = kv_scatter(<const uint8_t *>view.buf + HEADER_SIZE, g.bases, g.strides,
                                g.narrays, g.pages, g.npages, page_bytes, span, verify, 0)
        if verify and actual != header.payload_checksum:
            raise CorruptBlock(
                f"payload checksum mismatch: the header says 0x{header.payload_checksum:08x}, "
                f"the payload has 0x{actual:08x}")
        return header
    finally:
        PyBuffer_Release(&view)


cdef int _check_destination(object header, _Plan g) except -1:
    cdef Py_ssize_t i = 0, j
    if header.layers != g.layers:
        raise ValueError(f"the block has {header.layers} layers, k_pages has {g.layers}")
    if header.kv_count == 2 and g.kv_count == 1:
        raise ValueError("the block has K and V, but v_pages is None")
    if header.kv_count == 1 and g.kv_count == 2:
        raise ValueError("the block has no V (kv_count 1), but v_pages was given")
    if header.kv_heads != g.kv_heads or header.head_dim != g.head_dim:
        raise ValueError(
            f"the block has {header.kv_heads} kv heads x {header.head_dim} head dim, "
            f"the pages have {g.kv_heads} x {g.head_dim}")
    if header.dtype is not g.dtype:
        raise ValueError(f"the block holds {header.dtype.label}, the pages hold {g.dtype.label}")
    if g.npages <= 256:
        j = kv_first_repeat(g.pages, g.npages, &i)
        if j >= 0:
            raise ValueError(f"page_ids[{j}] = {g.pages[j]} repeats page_ids[{i}]")
    else:
        seen = {}
        for j in range(g.npages):
            i = seen.setdefault(g.pages[j], j)
            if i != j:
                raise ValueError(f"page_ids[{j}] = {g.pages[j]} repeats page_ids[{i}]")
    return 0


# -- chained block keys -----------------------------------------------------------

_KEY_DOMAIN = b"kvstore/block_keys/v1"
_blake2b = hashlib.blake2b


def _bad_token(i, t):
    return ValueError(f"tokens[{i}] = {t} is not a valid token id (0 <= id < 2**32)")


cdef bytes _encode_tokens(object tokens):
    """Token ids as u32 LE (checked as reference.block_keys checks them)."""
    cdef cnp.ndarray arr
    cdef Py_ssize_t n, i, bad
    cdef int overflow = 0
    cdef long long v
    cdef int64_t *ids
    cdef bytes enc
    if isinstance(tokens, cnp.ndarray) and tokens.ndim == 1 and tokens.dtype.kind in "iu":
        arr = tokens
        if arr.shape[0] and (arr.min() < 0 or arr.max() > MAX_U32):
            i = int(np.flatnonzero((arr < 0) | (arr > MAX_U32))[0])
            raise _bad_token(i, int(arr[i]))
        return np.ascontiguousarray(arr, dtype="<u4").tobytes()
    seq = tokens if (type(tokens) is list or type(tokens) is tuple) else list(tokens)
    n = len(seq)
    ids = <int64_t *>PyMem_Malloc(max(n, 1) * sizeof(int64_t))
    if not ids:
        raise MemoryError()
    try:
        for i in range(n):
            t = seq[i]
            if type(t) is not int:
                t = operator.index(t)
            v = PyLong_AsLongLongAndOverflow(t, &overflow)
            ids[i] = -1 if overflow else v  # -1: flagged below
        enc = PyBytes_FromStringAndSize(NULL, 4 * n)
        bad = kv_encode_tokens_i64(<uint8_t *>PyBytes_AS_STRING(enc), ids, n)
        if bad >= 0:
            raise _bad_token(bad, operator.index(seq[bad]))
        return enc
    finally:
        PyMem_Free(ids)


def block_keys(tokens, block_tokens, namespace_salt, extra=b""):
    """One 32-byte key per full block (see reference.block_keys). The token ids
    are encoded in C; the hashing is hashlib's BLAKE2b, one call per block."""
    cdef Py_ssize_t nb, nblocks, b, body
    cdef bytes enc
    cdef const uint8_t *src
    cdef uint8_t *m
    for name, value in (("namespace_salt", namespace_salt), ("extra", extra)):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    bt = operator.index(block_tokens)
    if bt < 1 or bt > MAX_U32:
        raise ValueError(f"block_tokens must be in [1, 2**32), not {bt}")
    nb = bt
    enc = _encode_tokens(tokens)
    body = 4 * nb
    nblocks = PyBytes_GET_SIZE(enc) // body
    salt = bytes(namespace_salt)
    parent = _blake2b(_KEY_DOMAIN + len(salt).to_bytes(4, "little") + salt,
                      digest_size=32).digest()
    extra = bytes(extra)
    msg = bytearray(32 + 4 + body + 4 + len(extra))
    msg[32:36] = bt.to_bytes(4, "little")
    msg[36 + body:] = len(extra).to_bytes(4, "little") + extra
    m = <uint8_t *>PyByteArray_AS_STRING(msg)
    src = <const uint8_t *>PyBytes_AS_STRING(enc)
    keys = []
    for b in range(nblocks):
        memcpy(m, PyBytes_AS_STRING(parent), 32)
        memcpy(m + 36, src + b * body, body)
        parent = _blake2b(msg, digest_size=32).digest()
        keys.append(parent)
    return keys


# --------------------------------------------------------------------------- compact index

@cython.boundscheck(False)
@cython.wraparound(False)
def cold_contains(const uint64_t[:, ::1] key_col not None, const uint64_t[::1] hash_col not None,
                  const int32_t[::1] table not None, int shift, const uint64_t[::1] mult not None,
                  uint64_t salt, const uint8_t[::1] joined not None):
    """kvstore.coldindex.ColdIndex.contains_many's probe, for 32-byte keys
    joined into ``joined``: one byte per key, 1 when the key's row is in the
    table. Same hash (multiply-shift over the four words, plus the salt),
    same linear probing, same match rule (hash and all four words equal) as
    the numpy version, which is the specification; the tests compare them."""
    cdef Py_ssize_t n = joined.shape[0] // 32
    cdef Py_ssize_t i, mask = table.shape[0] - 1, cell
    cdef uint64_t w[4]
    cdef uint64_t h
    cdef int32_t row
    cdef bytearray out = bytearray(n)
    cdef uint8_t *o = <uint8_t *>PyByteArray_AS_STRING(out)
    if joined.shape[0] != n * 32:
        raise ValueError("joined keys must be 32 bytes each")
    if mult.shape[0] != 4 or key_col.shape[1] != 4 or table.shape[0] & mask:
        raise ValueError("bad compact-index arrays")
    if shift < 1 or shift > 63 or table.shape[0] != (<Py_ssize_t>1) << (64 - shift):
        raise ValueError("the table must have 2**(64 - shift) cells")
    cdef Py_ssize_t rows = min(key_col.shape[0], hash_col.shape[0])
    with nogil:
        for i in range(n):
            memcpy(w, &joined[i * 32], 32)
            h = w[0] * mult[0] + w[1] * mult[1] + w[2] * mult[2] + w[3] * mult[3] + salt
            cell = <Py_ssize_t>(h >> shift)
            while True:
                row = table[cell]
                if row == -1:
                    break
                if 0 <= row < rows and hash_col[row] == h and key_col[row, 0] == w[0] \
                        and key_col[row, 1] == w[1] and key_col[row, 2] == w[2] \
                        and key_col[row, 3] == w[3]:
                    o[i] = 1
                    break
                cell = (cell + 1) & mask
    return bytes(out)


# --------------------------------------------------------------------------- busy poll

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    enum: CLOCK_MONOTONIC


cdef int kv_spin_yield = 1


def _spin_yield(on=None):
    """Whether the busy poll yields the CPU between polls (tests and
    benchmarks only); set it with ``on``. Returns the previous setting."""
    global kv_spin_yield
    old = bool(kv_spin_yield)
    if on is not None:
        kv_spin_yield = 1 if on else 0
    return old


cdef inline long long _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


def wait_readable(int fd, long long spin_ns):
    """kvstore._spin.wait_readable (the specification): poll ``fd`` with a
    zero timeout, the GIL released, until it is readable (or has an error or
    hang-up, which the caller's receive then reports) or ``spin_ns``
    nanoseconds have passed, yielding the CPU between polls. True when it
    became ready, False when the time ran out (the caller then waits in the
    kernel as usual)."""
    cdef pollfd p
    cdef int ready = 0
    cdef long long deadline
    if fd < 0:
        raise ValueError(f"not an open file descriptor: {fd}")
    if spin_ns <= 0:
        return False
    p.fd = fd
    p.events = POLLIN
    with nogil:
        deadline = _now_ns() + spin_ns
        while True:
            p.revents = 0
            ready = poll(&p, 1, 0)
            if ready != 0 or _now_ns() >= deadline:
                break
            if kv_spin_yield:
                sched_yield()
    return ready != 0
