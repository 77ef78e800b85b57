"""The ShmClient's stock of anonymous slots (kvstore/client/_shmstock.py):
bounded, oldest first, stale slots set aside for abandoning, all of it
handed back at close."""

from __future__ import annotations

from kvstore.client._shmstock import SlotStock

MiB = 1024 * 1024


def test_take_uses_the_oldest_slot_of_the_size_and_namespace() -> None:
    stock = SlotStock()
    stock.add("a", [(1, 0, MiB)], deadline=10.0)
    stock.add("a", [(2, MiB, MiB)], deadline=20.0)
    stock.add("b", [(3, 2 * MiB, MiB)], deadline=20.0)
    got = stock.take("a", [MiB, MiB, MiB, 4096], now=5.0)
    assert [s.slot_id if s else None for s in got] == [1, 2, None, None]
    assert stock.held() == 1  # namespace b's
    assert stock.take("b", [MiB], now=5.0)[0].slot_id == 3  # type: ignore[union-attr]


def test_stale_slots_are_never_taken_but_abandoned_once() -> None:
    stock = SlotStock()
    stock.add("a", [(1, 0, 4096), (2, 4096, 4096)], deadline=10.0)
    stock.add("a", [(3, 8192, 4096)], deadline=30.0)
    [slot] = stock.take("a", [4096], now=15.0)
    assert slot is not None and slot.slot_id == 3
    assert sorted(stock.to_abandon("a")) == [1, 2]
    assert stock.to_abandon("a") == [] and stock.held() == 0


def test_wanted_fills_up_when_another_put_like_the_last_is_not_covered() -> None:
    stock = SlotStock(max_per_size=4, max_bytes=8 * MiB)
    assert stock.wanted("a", [MiB]) == [MiB] * 4  # empty: filled up to 4 of a size
    assert stock.wanted("a", [MiB] * 8) == [MiB] * 4  # at most 4 of a size
    assert stock.wanted("a", [4 * MiB] * 3) == [4 * MiB] * 2  # at most 8 MiB in all
    stock.add("a", [(1, 0, MiB)], deadline=10.0)
    assert stock.wanted("a", [MiB]) == []  # the one there covers another such Put
    assert stock.wanted("a", [MiB, MiB]) == [MiB] * 3  # it does not cover two: fill up
    assert stock.wanted("b", [MiB, MiB]) == [MiB] * 4  # per namespace
    stock.add("a", [(2, MiB, MiB), (3, 2 * MiB, MiB), (4, 3 * MiB, MiB)], deadline=10.0)
    assert stock.wanted("a", [MiB] * 8) == []  # a full stock covers what it can
    assert stock.wanted("a", [2 * MiB]) == [2 * MiB] * 2  # 4 MiB held: 4 more at most


def test_slots_over_the_bounds_and_the_rest_at_close_are_handed_back() -> None:
    stock = SlotStock(max_per_size=2, max_bytes=8 * MiB)
    stock.add("a", [(1, 0, MiB), (2, MiB, MiB), (3, 2 * MiB, MiB)], deadline=10.0)
    assert stock.held() == 2
    stock.add("b", [(4, 3 * MiB, 4 * MiB)], deadline=10.0)
    taken = stock.take("a", [MiB], now=1.0)
    stock.put_back("a", [s for s in taken if s is not None])
    assert stock.held() == 3
    assert {ns: sorted(ids) for ns, ids in stock.drain().items()} == {"a": [1, 2, 3], "b": [4]}
    assert stock.held() == 0 and stock.drain() == {}
