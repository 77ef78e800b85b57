# Signatures of the Cython extension kvstore._native (native/_native.pyx), for
# mypy and editors. kvstore/_impl.py is the only module that imports the
# extension; it also checks (under mypy) that the pure-Python reference,
# kvstore.block.reference, has these same signatures.

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

from kvstore.block.format import BlockHeader, DType

IMPLEMENTATION: Final[str]

# -- checksum (CRC-32C) --------------------------------------------------------------

def crc32c_implementations() -> list[str]: ...
def crc32c_implementation() -> str: ...
def _use_crc32c(name: str | None = None) -> str: ...
def _streaming_store_threshold(n: int | None = None) -> int: ...
def _prefetch_lines(n: int | None = None) -> int: ...
def checksum(data: Buffer, seed: int = 0) -> int: ...
def copy_and_checksum(dst: Buffer, dst_offset: int, src: Buffer, seed: int = 0,
                      streaming: bool | None = None) -> int: ...
def copy_into(dst: Buffer, src: Buffer, offset: int = 0) -> int: ...

# -- block format --------------------------------------------------------------------

def parse_header(buf: Buffer) -> BlockHeader: ...
def verify(buf: Buffer) -> BlockHeader: ...
def pack(k_pages: Sequence[np.ndarray], v_pages: Sequence[np.ndarray] | None,
         page_ids: Sequence[int], *, tokens: int | None = None,
         dtype: DType | str | int | None = None, out: Buffer | None = None) -> memoryview: ...
def unpack_into(buf: Buffer, k_pages: Sequence[np.ndarray],
                v_pages: Sequence[np.ndarray] | None, page_ids: Sequence[int], *,
                dtype: DType | str | int | None = None, verify: bool = True) -> BlockHeader: ...
def block_keys(tokens: Sequence[int] | np.ndarray, block_tokens: int,
               namespace_salt: bytes, extra: bytes = b"") -> list[bytes]: ...

# -- compact index (kvstore.coldindex) -----------------------------------------------

def cold_contains(key_col: npt.NDArray[np.uint64], hash_col: npt.NDArray[np.uint64],
                  table: npt.NDArray[np.int32], shift: int, mult: npt.NDArray[np.uint64],
                  salt: int, joined: Buffer) -> bytes: ...

# -- busy poll (kvstore._spin is the specification) ------------------------------------

def wait_readable(fd: int, spin_ns: int) -> bool: ...
