"""A SessionEnd under the session policy in a live server (hardening item 7): the
session's blocks are the first to leave L1, but they reach L2 first, as every
Put does (ack=memory included), unless the client says discard."""

from __future__ import annotations

import os

from kvstore import Client
from kvstore.types import SessionEnd

KiB = 1024


def _ended_then_pushed_out(server_factory, discard: bool) -> tuple[dict[bytes, bytes], list]:  # type: ignore[no-untyped-def]
    with server_factory("--policy-name", "session", "--policy-session-duel", "false",
                        "--l2-capacity", "64MiB",
                        l1_capacity="16MiB") as server, Client(server.tcp, namespace="se") as c:
        blocks = {f"s{i:03}".encode(): os.urandom(64 * KiB) for i in range(100)}
        assert c.lookup(list(blocks), session_id="done").found == 0
        for k, v in blocks.items():
            assert c.put({k: v}, session_id="done", ack="memory").stored == 1
        c.session_event("done", SessionEnd(discard=discard))
        # another session fills L1 several times over: the ended one's blocks go first
        for turn in range(6):
            keys = [f"n{turn}-{i:03}".encode() for i in range(128)]
            c.lookup(keys, session_id="next")
            c.put({k: os.urandom(64 * KiB) for k in keys}, session_id="next", ack="memory")
        return blocks, c.get(list(blocks))


def test_session_end_keeps_memory_puts_in_l2(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Regression: 64 of 100 ack=memory blocks were gone after SessionEnd (dropped
    from L1 without their L2 write); LRU kept all 100."""
    blocks, got = _ended_then_pushed_out(server_factory, discard=False)
    assert got == list(blocks.values())


def test_session_end_with_discard_lets_blocks_go(server_factory) -> None:  # type: ignore[no-untyped-def]
    blocks, got = _ended_then_pushed_out(server_factory, discard=True)
    assert all(g is None or g == v for g, v in zip(got, blocks.values(), strict=True))
    assert sum(g is None for g in got) > 0
