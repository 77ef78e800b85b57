"""Garbage-collector settings for the server process (the SDK and the store leave
the collector alone; the glibc tuning they share is in :mod:`kvstore._malloc`).

The index holds one long-lived object or more per block (millions at scale),
and the cyclic collector's older generations scan all of them: a collection
in the middle of a call adds milliseconds to it. After start (when the index
has been rebuilt from L2) everything that exists is moved to the permanent
generation, which collections skip, and young collections run less often.
Nothing in the data path relies on reference cycles being collected quickly.
"""

from __future__ import annotations

import gc

GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
