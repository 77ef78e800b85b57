"""The server's budget for streamed gRPC responses (kvstore.budget):
what is free is taken with no await, waiters are served in order, and a wait
that ends (its deadline, a cancel, its own limit) never keeps or loses bytes."""

from __future__ import annotations

import asyncio

import pytest

from kvstore.budget import ResponseBudget
from kvstore.errors import CapacityExhausted


def test_free_bytes_are_taken_without_waiting() -> None:
    async def main() -> None:
        budget = ResponseBudget(10, share=100)
        assert budget.take_now(6) and budget.free == 4
        step = budget.take(4, 1.0).__await__()
        with pytest.raises(StopIteration):  # done in its first step: it never suspends
            step.send(None)
        assert budget.free == 0
        assert not budget.take_now(1)
        budget.give(10)
        assert budget.free == 10

    asyncio.run(main())


def test_waiters_are_served_in_order_and_none_is_passed_over() -> None:
    async def main() -> None:
        budget = ResponseBudget(10, share=100)
        assert budget.take_now(10)
        served: list[str] = []

        async def take(name: str, nbytes: int) -> None:
            await budget.take(nbytes, 5.0)
            served.append(name)

        big = asyncio.ensure_future(take("big", 8))
        await asyncio.sleep(0)
        small = asyncio.ensure_future(take("small", 1))
        await asyncio.sleep(0)
        assert not budget.take_now(1)  # someone waits: no jumping the queue
        budget.give(2)  # enough for small, not for big: small still waits its turn
        await asyncio.sleep(0)
        assert served == [] and budget.free == 2
        budget.give(8)
        await asyncio.gather(big, small)
        assert served == ["big", "small"] and budget.free == 1

    asyncio.run(main())


def test_a_wait_past_its_limit_is_capacity_exhausted_and_the_next_goes_on() -> None:
    async def main() -> None:
        budget = ResponseBudget(10, share=100)
        assert budget.take_now(9)
        with pytest.raises(CapacityExhausted, match="MiB the server allows them"):
            await budget.take(5, 0.05)
        later = asyncio.ensure_future(budget.take(1, 5.0))
        await asyncio.wait_for(later, 5.0)  # the one that gave up no longer stands first
        assert budget.free == 0

    asyncio.run(main())


def test_a_cancelled_wait_takes_nothing_even_when_granted_as_it_ends() -> None:
    async def main() -> None:
        budget = ResponseBudget(10, share=100)
        assert budget.take_now(10)
        waiting = asyncio.ensure_future(budget.take(4, 5.0))
        await asyncio.sleep(0)
        budget.give(4)  # granted ...
        waiting.cancel()  # ... and cancelled before it ran again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert budget.free == 4
        plain = asyncio.ensure_future(budget.take(6, 5.0))
        await asyncio.sleep(0)
        plain.cancel()
        with pytest.raises(asyncio.CancelledError):
            await plain
        assert budget.free == 4 and budget.take_now(4)

    asyncio.run(main())


def test_a_caller_past_its_share_waits_without_standing_in_anyone_s_way() -> None:
    """Tenant a holds its share (a quarter) and waits for more; b's Get fits
    and is served at once. (a's queued Gets stood first in one line: b's Get
    waited 30 s, then was refused.) a is served when its own calls give back."""
    async def main() -> None:
        budget = ResponseBudget(100)
        assert budget.share == 25
        assert budget.take_now(25, "a") and not budget.take_now(1, "a")
        a_more = asyncio.ensure_future(budget.take(10, 5.0, "a"))
        await asyncio.sleep(0)
        assert budget.take_now(15, "b")  # a waits, past its share: not in b's way
        b_more = asyncio.ensure_future(budget.take(10, 5.0, "b"))
        await asyncio.wait_for(b_more, 5.0)
        assert not a_more.done()
        budget.give(25, "a")
        await asyncio.wait_for(a_more, 5.0)
        assert budget.free == 100 - 10 - 25
        with pytest.raises(CapacityExhausted, match="this caller's gRPC Get responses hold"):
            await budget.take(20, 0.05, "b")  # b: 25 held, 20 more is past its share
        # A caller holding nothing may take more than its share in one go.
        assert budget.take_now(40, "c")

    asyncio.run(main())


def test_calls_in_progress_are_bounded_in_all_and_per_caller() -> None:
    from kvstore.server.interceptor import CallLimit

    limit = CallLimit(4)
    limit.enter("a")
    limit.enter("a")
    with pytest.raises(CapacityExhausted, match="its share"):
        limit.enter("a")  # half of 4
    limit.enter("b")
    limit.enter("c")
    with pytest.raises(CapacityExhausted, match=r"server\.max_calls"):
        limit.enter("d")  # 4 in all
    limit.leave("a")
    limit.enter("d")
    for who in ("a", "b", "c", "d"):
        limit.leave(who)
    assert limit.open == 0 and limit._of == {}


def test_bytes_held_already_wait_only_within_their_cap() -> None:
    """take_held (a gRPC Get's request, received already): it waits for room
    only while the bytes so waiting, all callers together, stay within the
    cap (they are counted nowhere meanwhile); past it, False at once."""
    async def main() -> None:
        budget = ResponseBudget(10, share=100)
        assert budget.take_now(10)
        first = asyncio.ensure_future(budget.take_held(4, 5.0, "a", wait_cap=6))
        await asyncio.sleep(0)  # (it is waiting now)
        assert budget.waiting_held == 4
        assert not await budget.take_held(3, 5.0, "b", wait_cap=6)  # 4 + 3 > 6: at once
        # a caller waiting already may add no more than a quarter of the cap
        assert not await budget.take_held(1, 5.0, "a", wait_cap=6)
        budget.give(5)
        assert await first and budget.free == 1 and budget.waiting_held == 0
        with pytest.raises(CapacityExhausted):
            await budget.take_held(5, 0.05, "c", wait_cap=6)  # waited its time out
        assert budget.waiting_held == 0 and budget.free == 1

    asyncio.run(main())
