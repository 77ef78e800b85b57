"""The session ranking as of commit 1a2d51d (before the replay speed work of issue 16):
the reference that the faster ranking must match decision for decision
(tests/policy/test_session.py, ``test_ranking_decides_as_before_the_speed_work``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from kvstore.policy.session.streams import Stream, TierState
from kvstore.types import TierName


class Ranking:
    __slots__ = ("_it", "a_ended", "active", "active_first", "seen_a", "walk", "walk_ended",
                 "walk_res", "walk_seen")

    def __init__(self, tier: TierName, ts: TierState, streams: Iterable[Stream],
                 key: Callable[[Stream, float], float], current: Callable[[], Stream | None],
                 now: float) -> None:
        # Its next candidate is the newest block of ``active`` not in ``seen_a``, if
        # there is one ...
        self.active_first = False
        self.active: Stream | None = None
        self.seen_a: set[Any] = set()
        self.a_ended = False
        # ... or (``walk``) the newest block of ``walk_res`` not in ``walk_seen``, if there
        # is one (a stream ranked before the active one)
        self.walk = False
        self.walk_res: dict[Any, None] = {}
        self.walk_seen: set[Any] = set()
        self.walk_ended = False
        self._it = self._run(tier, ts, streams, key, current, now)

    def __iter__(self) -> Iterator[tuple[Any, bool]]:
        """(block, drop?) pairs; iterating again resumes where the last loop stopped."""
        return self._it

    def _run(self, tier: TierName, ts: TierState, all_streams: Iterable[Stream],
             key: Callable[[Stream, float], float], current: Callable[[], Stream | None],
             now: float) -> Iterator[tuple[Any, bool]]:
        own = ts.own
        dead = ts.dead
        while dead:
            b = dead.popitem(last=False)[0]  # leaves the queue; stays resident, ownerless
            dead_again = b in own and own[b] is None
            if dead_again:
                ts.free.pop(b, None)
                yield b, True
        # every stream that holds blocks or may soon (its latest request is being placed)
        streams = [s for s in all_streams if s.res[tier] or s.cur]
        for s in streams:
            s.key = key(s, now)
        free_key = (now - next(iter(ts.free.values()))) if ts.free else -1.0
        streams.sort(key=lambda s: s.key, reverse=True)
        free_done = not ts.free

        def take(s: Stream, seen: set[Any]) -> Any:
            """The stream's newest block not offered yet."""
            for x in reversed(s.res[tier]):
                if x in seen:
                    continue
                seen.add(x)
                if own.get(x) is not s:
                    continue
                return x
            return None

        # Blocks are offered newest first and read live: the stream whose request is
        # being placed (``active``) gains blocks while this ranking stands, and those
        # go before any better-ranked stream's. For the stream ranked worst this is
        # bypassing its own request's tail, as MIN would.
        active = current()  # (the stream of the latest call, read when the walk starts)
        a_idx = len(streams)
        for i, s in enumerate(streams):
            if s is active:
                a_idx = i
        seen_a: set[Any] = set()
        a_ended = active.ended if active is not None else False
        self.active, self.seen_a, self.a_ended = active, seen_a, a_ended
        for i, s in enumerate(streams):
            if not free_done and free_key >= s.key:
                free_done = True
                self.active_first = self.walk = False
                yield from _free_lru(ts)
            seen = seen_a if i == a_idx else set()
            ended = s.ended  # fixed while this ranking stands (an event resets it)
            res_s = s.res[tier]
            check_active = i > a_idx and active is not None
            # every resume from here on starts with the active stream's newest blocks,
            # or (before the active stream) with this stream's
            self.active_first = i >= a_idx and active is not None
            self.walk = not self.active_first
            self.walk_res, self.walk_seen, self.walk_ended = res_s, seen, ended
            while True:
                if check_active:
                    b = take(active, seen_a)  # type: ignore[arg-type]
                    if b is not None:
                        yield b, a_ended
                        continue
                # take(s, seen), inlined
                for b in reversed(res_s):  # (every block in res_s is owned by s)
                    if b in seen:
                        continue
                    seen.add(b)
                    break
                else:
                    break
                yield b, ended
        self.active_first = self.walk = False
        if not free_done:
            yield from _free_lru(ts)


def _free_lru(ts: TierState) -> Iterator[tuple[Any, bool]]:
    """Ownerless blocks, least recently used first (no copy: they leave as evicted)."""
    free = ts.free
    last = None
    while free:
        b = next(iter(free))
        if b == last:  # the caller passed over it (pinned, not evictable): stop here
            return
        last = b
        yield b, False
