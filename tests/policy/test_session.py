"""Behaviour of the session policy with a fake clock (time is just the ``now`` argument)."""

from __future__ import annotations

from typing import Any

from kvstore.policy.base import Action
from kvstore.policy.session import SessionPolicy
from kvstore.policy.session.gaps import TOOL as TOOL_CLASS
from kvstore.policy.session.gaps import USER as USER_CLASS
from kvstore.types import SessionEnd, SessionEvent, TierName, TurnEnd, TurnEndReason

L1, L2 = TierName.L1, TierName.L2
TOOL, USER = TurnEndReason.TOOL_CALL, TurnEndReason.AWAITING_USER


class Cache:
    """A one-tier cache of ``cap`` blocks driven like the simulator drives it."""

    def __init__(self, policy: SessionPolicy, cap: int) -> None:
        self.p, self.cap = policy, cap
        self.res: set[Any] = set()
        self.evicted: list[tuple[Any, Action]] = []

    def request(self, session: str, blocks: list[Any], now: float) -> int:
        self.p.on_request(blocks, now, session)
        hits = 0
        for b in blocks:
            if b in self.res:
                hits += 1
                self.p.on_hit(L1, b, now, session)
                continue
            while len(self.res) >= self.cap:
                v = self.p.victim(L1, now)
                assert v is not None
                self.evicted.append(v)
                self.res.discard(v[0])
                self.p.on_remove(L1, v[0])
            self.res.add(b)
            self.p.on_insert(L1, b, 1, now, session)
        return hits

    def turn_end(self, session: str, reason: TurnEndReason, now: float) -> None:
        self.p.on_session_event(SessionEvent("ns", session, TurnEnd(reason)), now)

    def end(self, session: str, now: float) -> None:
        self.p.on_session_event(SessionEvent("ns", session, SessionEnd()), now)


def test_tool_call_hint_keeps_blocks_lru_would_drop() -> None:
    c = Cache(SessionPolicy([L1], learn=False), cap=4)
    c.request("A", ["a1", "a2"], 0.0)
    c.request("B", ["b1", "b2"], 1.0)
    c.turn_end("A", TOOL, 2.0)  # A is back within seconds
    c.turn_end("B", USER, 2.0)  # B waits for a person
    c.request("C", ["c1"], 3.0)
    # LRU would evict a1 (oldest); the session policy evicts from B, the end of its context
    assert c.evicted == [("b2", Action.DROP)]
    assert c.request("A", ["a1", "a2", "a3"], 4.0) == 2


def test_turn_ends_resent_without_requests_do_not_keep_a_stream_young() -> None:
    """A hostile tenant's streams Put their blocks once, then sent a TurnEnd
    every few seconds: each one reset the stream's age, so its unread blocks
    outranked every honest stream's (another tenant fell 19 points below LRU
    in the review). At most TURN_ENDS_PER_USE turn ends count per use of the
    stream (a second one now and then is in the traces)."""
    c = Cache(SessionPolicy([L1], learn=False, duel=False), cap=4)
    c.request("hostile", ["h1", "h2"], 0.0)
    c.turn_end("hostile", TOOL, 1.0)
    for t in range(100, 200):
        c.turn_end("hostile", TOOL, float(t))  # no request in between: the first counts
        c.turn_end("never-asked", TOOL, float(t))  # a stream that never made one
    c.request("honest", ["o1", "o2"], 150.0)
    c.turn_end("honest", TOOL, 151.0)
    c.request("third", ["t1"], 200.0)
    assert c.evicted == [("h2", Action.DROP)]  # the older turn end's stream gives way


def test_a_turn_end_after_reads_or_puts_alone_counts() -> None:
    """Engines whose turns Get (or ShmAcquire) and Put with a session id but
    send no Lookup (the vLLM tier for keys it knows, the GPU path's leased
    reads): their turn ends count; one resent with nothing since does not."""
    p = SessionPolicy([L1], learn=False, duel=False)
    p.on_insert(L1, "g1", 1, 0.0, "G")
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(TOOL)), 1.0)
    assert p._streams["G"].cls == TOOL_CLASS
    p.on_hit(L1, "g1", 2.0, "G")
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(USER)), 3.0)
    assert p._streams["G"].cls == USER_CLASS
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(TOOL)), 4.0)  # a second: counts
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(USER)), 5.0)  # a third: not
    assert (p._streams["G"].cls, p._streams["G"].t_state) == (TOOL_CLASS, 4.0)


def test_a_write_back_or_demotion_finishing_is_no_use_of_the_stream() -> None:
    """The store tells the policy of a block's L2 write or L3 upload with the
    block's session: that re-armed a resent TurnEnd (other tenants' pressure
    starts those writes). Only first-tier inserts and hits are uses."""
    p = SessionPolicy([L1, L2], learn=False, duel=False)
    p.on_insert(L1, "g1", 1, 0.0, "G")
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(TOOL)), 1.0)
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(TOOL)), 2.0)
    p.on_insert(L2, "g1", 1, 50.0, "G")  # its write-back to L2 ends
    p.on_session_event(SessionEvent("ns", "G", TurnEnd(TOOL)), 100.0)
    assert p._streams["G"].t_state == 2.0


def test_compacted_blocks_go_first_and_are_dropped() -> None:
    c = Cache(SessionPolicy([L1, L2], learn=False), cap=4)
    c.request("A", ["p", "x", "y"], 0.0)
    c.turn_end("A", TOOL, 1.0)
    c.request("A", ["p", "s"], 2.0)  # context compacted: x, y fell out
    c.request("B", ["b1", "b2"], 3.0)
    assert sorted(b for b, _ in c.evicted) == ["x", "y"]
    # dead blocks leave the first tier for L2 all the same (never lost on the way)
    assert all(a == Action.DEMOTE for _, a in c.evicted)
    p = c.p
    # on an upper tier a live block is demoted, a dead one dropped
    p.on_insert(L2, "q", 1, 0.0)
    p.on_insert(L1, "q", 1, 0.0, "A")
    v = p.victim(L1, 4.0)
    assert v is not None and v[1] == Action.DEMOTE


def test_session_end_drops_private_blocks_first_keeps_shared_prefix() -> None:
    c = Cache(SessionPolicy([L1], learn=False), cap=8)
    c.request("P", ["sys1", "sys2", "p1", "p2"], 0.0)  # parent
    c.turn_end("P", TOOL, 1.0)  # waiting for its sub-agent
    c.request("P/sub", ["sys1", "sys2", "s1", "s2"], 2.0)  # shares the prefix
    c.turn_end("P/sub", TOOL, 3.0)
    c.end("P/sub", 4.0)
    c.request("Q", ["q1", "q2", "q3"], 5.0)  # needs 3 slots of 6 used + 2 free
    first = c.evicted[:1]
    assert first[0][0] in ("s1", "s2") and first[0][1] == Action.DROP
    c.request("Q", ["q1", "q2", "q3", "q4", "q5"], 6.0)
    evicted = [b for b, _ in c.evicted]
    assert set(evicted[:2]) == {"s1", "s2"}
    assert "sys1" not in evicted and "sys2" not in evicted
    # the parent comes back: its shared prefix is still there
    assert c.request("P", ["sys1", "sys2"], 7.0) == 2


def test_learns_gaps_per_hint_class() -> None:
    p = SessionPolicy([L1])
    for i in range(50):
        t = 100.0 * i
        p.on_request(["a"], t, "A")
        p.on_session_event(SessionEvent("ns", "A", TurnEnd(TOOL)), t + 1)
    # tool-call gaps observed: ~99 s; the prior said 10 s
    rem = p.gaps.remaining(2, 0.0)
    assert 60.0 < rem < 140.0


def test_ghost_lru_fallback_when_hints_are_wrong() -> None:
    """Hints say A comes back soon and B late; the truth is the reverse. With learning off,
    only the ghost-LRU comparison can notice: after a few rounds the policy follows LRU."""
    p = SessionPolicy([L1], learn=False, trust_limit=8)
    c = Cache(p, cap=8)
    b_hits = []
    for r in range(12):
        t = 1000.0 * r
        c.request("A", ["a1", "a2"], t)
        c.turn_end("A", TOOL, t + 1)  # wrong: A returns only next round
        c.request("B", ["b1", "b2"], t + 2)
        c.turn_end("B", USER, t + 3)  # wrong: B returns within seconds
        c.request("C", [f"c{r}.{i}" for i in range(6)], t + 4)  # pressure
        b_hits.append(c.request("B", ["b1", "b2"], t + 5))
        c.turn_end("B", USER, t + 6)
    assert p.trust < 0
    assert b_hits[-1] == 2 and b_hits[0] == 0  # first rounds follow the hints, then LRU
    assert p.stats["lru_choice"] > 0


def test_pin_with_ttl() -> None:
    c = Cache(SessionPolicy([L1], learn=False), cap=2)
    c.request("A", ["a1"], 0.0)
    c.p.pin(["a1"], until=10.0)
    c.request("B", ["b1"], 1.0)
    c.request("B", ["b1", "b2"], 2.0)  # a1 is LRU and B is fresher, but a1 is pinned
    assert "a1" in c.res
    c.request("B", ["b1", "b2", "b3"], 20.0)  # pin expired
    assert "a1" not in c.res


def test_no_sessions_is_lru() -> None:
    p = SessionPolicy([L1])
    for i, b in enumerate("ABCD"):
        p.on_insert(L1, b, 1, float(i))
    p.on_hit(L1, "A", 5.0)
    assert p.victim(L1, 6.0) == ("B", Action.DROP)


def test_horizon_ranks_by_seconds_per_hit() -> None:
    """A class that is usually back in 5 s but sometimes only after a day has a huge mean
    remaining wait, yet within a 60 s horizon it is the better stream to keep than one that
    always returns after 50 s; the conditional mean ranks them the other way round."""
    p = SessionPolicy([L1], learn=False)
    g = p.gaps
    for _ in range(9):
        g.observe(2, 5.0)  # tool call: mostly 5 s ...
    g.observe(2, 86400.0)  # ... once a day
    for _ in range(10):
        g.observe(3, 50.0)  # awaiting user: always 50 s
    assert g.remaining(2, 0.0) > g.remaining(3, 0.0)
    assert g.per_hit(2, 0.0, 60.0) < g.per_hit(3, 0.0, 60.0)
    # nothing expected within the horizon: not expected back
    assert g.per_hit(3, 0.0, 10.0) >= 1e12


def test_adaptive_horizon_defaults() -> None:
    p = SessionPolicy([L1])
    assert p.horizon < 0 and p.duel_retry == 300
    c = Cache(p, cap=4)
    for i in range(6):
        c.request(f"S{i}", [f"s{i}.0", f"s{i}.1"], 10.0 * i)
    assert p.horizon_s() > 0.0  # the tier's turnover time, learned from its victims


def _agent_trace(seed: int, n_streams: int = 6, steps: int = 400) -> list[tuple[Any, ...]]:
    """A random agent-like trace: streams resend their context plus a few new blocks,
    sometimes compact it, sub-agents share their parent's prefix, hints and ends come
    and go; a few pins. Events: ("req", stream, blocks, t), ("hint", event, t),
    ("pin", blocks, until)."""
    import random

    rng = random.Random(seed)
    ctx: dict[str, list[str]] = {}
    nxt = 0
    t = 0.0
    out: list[tuple[Any, ...]] = []
    reasons = [TOOL, USER, TurnEndReason.DONE, TurnEndReason.UNSPECIFIED]
    for _ in range(steps):
        t += rng.expovariate(1.0)
        sid = f"S{rng.randrange(n_streams)}"
        if rng.random() < 0.15:  # a sub-agent: its parent's prefix, then its own blocks
            sid = f"{sid}/sub{rng.randrange(2)}"
            base = ctx.get(sid) or ctx.get(sid.split("/")[0], [])[:rng.randrange(1, 6)]
        else:
            base = ctx.get(sid, [])
        if base and rng.random() < 0.1:  # compaction: a middle part falls out
            k = rng.randrange(len(base))
            base = base[:k // 2] + base[k:]
        new = [f"b{nxt + i}" for i in range(rng.randrange(0, 8))]
        nxt += len(new)
        blocks = base + new
        if rng.random() < 0.05 and blocks:
            blocks = [*blocks, blocks[0]]  # a repeat within the request
        if not blocks:
            continue
        ctx[sid] = blocks
        out.append(("req", sid, blocks, t))
        r = rng.random()
        if r < 0.7:
            out.append(("hint", SessionEvent("ns", sid, TurnEnd(rng.choice(reasons))), t + 0.5))
        elif r < 0.8:
            out.append(("hint", SessionEvent("ns", sid, SessionEnd()), t + 0.5))
            ctx.pop(sid, None)
        if rng.random() < 0.03:
            out.append(("pin", blocks[:3], t + rng.choice([0.5, 5.0, 50.0])))
    return out


def _replay(p: SessionPolicy, trace: list[tuple[Any, ...]], cap: int, fast: bool) -> list[Any]:
    from kvstore.policy.base import Policy
    from kvstore.policy.fast import fill_for

    res: set[Any] = set()
    fill = fill_for(p) if fast else (lambda *a: Policy.fill(p, *a))
    states = []
    for ev in trace:
        if ev[0] == "hint":
            p.on_session_event(ev[1], ev[2])
            continue
        if ev[0] == "pin":
            p.pin(ev[1], ev[2])
            continue
        _, sid, blocks, now = ev
        p.on_request(blocks, now, sid)
        found = [b for b in blocks if b in res]
        if found:
            p.on_hits(L1, found, now, sid)
        fill(L1, [b for b in blocks if b not in res], 1, now, sid, res, cap)
        states.append((frozenset(res), p.trust, p.lru_mode, p._turn_T, dict(p.stats)))
    return states


def test_fill_fast_path_makes_the_same_decisions() -> None:
    """The session policy's accelerated Put phase (kvstore.policy.fast, the simulator's
    inlined path) against Policy.fill (victim ->
    on_remove -> on_insert per block): the same resident set, trust, mode, learned
    horizon and stats after every request, on random agent-like traces, with and without
    the duel and shared-block deferral, with a stream bound the traces exceed (streams
    forgotten while their blocks are resident), at capacities from a few blocks to most
    of the working set."""
    for seed in range(6):
        trace = _agent_trace(seed)
        for cap in (3, 12, 40):
            for kw in ({}, {"duel": False}, {"trust_limit": 4, "duel_margin": 0.0},
                       {"duel_warmup": 0, "duel_z": 1.0},
                       {"max_streams": 3}, {"max_streams": 1, "duel": False}):
                a = _replay(SessionPolicy([L1], **kw), trace, cap, fast=False)  # type: ignore[arg-type]
                b = _replay(SessionPolicy([L1], **kw), trace, cap, fast=True)  # type: ignore[arg-type]
                assert a == b, (seed, cap, kw)


def _shared_prefix_run() -> set[Any]:
    c = Cache(SessionPolicy([L1], learn=False), cap=6)
    c.request("P", ["sys1", "sys2", "p1"], 0.0)
    c.turn_end("P", USER, 1.0)
    c.request("P/sub", ["sys1", "sys2", "s1"], 2.0)  # a sub-agent: the parent's prefix
    c.turn_end("P/sub", USER, 3.0)  # engine hints only: neither ever says it is done
    c.request("Q", ["q1", "q2"], 4.0)
    c.turn_end("Q", TOOL, 5.0)  # Q is back within seconds
    c.request("R", ["r1", "r2", "r3"], 6.0)  # 3 evictions
    return {b for b, _ in c.evicted}


def test_shared_prefix_goes_with_its_owner() -> None:
    """A prefix shared by two streams that both wait for a person is worth no more than
    either's private blocks: it leaves with the worst-ranked stream that referenced it
    last (P/sub: s1, then the prefix), before the better-ranked Q or the arriving R lose
    anything. (A former order kept it until every stream's private blocks were gone --
    with engine hints, streams that never return keep their shared prefixes forever --
    and bypassed R's own tail instead: {"s1", "p1", "r2"}.)"""
    assert _shared_prefix_run() == {"s1", "sys2", "sys1"}


def test_gaps_are_learned_per_tool_name() -> None:
    """A tool whose calls come back in seconds (a file read) and one whose calls wait
    minutes (a person's approval, a long build) are told apart by TurnEnd.tool_name."""
    p = SessionPolicy([L1], horizon=0.0, tool_min=8)
    t = 0.0
    for i in range(12):  # learn: "read" comes back in 2 s, "approve" in 600 s
        for tool, gap in (("read", 2.0), ("approve", 600.0)):
            s = f"{tool}{i}"
            p.on_request([f"{s}-b"], t, s)
            p.on_session_event(SessionEvent("ns", s, TurnEnd(TOOL, tool_name=tool)), t + 1.0)
            p.on_request([f"{s}-b"], t + 1.0 + gap, s)
        t += 1000.0
    c = Cache(p, cap=4)
    c.request("R", ["r1", "r2"], t)
    c.request("A", ["a1", "a2"], t)
    c.p.on_session_event(SessionEvent("ns", "A", TurnEnd(TOOL, tool_name="approve")), t + 1)
    c.p.on_session_event(SessionEvent("ns", "R", TurnEnd(TOOL, tool_name="read")), t + 1)
    a, r = p._streams["A"], p._streams["R"]
    assert p.expected_remaining(a, t + 2) > 100 * p.expected_remaining(r, t + 2)
    c.request("N", ["n1"], t + 2)
    assert c.evicted[0][0] == "a2"  # the stream waiting on the slow tool goes first
    # without a tool name both are plain tool calls, ranked alike
    q = SessionPolicy([L1], horizon=0.0)
    for s in ("X", "Y"):
        q.on_request([s], t, s)
        q.on_session_event(SessionEvent("ns", s, TurnEnd(TOOL)), t + 1)
    x, y = q._streams["X"], q._streams["Y"]
    assert q.expected_remaining(x, t + 2) == q.expected_remaining(y, t + 2)


def test_tool_names_are_bounded() -> None:
    p = SessionPolicy([L1], max_tools=2)
    for i in range(5):
        s = f"s{i}"
        p.on_request([s], float(i), s)
        p.on_session_event(SessionEvent("ns", s, TurnEnd(TOOL, tool_name=f"t{i}")), i + 0.5)
    assert len(p._tool_cls) == 2
    assert p._streams["s4"].tool == -1  # falls back to the tool-call class


def test_duel_waits_out_the_warm_up() -> None:
    """The shadow-LRU duel judges only once the tier has been full for ``duel_warmup``
    requests: early on both caches are filling and the gap model is mostly its prior."""
    p = SessionPolicy([L1], duel_warmup=50)
    c = Cache(p, cap=2)
    c.request("s", ["x", "y"], 0.0)
    c.request("t", ["z"], 1.0)  # the tier is full: its size is known from here on
    assert p._cap == 2
    # From now on the shadow LRU hits "x" at every request and this policy serves nothing
    # (no Get follows the Lookup): LRU leads from the first request on.
    for i in range(50):
        p.on_request(["x"], 2.0 + i, "s")
    assert not p.lru_mode and p.stats["to_lru"] == 0
    for i in range(10):
        p.on_request(["x"], 60.0 + i, "s")
    assert p.lru_mode and p.stats["to_lru"] == 1


def _duel_run(duel_z: float, policy_hits: int, requests: int) -> SessionPolicy:
    """A tier of 2 blocks, full from the start; then ``requests`` requests alternate: one
    where only the shadow LRU hits (300 references of a block it holds, no Get follows) and
    one where only this policy hits (``policy_hits`` Gets of a block it holds, on a request
    the shadow misses). ``policy_hits`` = 300: a tie; 0: LRU serves every hit."""
    p = SessionPolicy([L1], duel_warmup=0, duel_z=duel_z)
    c = Cache(p, cap=2)
    c.request("s", ["x", "y"], 0.0)
    c.request("t", ["z"], 1.0)  # the tier is full: its size is known from here on
    held = next(iter(c.res))
    now = 2.0
    for i in range(requests // 2):
        p.on_request(["z"] * 300, now, "t")  # the shadow holds z (refreshed every time)
        p.on_request([f"new{i}"], now + 0.5, "u")  # the shadow misses
        if policy_hits:
            p.on_hits(L1, [held] * policy_hits, now + 0.5, "s")
        now += 1.0
    return p


def test_duel_ignores_a_near_tie() -> None:
    """Requests where LRU serves more alternate with requests where this policy does, as
    many hits either way: the shadow leads after every second request by more than the
    margin, but never by more than ``duel_z`` standard deviations of its lead, so the
    policy keeps its ranking (at high capacities such ties are the rule, and each LRU
    episode cost hits). Without the significance test (``duel_z=0``) it falls back."""
    assert _duel_run(3.0, 300, 400).stats["to_lru"] == 0
    assert _duel_run(0.0, 300, 400).stats["to_lru"] >= 1


def test_duel_still_falls_back_from_a_clearly_losing_ranking() -> None:
    """When only the shadow LRU serves hits, request after request (hints that mislead),
    the lead is many standard deviations within a few requests: LRU takes over."""
    p = _duel_run(3.0, 0, 20)
    assert p.lru_mode and p.stats["to_lru"] == 1


def _ended_session_victims(discard: bool) -> list[tuple[Any, Action]]:
    """A session's blocks in L1 and L2 of a three-tier policy; it ends; one victim
    per tier (L1 first) and then L2's next one."""
    L3 = TierName.L3
    p = SessionPolicy([L1, L2, L3], learn=False)
    p.on_request(["a", "b"], 0.0, "A")
    p.on_request(["x"], 0.0, "B")
    for b, s in (("a", "A"), ("b", "A"), ("x", "B")):
        p.on_insert(L1, b, 1, 0.0, s)
        p.on_insert(L2, b, 1, 0.0, s)
    p.on_session_event(SessionEvent("ns", "B", TurnEnd(TOOL)), 1.0)
    p.on_session_event(SessionEvent("ns", "A", SessionEnd(discard=discard)), 2.0)
    out = []
    for tier in (L1, L2):
        v = p.victim(tier, 3.0)
        assert v is not None
        out.append(v)
    return out


def test_session_end_blocks_leave_l1_first_to_l2_and_skip_l3() -> None:
    """Regression (hardening item 7): a SessionEnd made its L1-only blocks leave the
    store (DROP from L1), breaking "every Put reaches L2 before it leaves L1"."""
    (b1, a1), (b2, a2) = _ended_session_victims(discard=False)
    assert b1 in ("a", "b") and a1 == Action.DEMOTE  # first to leave L1, to L2
    assert b2 in ("a", "b") and a2 == Action.DROP  # first to leave L2, never to L3


def test_session_end_with_discard_leaves_the_store() -> None:
    (b1, a1), (b2, a2) = _ended_session_victims(discard=True)
    assert b1 in ("a", "b") and a1 == Action.DROP
    assert b2 in ("a", "b") and a2 == Action.DROP


def test_discarded_block_wanted_again_is_demoted_once_dead_again() -> None:
    p = SessionPolicy([L1, L2], learn=False)
    p.on_request(["a"], 0.0, "A")
    p.on_insert(L1, "a", 1, 0.0, "A")
    p.on_session_event(SessionEvent("ns", "A", SessionEnd(discard=True)), 1.0)
    p.on_request(["a"], 2.0, "B")  # another session uses the block: it is kept
    p.on_request(["c"], 3.0, "B")  # and drops it from its context (dead, not discarded)
    v = p.victim(L1, 4.0)
    assert v == ("a", Action.DEMOTE)


def test_a_session_ended_after_an_idle_timeout_that_returns_teaches_its_class() -> None:
    """An engine ends an idle main session after a timeout of its choosing; if the user
    comes back after all, the wait since the last turn end is a gap of that turn's class
    (awaiting the user) -- the long tail the timeout would otherwise hide from it -- and
    not of the "done" class."""
    from kvstore.policy.session.gaps import DONE
    from kvstore.policy.session.gaps import USER as USER_CLS

    p = SessionPolicy([L1])
    c = Cache(p, cap=8)
    c.request("A", ["a1", "a2"], 0.0)
    c.turn_end("A", USER, 1.0)
    c.end("A", 901.0)  # the engine's idle timeout: 900 s
    n_user, n_done = p.gaps.n[USER_CLS], p.gaps.n[DONE]
    c.request("A", ["a1", "a2", "a3"], 5001.0)  # the user is back after all
    assert p.gaps.n[USER_CLS] == n_user + 1 and p.gaps.n[DONE] == n_done
    assert p.gaps.remaining(USER_CLS, 4000.0) < 1e6  # a 5000 s wait is now in its range
    assert not p._streams["A"].ended


def test_per_hit_key_is_the_bin_by_bin_definition() -> None:
    """The ranking key (GapModel.per_hit) takes constant time from suffix sums; it is
    the bin-by-bin definition E[min(G - a, T) | G > a] / P(G - a <= T | G > a), each
    bin's samples counted at their mean, on random histograms, ages and horizons."""
    import random

    from kvstore.policy.session.gaps import _NBINS, NEVER, GapModel, _bin

    def by_bins(g: GapModel, cls: int, age: float, horizon: float) -> float:
        hits = occ = 0.0
        for j in range(_bin(age), _NBINS):
            c = g.cnt[cls][j]
            m = g.tot[cls][j] / c - age if c > 0 else 0.0
            if c > 0 and m > 0:
                hits += c if m <= horizon else 0.0
                occ += c * min(m, horizon)
        return occ / hits if hits > 0 else NEVER + age

    rng = random.Random(7)
    for _ in range(300):
        g = GapModel()
        for _ in range(rng.randrange(0, 120)):
            g.observe(rng.randrange(5), rng.lognormvariate(2.0, 3.0))
        for _ in range(10):
            cls, age = rng.randrange(5), rng.choice([0.0, rng.lognormvariate(2.0, 3.0)])
            horizon = rng.choice([0.1, rng.lognormvariate(4.0, 3.0), 1e9])
            want = by_bins(g, cls, age, horizon)
            assert abs(g.per_hit(cls, age, horizon) - want) <= 1e-9 * abs(want)


def test_horizon_is_the_first_tiers_turnover_time() -> None:
    """The ranking's horizon (horizon < 0) is the first tier's turnover time: the seconds
    it takes to evict as many blocks as the tier holds. A block that stays at the LRU
    head for hours (here: the ranking always finds something worse to evict) does not
    stretch it; the former estimate, the idle time of the stream owning LRU's choice,
    became that block's age, which is how it ran away to ~20 h at the upper in-range
    capacities."""
    p = SessionPolicy([L1])
    c = Cache(p, cap=9)
    c.request("old", ["o1"], 0.0)
    c.turn_end("old", TOOL, 0.5)
    t = 10_000.0  # hours later: sub-agents that end at once, 2 new blocks a second
    for i in range(40):
        s = f"old/sub{i}"
        c.request(s, [f"{s}.a", f"{s}.b"], t + i)
        c.end(s, t + i + 0.5)
    assert "o1" in c.res  # dead blocks went first: o1 held the LRU head all along
    assert 4.0 <= p.horizon_s() <= 5.0  # 9 evictions at 2 a second


def test_tracked_streams_are_bounded() -> None:
    """Without SessionEnd a stream's state would stay for good: past ``max_streams`` the
    least recently active stream is forgotten, however many streams come and go."""
    c = Cache(SessionPolicy([L1], max_streams=8), cap=20)
    for i in range(200):
        c.request(f"S{i}", [f"s{i}.0", f"s{i}.1", "sys"], float(i))
        c.turn_end(f"S{i}", USER, i + 0.5)
        c.request("main", ["sys", f"m{i}"], i + 0.7)  # active all along: never forgotten
        assert c.p.tracked_streams() <= 8
    assert c.request("main", ["sys", "m199"], 300.0) == 2  # its blocks kept their owner


def test_tracked_blocks_are_bounded_over_all_streams() -> None:
    """``max_streams`` alone would let 4,096 streams keep a huge request each: past
    ``max_tracked_blocks`` (the blocks of the latest requests, all streams together) the
    least recently active streams are forgotten, never the one just seen, whose
    blocks keep their owner."""
    p = SessionPolicy([L1], max_tracked_blocks=10)
    c = Cache(p, cap=100)  # (no eviction here)
    c.request("A", [f"a{i}" for i in range(4)], 0.0)
    c.request("B", [f"b{i}" for i in range(4)], 1.0)
    assert p.tracked_streams() == 2 and p._tracked_blocks == 8
    c.request("C", [f"c{i}" for i in range(4)], 2.0)  # 12 > 10: A is forgotten
    assert p.tracked_streams() == 2 and p._tracked_blocks == 8
    assert "A" not in p._streams and "C" in p._streams
    c.request("D", [f"d{i}" for i in range(30)], 3.0)  # alone over the bound: kept
    assert list(p._streams) == ["D"] and p._tracked_blocks == 30
    assert c.request("D", [f"d{i}" for i in range(31)], 4.0) == 30
    c.end("D", 5.0)
    assert p._tracked_blocks == 0


def test_the_duel_shadow_is_bounded_before_the_tier_fills() -> None:
    """Lookups of blocks never stored reach the duel's shadow LRU before the first tier
    has filled (its size in blocks unknown): ``max_tracked_blocks`` bounds it meanwhile."""
    p = SessionPolicy([L1], max_tracked_blocks=100)
    for j in range(10):
        p.on_request([f"s{j}.{i}" for i in range(50)], float(j), f"s{j}")
    assert len(p._shadow) == 100
    assert p._tracked_blocks <= 100


def test_a_forgotten_stream_that_returns_starts_afresh() -> None:
    """A forgotten stream's blocks stay resident, ranked by LRU age with the blocks of no
    session; when it returns it finds them (hits) and is tracked again, as a new stream:
    its gap is not learned (nothing remembers when it left)."""
    p = SessionPolicy([L1], max_streams=2)
    c = Cache(p, cap=6)
    c.request("A", ["a1", "a2"], 0.0)
    c.turn_end("A", USER, 1.0)
    c.request("B", ["b1", "b2"], 2.0)
    c.turn_end("B", TOOL, 3.0)
    c.request("C", ["c1"], 4.0)  # A, the least recently active, is forgotten
    assert p.tracked_streams() == 2 and c.evicted == []
    seen = int(p.gaps.n[TOOL_CLASS]), int(p.gaps.n[USER_CLASS])
    assert c.request("A", ["a1", "a2", "a3"], 5.0) == 2  # B forgotten now; A afresh
    assert (int(p.gaps.n[TOOL_CLASS]), int(p.gaps.n[USER_CLASS])) == seen
    assert p.tracked_streams() == 2
    c.turn_end("A", TOOL, 6.0)
    assert c.request("A", ["a1", "a2", "a3", "a4"], 7.0) == 3  # tracked again: learns
    assert int(p.gaps.n[TOOL_CLASS]) == seen[0] + 1


def test_batched_ranking_keys_are_expected_remaining() -> None:
    """The ranking keys every stream in one call (``_set_keys``, with ``per_hit_many``):
    the same floats as ``expected_remaining`` stream by stream, at any moment of random
    agent-like traces (tool names, hinted gaps, ended streams, both key kinds)."""
    for seed in range(3):
        for kw in ({}, {"horizon": 0.0}, {"horizon": 600.0}):
            p = SessionPolicy([L1], **kw)  # type: ignore[arg-type]
            for i, ev in enumerate(_agent_trace(seed)):
                if ev[0] == "hint":
                    e = ev[1]
                    if isinstance(e.event, TurnEnd) and i % 3 == 0:
                        tool = f"t{i % 4}" if e.event.reason == TOOL else ""
                        gap = 5000 if i % 7 == 0 else 0
                        e = SessionEvent("ns", e.session_id,
                                         TurnEnd(e.event.reason, tool_name=tool,
                                                 expected_gap_ms=gap))
                    p.on_session_event(e, ev[2])
                elif ev[0] == "req":
                    p.on_request(ev[2], ev[3], ev[1])
                    p._turn_T = 10.0 * (i % 50)  # (a horizon that moves)
                    now = ev[3] + (i % 11) * 37.0
                    streams = list(p._streams.values())
                    p._set_keys(streams, now)
                    assert [s.key for s in streams] == \
                        [p.expected_remaining(s, now) for s in streams]


def test_shadow_lru_moves_as_block_by_block() -> None:
    """The duel's shadow LRU moves a request's leading run of held blocks in one C call:
    the same order and hit count as moving them block by block (repeats included)."""
    import random
    from collections import OrderedDict

    rng = random.Random(5)
    p = SessionPolicy([L1])
    want: OrderedDict[Any, None] = OrderedDict()
    for _ in range(400):
        base = list(want)[-rng.randrange(0, 30):] if want and rng.random() < 0.8 else []
        blocks = base + [rng.randrange(200) for _ in range(rng.randrange(0, 6))]
        if blocks and rng.random() < 0.2:
            blocks.insert(rng.randrange(len(blocks)), rng.choice(blocks))  # a repeat
        p._cap = rng.choice([0, 20, 60])
        h = 0
        for b in blocks:
            if b in want:
                h += 1
                want.move_to_end(b)
            else:
                want[b] = None
        while p._cap and len(want) > p._cap:
            want.popitem(last=False)
        p._duel(blocks)
        assert list(p._shadow) == list(want) and p._sh_pending == h


def test_ranking_decides_as_before_the_speed_work() -> None:
    """The ranking keys its streams in one call and skips, without a look, the streams
    holding nothing that rank before the active one; it evicts exactly as the ranking
    before that work (``ranking_before``, commit 1a2d51d): the same resident set, trust,
    mode, horizon and stats after every request, through both Put paths, with ownerless
    blocks (forgotten streams) and without, on random traces with many streams."""
    from ranking_before import Ranking as RankingBefore

    class Before(SessionPolicy):
        def _ranking(self, tier: TierName, ts: Any, now: float) -> Any:
            return RankingBefore(tier, ts, self._streams.values(), self.expected_remaining,
                                 lambda: self._last_s, now)

    for seed in range(4):
        trace = _agent_trace(seed, n_streams=14, steps=500)
        for cap in (4, 15, 60):
            for kw in ({}, {"duel": False}, {"max_streams": 5}, {"horizon": 0.0}):
                want = _replay(Before([L1], **kw), trace, cap, fast=False)  # type: ignore[arg-type]
                for fast in (False, True):
                    got = _replay(SessionPolicy([L1], **kw), trace, cap, fast)  # type: ignore[arg-type]
                    assert got == want, (seed, cap, kw, fast)


def test_the_stream_being_placed_gives_way_by_placing_scale() -> None:
    """The stream whose request is being placed is keyed ``placing_scale`` times its
    class's key: at 1 it keeps its new blocks against a stream expected back later
    than its class says; at 2 it gives up its own newest block instead."""
    evicted = {}
    for scale in (1.0, 2.0):
        c = Cache(SessionPolicy([L1], learn=False, horizon=0.0, placing_scale=scale), cap=4)
        c.request("A", ["a1", "a2"], 0.0)
        # A is expected back 46 s after its turn end: 45.5 s at t=1
        c.p.on_session_event(SessionEvent("ns", "A", TurnEnd(TOOL, expected_gap_ms=46_000)),
                             0.5)
        c.request("B", ["b1", "b2", "b3"], 1.0)  # running, age 0: the prior's 30 s x scale
        evicted[scale] = c.evicted
        b = c.p._streams["B"]
        assert c.p.expected_remaining(b, 1.0) == 30.0 * scale
    assert evicted[1.0] == [("a2", Action.DROP)]
    assert evicted[2.0] == [("b2", Action.DROP)]
