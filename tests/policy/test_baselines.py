"""Hand-worked sequences for LRU, S3-FIFO, SIEVE and GDSF (single tier)."""

from __future__ import annotations

from kvstore.policy import POLICIES, make_policy
from kvstore.policy.base import Action, Policy
from kvstore.policy.gdsf import GDSFPolicy
from kvstore.policy.s3fifo import S3FIFOPolicy
from kvstore.policy.sieve import SievePolicy
from kvstore.types import TierName

L1, L2 = TierName.L1, TierName.L2


def run(policy: Policy, seq: str, cap: int) -> tuple[str, list[str]]:
    """Replay single-letter blocks; return hit/miss string and the evictions."""
    res: set[str] = set()
    out, evicted = [], []
    for i, b in enumerate(seq):
        if b in res:
            policy.on_hit(L1, b, float(i))  # type: ignore[arg-type]
            out.append("H")
            continue
        out.append("m")
        while len(res) >= cap:
            v = policy.victim(L1, float(i))
            assert v is not None
            res.discard(v[0])  # type: ignore[arg-type]
            policy.on_remove(L1, v[0])
            evicted.append(v[0])
        res.add(b)
        policy.on_insert(L1, b, 1, float(i))  # type: ignore[arg-type]
    return "".join(out), evicted  # type: ignore[return-value]


def test_registry() -> None:
    assert {"lru", "s3fifo", "sieve", "gdsf", "session"} <= set(POLICIES)
    for name in POLICIES:
        assert make_policy(name, [L1, L2]).name == name


def test_lru() -> None:
    hm, ev = run(make_policy("lru", [L1]), "ABCADB", 3)
    assert hm == "mmmHmm" and ev == ["B", "C"]


def test_sieve_paper_example() -> None:
    # cap 3: A B C, hit A -> A visited; D evicts: hand at tail A (visited, cleared) -> B.
    hm, ev = run(SievePolicy([L1]), "ABCAD", 3)
    assert hm == "mmmHm" and ev == ["B"]
    # hand stays after B's successor C: E evicts C (unvisited) not A (cleared earlier)
    p = SievePolicy([L1])
    hm, ev = run(p, "ABCADAE", 3)
    assert hm == "mmmHmHm" and ev == ["B", "C"]
    # now A's bit was set again at index 5 and cleared when the hand passed over it
    hm, ev = run(SievePolicy([L1]), "ABCDE", 2)
    assert ev == ["A", "B", "C"]  # plain FIFO without hits


def test_sieve_hand_wraps() -> None:
    p = SievePolicy([L1])
    hm, ev = run(p, "ABABC", 2)  # both visited: hand clears A, B, wraps, evicts A
    assert hm == "mmHHm" and ev == ["A"]


def test_s3fifo_small_then_main() -> None:
    # cap 10 -> small target 1 block: new blocks pass through S; a hit while in S
    # promotes to M; one-hit wonders are evicted from S and remembered in the ghost.
    p = S3FIFOPolicy([L1])
    hm, ev = run(p, "ABCDEFGHIJ", 10)
    assert ev == []
    hm, ev = run(p, "A", 10)  # nothing: A is resident
    p2 = S3FIFOPolicy([L1], small_ratio=0.5)
    # cap 2, small target 1: A, B; A hit; C: S holds A,B (2 >= 1): A (freq 1) -> M,
    # then B (freq 0) evicted to ghost.
    hm, ev = run(p2, "ABAC", 2)
    assert hm == "mmHm" and ev == ["B"]
    # S holds C: evicting takes C from S (freq 0) into the ghost, which holds as many ids
    # as M has blocks (1), so B is forgotten. C coming back goes straight to M; B to S.
    v = p2.victim(L1, 5.0)
    assert v == ("C", Action.DROP)
    p2.on_remove(L1, "C")  # type: ignore[arg-type]
    assert list(p2._q[L1].ghost) == ["C"]
    p2.on_insert(L1, "C", 1, 5.0)  # type: ignore[arg-type]
    p2.on_insert(L1, "B", 1, 5.0)  # type: ignore[arg-type]
    assert list(p2._q[L1].main) == ["A", "C"] and list(p2._q[L1].small) == ["B"]


def test_s3fifo_main_clock() -> None:
    p = S3FIFOPolicy([L1], small_ratio=0.01)
    for b in "AB":
        p.on_insert(L1, b, 1, 0.0)  # type: ignore[arg-type]
    q = p._q[L1]
    q.small.clear()
    q.main.update({"A": None, "B": None})
    q.freq.update({"A": 1, "B": 0})
    # A has freq 1: reinserted with 0; B evicted
    assert p.victim(L1, 1.0) == ("B", Action.DROP)


def test_gdsf_frequency_and_aging() -> None:
    p = GDSFPolicy([L1])
    hm, ev = run(p, "AABCD", 3)  # A freq 2 (H=2); B, C H=1: evict B (older entry)
    assert hm == "mHmmm" and ev == ["B"]
    assert p._h[L1].inflation == 1.0  # L rises to the victim's H
    # new blocks now enter at L + 1 = 2, level with A
    p.on_insert(L1, "E", 1, 9.0)  # type: ignore[arg-type]
    assert p._h[L1].pri["E"] == 2.0 == p._h[L1].pri["A"]


def test_gdsf_cost_aware() -> None:
    # block X costs 10x per byte: kept over two cheap blocks of the same frequency
    p = GDSFPolicy([L1], cost_fn=lambda b, size: 10.0 * size if b == "X" else float(size))
    for i, b in enumerate("XYZ"):
        p.on_insert(L1, b, 4, float(i))  # type: ignore[arg-type]
    v = p.victim(L1, 3.0)
    assert v is not None and v[0] == "Y"


def test_demote_on_upper_tier_and_skip_unevictable() -> None:
    for name in ("lru", "s3fifo", "sieve", "gdsf", "session"):
        p = make_policy(name, [L1, L2])
        for i, b in enumerate("ABC"):
            p.on_insert(L1, b, 1, float(i))  # type: ignore[arg-type]
        v = p.victim(L1, 5.0, lambda blk: blk != "A")
        assert v is not None and v[0] != "A" and v[1] == Action.DEMOTE, name
        p.on_insert(L2, "Z", 1, 0.0)  # type: ignore[arg-type]
        assert p.victim(L2, 5.0) == ("Z", Action.DROP), name
        assert p.victim(L1, 5.0, lambda blk: False) is None, name
