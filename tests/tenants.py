"""A quiet tenant and a noisy one on the same server: the quiet tenant's hit
rate, for the quota tests (tests/e2e/test_quota*.py)."""

from __future__ import annotations

from kvstore import Client


def quiet_hit_rate(target: str, noisy: bool, *, block: int, quiet_blocks: int,
                   noisy_per_round: int, rounds: int, ack: str = "memory") -> float:
    """The quiet tenant reads its working set each round (putting back what
    it misses); between rounds the noisy tenant puts new blocks, never read
    again. Every hit is checked byte for byte."""
    keys = [b"q%03d" % i for i in range(quiet_blocks)]
    value = {k: bytes([i]) * block for i, k in enumerate(keys)}
    hits = reads = 0
    with Client(target, namespace="quiet") as quiet, Client(target, namespace="noisy") as flood:
        quiet.put(value, ack=ack)
        for r in range(rounds):
            got = quiet.get(keys)
            assert all(g is None or g == value[k] for k, g in zip(keys, got, strict=True))
            hits += sum(g is not None for g in got)
            reads += len(keys)
            missed = {k: value[k] for k, g in zip(keys, got, strict=True) if g is None}
            if missed:
                quiet.put(missed, ack=ack)
            if noisy:
                flood.put({b"n%02d-%03d" % (r, i): b"\xee" * block
                           for i in range(noisy_per_round)}, ack=ack)
    return 100.0 * hits / reads
