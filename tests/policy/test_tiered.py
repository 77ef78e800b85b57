"""The three-tier replay (bench/replay/tiered.py): hand-worked moves between tiers, the
policy's DROP, and the session policy ranking once per change when tiers take turns."""

from __future__ import annotations

from array import array
from typing import Any

import pytest

from bench.replay.tiered import simulate_tiers
from bench.replay.workloads import (
    AGENT_DIR,
    HINT,
    REQ,
    Workload,
    _count,
    agent_files,
    agent_workload,
    load_sessions,
)
from kvstore.policy import POLICIES
from kvstore.policy.session import SessionPolicy
from kvstore.types import SessionEnd, SessionEvent, TierName

L1, L2, L3 = TierName.L1, TierName.L2, TierName.L3


def workload(events: list[tuple[str, Any]]) -> Workload:
    """(stream, blocks) requests, or (stream, "end") for that stream's SessionEnd
    ((stream, "discard"): with discard)."""
    ev: list[Any] = []
    for i, (stream, what) in enumerate(events):
        if what in ("end", "discard"):
            end = SessionEnd(discard=what == "discard")
            ev.append((float(i), HINT, stream, SessionEvent("ns", stream, end)))
        else:
            ev.append((float(i), REQ, stream, array("q", what)))
    return _count(Workload("hand", 1, ev))


def test_lru_hand_worked_moves_between_tiers() -> None:
    w = workload([("s", [1, 2]), ("s", [3]), ("s", [4]), ("s", [1, 2, 3])])
    caps = {L1: 2, L2: 3, L3: 0}
    r = simulate_tiers(w, POLICIES["lru"](list(caps)), caps)
    # [1,2]: both Put (L1 + written behind to L2). [3]: L1 demotes 1 (L2 has it).
    # [4]: L1 demotes 2; L2 is full, demotes 1 to L3. [1,2,3]: 3 from L1, 1 from L3 and
    # 2 from L2, both promoted into L1 (demoting 4, then 3, which L2 still holds).
    assert r.hits == {"l1": 1, "l2": 1, "l3": 1}
    assert r.refs == 7 and r.refs - r.all_hits == 4
    assert r.writes == {"l1": 6, "l2": 4, "l3": 1}
    assert r.promotions == 2 and r.drops == 0
    d = r.as_dict(tokens_per_block=1)
    assert d["l2_writes_per_hit"] == pytest.approx(4 / 3)
    assert d["l3_writes_per_hit"] == pytest.approx(1 / 3)


def test_without_l3_an_l2_eviction_loses_the_block() -> None:
    w = workload([("s", [1, 2]), ("s", [3]), ("s", [4]), ("s", [1])])
    caps = {L1: 2, L2: 3}
    r = simulate_tiers(w, POLICIES["lru"](list(caps)), caps)
    # [4]: L2 is full and evicts 1, which no tier holds then: recomputed at [1], whose
    # write-behind to L2 evicts 2 the same way
    assert r.hits == {"l1": 0, "l2": 0, "l3": 0}
    assert r.drops == 2


def test_session_end_blocks_leave_l1_for_l2_unless_discarded() -> None:
    # a's blocks are dead once a ends; b's Put evicts one of them from L1. It goes to
    # L2 as every Put does (c reads it from there), as under LRU (hardening item 7:
    # it used to be dropped from every tier); with SessionEnd(discard) it leaves the
    # store (c recomputes it).
    caps = {L1: 2, L2: 4}
    for end, drops, l2_hits in (("end", 0, 1), ("discard", 1, 0)):
        events: list[tuple[str, Any]] = [("a", [1, 2]), ("a", end), ("b", [3]),
                                         ("c", [1, 2])]
        sess = simulate_tiers(workload(events), SessionPolicy(list(caps)), caps)
        assert sess.drops == drops, end
        assert sess.hits == {"l1": 1, "l2": l2_hits, "l3": 0}, end
    lru = simulate_tiers(workload([("a", [1, 2]), ("a", "end"), ("b", [3]), ("c", [1, 2])]),
                         POLICIES["lru"](list(caps)), caps)
    assert lru.drops == 0
    assert lru.hits == {"l1": 1, "l2": 1, "l3": 0}


def test_policy_tiers_must_match() -> None:
    w = workload([("s", [1])])
    with pytest.raises(ValueError, match="policy tiers"):
        simulate_tiers(w, POLICIES["lru"]([L1]), {L1: 1, L2: 1})


def test_session_ranks_once_per_change_when_tiers_take_turns() -> None:
    """A store evicts from L1 and L2 in turn; each tier's ranking must survive the other
    tier's victim calls (it used to be rebuilt at every call)."""
    p = SessionPolicy([L1, L2])
    p.on_request(list(range(20)), 0.0, "s")
    for b in range(20):
        p.on_insert(L1, b, 1, 0.0, "s")
        p.on_insert(L2, b, 1, 0.0, "s")
    built = []
    real = p._ranking

    def counted(tier: TierName, ts: Any, now: float) -> Any:
        built.append(tier)
        return real(tier, ts, now)

    p._ranking = counted  # type: ignore[method-assign]
    for i in range(6):
        tier = (L1, L2)[i % 2]
        v = p.victim(tier, 0.5, None)
        assert v is not None
        p.on_remove(tier, v[0])
    assert built == [L1, L2]


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_agent_smoke_every_policy() -> None:
    sessions = load_sessions(agent_files()[:3], max_requests=25)
    w = agent_workload(sessions, 1, seed=3, hints="session_end")
    caps = {L1: max(1, w.n_unique // 20), L2: max(1, w.n_unique // 5), L3: 0}
    for name, cls in POLICIES.items():
        r = simulate_tiers(w, cls(list(caps)), caps)
        assert r.refs == w.n_refs, name
        # L3 without a limit keeps every block ever written: only first references miss
        assert r.refs - r.all_hits <= w.n_unique, name


@pytest.mark.skipif(not AGENT_DIR.is_dir(), reason=f"agent traces absent at {AGENT_DIR}")
def test_tiered_and_headroom_scripts_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.replay import headroom, tiered

    assert tiered.main(["--runs", "a:2", "--max-sessions", "6", "--policies",
                        "lru,session+end"]) == 0
    out = capsys.readouterr().out
    assert "| agent-a K=2 | session+end |" in out
    assert headroom.main(["--cells", "a:2:5", "--max-sessions", "6"]) == 0
    out = capsys.readouterr().out
    assert "gap at request" in out and "| mean |" in out


def test_headroom_hints_only_add_information() -> None:
    """The diagnostic's rewritten workloads keep every request and only change hints."""
    from bench.replay.headroom import gap_at_turn_end, long_tool_bit
    from kvstore.types import TurnEnd, TurnEndReason

    ev: list[Any] = [
        (0.0, REQ, "s", array("q", [1])),
        (1.0, HINT, "s", SessionEvent("ns", "s", TurnEnd(TurnEndReason.TOOL_CALL))),
        (100.0, REQ, "s", array("q", [1, 2])),
        (101.0, HINT, "s", SessionEvent("ns", "s", TurnEnd(TurnEndReason.TOOL_CALL))),
        (105.0, REQ, "s", array("q", [1, 2, 3])),
    ]
    w = _count(Workload("hand", 1, ev))
    bit = long_tool_bit(w, 60.0)
    assert [e[3].event.reason for e in bit.events if e[1] == HINT] == [
        TurnEndReason.AWAITING_USER, TurnEndReason.TOOL_CALL]
    told = gap_at_turn_end(w)
    assert [e[3].event.expected_gap_ms for e in told.events if e[1] == HINT] == [99001, 4001]
    assert [e for e in told.events if e[1] == REQ] == [e for e in w.events if e[1] == REQ]
