"""Garbage-collector settings for the server process (the SDK and the store leave
the collector alone; the glibc tuning they share is in :mod:`kvstore._malloc`).

The index holds one long-lived object or more per block (millions at scale),
and the cyclic collector's older generations scan all of them: a collection
in the middle of a call adds milliseconds to it. After start (when the index
has been rebuilt from L2) everything that exists is moved to the permanent
generation, which collections skip, and young collections run less often.
Nothing in the data path relies on reference cycles being collected quickly,
except grpc's receivers of request streams left unread (failed or cancelled
Puts): see :func:`note_abandoned_stream`.
"""

from __future__ import annotations

import asyncio
import gc

GEN0_THRESHOLD = 50_000
#: Request streams left unread between two young collections (see
#: :func:`note_abandoned_stream`).
ABANDONED_STREAMS_PER_COLLECT = 16
COLLECT_DELAY_S = 0.05
_abandoned = 0


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)


def note_abandoned_stream() -> None:
    """A call ended before its request stream was read to the end (a Put that
    failed or was cancelled). grpc's receiver of the stream and the generator
    inside it hold each other, and the last message received with them (up
    to server.max_message_bytes), until the cyclic collector runs: with the
    threshold above that is after ~50,000 new objects, and such a call makes
    a few dozen (4,000 failed 1 MiB Puts held 3.9 GB, past the memory
    bound). Every ABANDONED_STREAMS_PER_COLLECT of them the young
    generations are collected (a millisecond or two), a moment after the
    call has ended (collected from inside it, its own receiver, still held,
    moved to the old generation for good: 1 MiB per 16 failed Puts)."""
    global _abandoned
    _abandoned += 1
    if _abandoned == ABANDONED_STREAMS_PER_COLLECT:
        asyncio.get_running_loop().call_later(COLLECT_DELAY_S, _collect_young)


def _collect_young() -> None:
    global _abandoned
    _abandoned = 0
    gc.collect(1)
