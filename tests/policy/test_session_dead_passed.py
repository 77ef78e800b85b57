"""A dead block (no live stream references it) the ranking passes over —
pinned, or not evictable in that call (a quota's victim of another
namespace) — stays first in line: it used to leave the dead queue for good,
resident and ownerless, while live blocks were evicted before it."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from kvstore.policy.session import SessionPolicy
from kvstore.types import SessionEvent, TierName, TurnEnd, TurnEndReason

L1 = TierName.L1


def _policy() -> tuple[SessionPolicy, set[str], Callable[[str, list[str], float], None]]:
    p = SessionPolicy([L1], learn=False)
    resident: set[str] = set()

    def request(stream: str, blocks: list[str], now: float) -> None:
        p.on_request(blocks, now, stream)
        for b in blocks:
            if b in resident:
                p.on_hit(L1, b, now, stream)
            else:
                resident.add(b)
                p.on_insert(L1, b, 1, now, stream)

    request("A", ["a1", "a2", "a3"], 0.0)
    request("B", ["b1", "b2", "b3"], 1.0)
    p.on_session_event(SessionEvent("ns", "B", TurnEnd(TurnEndReason.TOOL_CALL)), 1.5)
    request("A", ["a1"], 2.0)  # A's context compacted: a2 and a3 are dead
    return p, resident, request


@pytest.mark.parametrize("passed_by", ["nothing", "pin", "evictable"])
def test_a_dead_block_passed_over_goes_first_later(passed_by: str) -> None:
    p, resident, _ = _policy()
    if passed_by == "pin":
        p.pin(["a2", "a3"], until=3.5)
        first = p.victim(L1, 3.0)
    elif passed_by == "evictable":  # (a victim of namespace "b" only)
        first = p.victim(L1, 3.0, lambda b: str(b).startswith("b"))
    else:
        first = p.victim(L1, 3.0)
    assert first is not None
    resident.discard(first[0])
    p.on_remove(L1, first[0])
    if passed_by == "nothing":
        assert first[0] == "a2"
        return
    assert first[0] not in ("a2", "a3")
    # Pins over, no filter; the next ranking (a request, or rerank_s later):
    later = []
    for now in (6.0, 6.1):
        v = p.victim(L1, now)
        assert v is not None
        later.append(v[0])
        resident.discard(v[0])
        p.on_remove(L1, v[0])
    assert later == ["a2", "a3"]
