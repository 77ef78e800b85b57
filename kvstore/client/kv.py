"""Engine-facing helpers: blocks packed from, and unpacked into, an engine's
paged KV cache (per layer, K and V arrays ``[num_pages, page_tokens,
kv_heads, head_dim]``), in the kvstore block format (docs/block-format.md).

Keys come from token ids with :func:`kvstore.block.block_keys` (chained
BLAKE2b-256, salted per namespace), one per full block.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from kvstore.block import pack, unpack_into

PageArrays = Sequence[Any]  # numpy arrays, one per layer


def check_lists(keys: Sequence[bytes], page_lists: Sequence[Sequence[int]], *,
                distinct: bool = False) -> None:
    """One page list per key; ``distinct`` (a read into the pages): no page
    twice, since the block unpacked later would overwrite the earlier one's
    page while the count returned says both were restored."""
    if len(keys) != len(page_lists):
        raise ValueError(f"{len(keys)} keys but {len(page_lists)} page lists: one list of "
                         "page ids per block")
    if not distinct:
        return
    seen: set[Any] = set()
    named = 0
    try:
        for ids in page_lists:
            named += len(ids)  # (first: an iterator is not consumed here)
            seen.update(ids)
    except TypeError:
        pass  # (an odd page list: the loop below names what is wrong)
    else:
        if len(seen) == named:
            return  # (every page once: the loop below, 10x slower, finds which twice)
    owner: dict[int, int] = {}  # page -> the first block that names it
    named = 0
    for block, ids in enumerate(page_lists):
        for page in ids:
            try:
                page = operator.index(page)
            except TypeError:
                return  # (the unpack refuses a page id that is not an int, naming it)
            named += 1
            first = owner.setdefault(page, block)
            if len(owner) != named:
                where = (f"page_lists[{block}] names page {page} twice" if first == block else
                         f"page {page} is in page_lists[{first}] and page_lists[{block}]")
                raise ValueError(f"{where}: each block needs pages of its own")


def check_page_ids(k_pages: PageArrays, v_pages: PageArrays | None,
                   page_lists: Sequence[Sequence[int]]) -> None:
    """Every page id names a page the arrays have, checked before a read is
    sent: found out as each block was scattered, a bad id for a later block
    raised after the earlier ones had been written into the engine's pages
    (and the count of those restored was lost). Arrays without a shape are
    left to the unpack, which names what is wrong with them."""
    counts = []
    for arr in [*k_pages, *(v_pages if v_pages is not None else ())]:
        shape = getattr(arr, "shape", None)
        if not shape:
            return
        counts.append(shape[0])
    if not counts:
        return
    pages = min(counts)
    for block, ids in enumerate(page_lists):
        try:
            bad = [p for p in ids if not 0 <= operator.index(p) < pages]
        except TypeError:
            return  # (a page id that is not an int: the unpack names it)
        if bad:
            raise ValueError(f"page_lists[{block}] names page {bad[0]}, but the page arrays "
                             f"hold {pages} pages (ids 0..{pages - 1}): nothing was read")


def pack_blocks(k_pages: PageArrays, v_pages: PageArrays | None,
                page_lists: Sequence[Sequence[int]], *, dtype: Any = None,
                block_tokens: int | None = None) -> list[memoryview]:
    """One packed block per page list (gathered from every layer)."""
    return [pack(k_pages, v_pages, ids, tokens=block_tokens, dtype=dtype) for ids in page_lists]


def unpack_prefix(found: Sequence[Any], k_pages: PageArrays, v_pages: PageArrays | None,
                  page_lists: Sequence[Sequence[int]], *, dtype: Any = None) -> int:
    """Scatter the leading found blocks into their pages (each verified);
    stops at the first miss. Returns how many blocks were restored."""
    restored = 0
    for data, ids in zip(found, page_lists, strict=True):
        if data is None:
            break
        unpack_into(data, k_pages, v_pages, ids, dtype=dtype, verify=True)
        restored += 1
    return restored
