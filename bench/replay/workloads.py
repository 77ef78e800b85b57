"""Trace loaders: turn the shared traces into time-ordered event lists for the simulator.

Events are tuples ``(time_s, kind, stream, payload)``:

* ``REQ`` — payload is a list of the request's block ids, in order (interned: one int
  object per unique block, dense ids 0..n_unique-1, so a replay allocates nothing per
  reference; hand-made workloads may pass any sequence);
* ``HINT`` — payload is a prebuilt :class:`kvstore.types.SessionEvent`.

Block ids are ints (hashable like a BlockId; the policies treat ids as opaque keys).
Agent sessions: ``hash_ids`` are local to a file, so a block is named
``(file_index << 20) | hash_id`` before interning (a file whose ids do not all fit in 20
bits has them renumbered by rank first); sub-agents share their parent's scope.
``Workload.groups`` maps each agent stream to the half ("a" tuning / "b" held-out) of the
session it belongs to, so one replay of all sessions reports both halves.

Arrival model for agent sessions (seeded, documented in docs/replay-results.md): sessions
start at the points of a Poisson process of rate ``lam``; ``lam`` is chosen (bisection on
the realised offsets) so that the time-averaged number of sessions in progress over the
arrival window [0, last arrival] equals K. A session is in progress from its start to the
end of its last request (request time + api_time), sub-agents included.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import zlib
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstore.types import SessionEnd, SessionEvent, TurnEnd, TurnEndReason

REQ = 0
HINT = 1

#: the shared traces: ``KVSTORE_TRACES``, else ``shared/traces`` beside the checkout
TRACES = Path(os.environ.get("KVSTORE_TRACES")
              or Path(__file__).resolve().parents[2].parent / "shared" / "traces")
AGENT_DIR = TRACES / "agentic-cc" / "dev"
AGENT_EXTRA_DIR = TRACES / "agentic-cc" / "dev-extra"
MOONCAKE_DIR = TRACES / "mooncake"

STOP_REASON = {
    "tool_use": TurnEndReason.TOOL_CALL,
    "end_turn": TurnEndReason.AWAITING_USER,
    "stop_sequence": TurnEndReason.AWAITING_USER,
    "max_tokens": TurnEndReason.UNSPECIFIED,
}
WRONG_CHOICES = (TurnEndReason.TOOL_CALL, TurnEndReason.AWAITING_USER, TurnEndReason.DONE)

Event = tuple[float, int, str | None, object]


@dataclass
class Workload:
    name: str
    tokens_per_block: int
    events: list[Event]
    n_refs: int = 0
    n_unique: int = 0
    meta: dict[str, object] = field(default_factory=dict)
    groups: dict[str | None, str] = field(default_factory=dict)

    def refs(self) -> Iterable[list[int]]:
        for _, kind, _, payload in self.events:
            if kind == REQ:
                yield payload  # type: ignore[misc]


class Interner:
    """Raw block name -> dense int id, one int object per block."""

    def __init__(self) -> None:
        self.ids: dict[int, int] = {}

    def __call__(self, raw: Iterable[int]) -> list[int]:
        ids = self.ids
        out = []
        for r in raw:
            i = ids.get(r)
            if i is None:
                i = ids[r] = len(ids)
            out.append(i)
        return out


def _count(w: Workload) -> Workload:
    seen: set[int] = set()
    n = 0
    for blocks in w.refs():
        n += len(blocks)
        seen.update(blocks)
    w.n_refs, w.n_unique = n, len(seen)
    return w


# --------------------------------------------------------------------------- Mooncake

def load_mooncake(name: str = "conversation", limit: int | None = None) -> Workload:
    path = MOONCAKE_DIR / f"{name}_trace.jsonl"
    events: list[Event] = []
    intern = Interner()
    with path.open() as f:
        for i, line in enumerate(f):
            if limit is not None and i >= limit:
                break
            r = json.loads(line)
            events.append((r["timestamp"] / 1000.0, REQ, None, intern(r["hash_ids"])))
    events.sort(key=lambda e: e[0])
    return _count(Workload(f"mooncake-{name}", 512, events))


# --------------------------------------------------------------------------- agent sessions

@dataclass
class _Req:
    t: float
    stream: str
    blocks: array
    stop: str
    api_time: float
    sub: bool = False  # a sub-agent's request (its own stream)


@dataclass
class Session:
    index: int
    name: str
    duration: float  # start to end of last request (s)
    reqs: list[_Req]
    stream_end: dict[str, float]  # stream -> end of its last request (relative)
    file: str = ""


def half_of(file_name: str) -> str:
    """The fixed split: 'a' (tuning) or 'b' (held-out), by CRC32 of the file name."""
    return "a" if zlib.crc32(file_name.encode()) % 2 == 0 else "b"


def agent_files(directory: Path = AGENT_DIR) -> list[Path]:
    """The session files of ``directory``: gzipped (``*.json.gz``, the shared set) or not
    (``*.json``, as kv-cache-tester ships them)."""
    return sorted([*directory.glob("*.json.gz"), *directory.glob("*.json")])


class TraceError(ValueError):
    """A session file the replay cannot read, named with what is wrong in it."""


def split_half(files: list[Path], half: str) -> list[Path]:
    """'a' / 'b': a fixed split by a hash of the file name (not by position); 'all'."""
    if half == "all":
        return files
    return [f for f in files if half_of(f.name) == half]


#: Block numbers per session file (see load_session).
_ID_BITS = 20


def _hash_ids(requests: list[dict[str, Any]]) -> set[int]:
    """Every hash id of a session's requests, its sub-agents' included."""
    out: set[int] = set()
    for r in requests:
        if r.get("type") == "subagent":
            out |= _hash_ids(r.get("requests", []))
        else:
            out.update(r.get("hash_ids") or ())
    return out


def load_session(path: Path, index: int, max_requests: int | None = None) -> Session:
    """One session file (see the traces' README for the schema); TraceError names the file
    and what is wrong with it (a traceback from deep inside named neither)."""
    try:
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else path.open()) as f:
            d = json.load(f)
    except (OSError, EOFError, ValueError) as exc:  # (json and gzip errors included)
        raise TraceError(f"{path}: not a readable session file ({exc})") from None
    try:
        return _parse_session(path, index, d, max_requests)
    except TraceError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"field {exc.args[0]!r} missing" if isinstance(exc, KeyError) else str(exc)
        raise TraceError(f"{path}: {what} (see the traces' README for the schema)") from None


def _parse_session(path: Path, index: int, d: Any, max_requests: int | None) -> Session:
    if not isinstance(d, dict) or not isinstance(d.get("requests"), list):
        raise TraceError(f"{path}: not a session (a JSON object with a list 'requests')")
    scope = d.get("hash_id_scope", "local")
    if scope != "local":
        raise TraceError(f"{path}: hash_id_scope {scope!r}: the replay reads 'local' ids only "
                         "(unique within one file)")
    if d.get("block_size", 64) != 64:
        raise TraceError(f"{path}: block_size {d.get('block_size')!r}: the replay models "
                         "64-token blocks")
    base = index << _ID_BITS
    reqs: list[_Req] = []
    # (a null id is the file's name: "None" merged every such session into one stream)
    sid = f"{d.get('id') or path.stem}"
    agents: dict[str, int] = {}
    # A block is (file, hash id): ids are unique within a file only, so each
    # file has its own range of 2^20 block numbers. Ids past it (the schema
    # does not bound them: a raw 64-bit hash, say) are renumbered by rank
    # within the file (they would otherwise fall into another file's range,
    # inventing hits across sessions, or overflow a 64-bit int).
    seen = _hash_ids(d["requests"])
    rank: dict[int, int] | None = None
    if seen and (min(seen) < 0 or max(seen) >= 1 << _ID_BITS):
        if len(seen) > 1 << _ID_BITS:
            raise ValueError(f"{path.name}: {len(seen)} distinct hash ids; a session may "
                             f"have at most {1 << _ID_BITS}")
        rank = {h: i for i, h in enumerate(sorted(seen))}

    def add(rs: list[dict], stream: str, t0: float, sub: bool) -> None:
        for r in rs:
            if r.get("type") == "subagent":
                name = f"{sid}/{r.get('agent_id', len(reqs))}"
                agents[name] = seen_before = agents.get(name, 0) + 1
                if seen_before > 1:  # (two sub-agents with one agent_id: two streams)
                    name = f"{name}#{seen_before}"
                add(r.get("requests") or [], name, t0 + r["t"], True)
                continue
            ids = r.get("hash_ids") or []
            if not ids:
                continue
            blocks = array("q", [base | h for h in ids] if rank is None
                           else [base | rank[h] for h in ids])
            reqs.append(_Req(t0 + float(r["t"]), stream, blocks, r.get("stop") or "",
                             float(r.get("api_time") or 0.0), sub))

    add(d["requests"], sid, 0.0, False)
    if not reqs:
        raise TraceError(f"{path}: no request has hash_ids (nothing to replay)")
    reqs.sort(key=lambda q: q.t)
    if max_requests is not None:
        reqs = reqs[:max_requests]
    ends: dict[str, float] = {}
    for q in reqs:
        ends[q.stream] = max(ends.get(q.stream, 0.0), q.t + q.api_time)
    duration = max(ends.values()) if ends else 0.0
    return Session(index, sid, duration, reqs, ends, path.name)


def load_sessions(files: list[Path], max_requests: int | None = None,
                  indices: list[int] | None = None) -> list[Session]:
    """``indices``: each file's block namespace (default its position in ``files``); two
    sessions replayed together need different ones."""
    idx = indices if indices is not None else list(range(len(files)))
    sessions = [load_session(p, i, max_requests) for i, p in zip(idx, files, strict=True)]
    names: dict[str, str] = {}
    for s in sessions:
        other = names.setdefault(s.name, s.file)
        if other != s.file:
            raise TraceError(f"{s.file} and {other} have the same session id {s.name!r}: "
                             "their streams would be replayed as one")
    return sessions


#: engine-knowable session ends: a main session that made no request for this long (s of
#: trace time) after its last turn ended is ended by the engine (``hints="ends"``)
IDLE_END_S = 900.0

#: the synthetic tool labelling (``hints="tools"``): a tool call is named by the order of
#: magnitude of the real wait that follows it (upper bounds in s, last = the rest) ...
SYNTHETIC_TOOLS = ((5.0, "Read"), (20.0, "Edit"), (60.0, "Bash"), (300.0, "Build"),
                   (float("inf"), "AskUser"))
#: ... except this share of calls, which get another name at random (seeded)
SYNTHETIC_TOOL_NOISE = 0.3


def engine_ends(s: Session, idle_s: float = IDLE_END_S) -> list[tuple[float, str]]:
    """The SessionEnds an engine can send without seeing the future: (time relative to the
    session's start, stream), in time order.

    * A sub-agent is finished when one of its turns ends with ``end_turn`` (a sub-agent
      does not wait for a person: its answer goes back to the parent; in these traces
      every sub-agent's last turn, and only that one, ends so): SessionEnd at that turn end.
    * A main session that has made no request (itself or a sub-agent) for ``idle_s`` after
      its latest turn ended: SessionEnd for each stream of it that made a request since the
      previous such end, ``idle_s`` after that turn end. Whether it is sent depends only on
      requests before that moment; the session may come back later (a new request makes
      the stream live again).

    The traces carry no explicit client calls that would end a session.
    """
    out: list[tuple[float, str]] = []
    busy_until: float | None = None  # latest turn end of the session so far
    active: dict[str, None] = {}  # streams with a request since the last idle end
    for q in s.reqs:  # in start order
        if busy_until is not None and q.t > busy_until + idle_s:
            out.extend((busy_until + idle_s, st) for st in active)
            active.clear()
        active[q.stream] = None
        end = q.t + q.api_time
        busy_until = end if busy_until is None else max(busy_until, end)
        if q.sub and q.stop == "end_turn":
            out.append((end, q.stream))
            active.pop(q.stream, None)
    if busy_until is not None:
        out.extend((busy_until + idle_s, st) for st in active)
    out.sort(key=lambda e: e[0])
    return out


def synthetic_tool_names(s: Session, rng: random.Random) -> dict[int, str]:
    """SYNTHETIC labelling (the traces carry no tool names): request index in ``s.reqs``
    -> a tool name for each turn that ended in a tool call, from the real wait until its
    stream's next request (``SYNTHETIC_TOOLS``), ``SYNTHETIC_TOOL_NOISE`` of them replaced
    by another name. It stands for what an engine adapter passing the called tool's name
    could give, if tools differed in wait as much as these classes do: an optimistic
    labelling, for what tool names could be worth, not a measurement of real tools."""
    names = [n for _, n in SYNTHETIC_TOOLS]
    nxt: dict[str, float] = {}
    out: dict[int, str] = {}
    for i in range(len(s.reqs) - 1, -1, -1):
        q = s.reqs[i]
        if q.stop == "tool_use":
            gap = nxt[q.stream] - (q.t + q.api_time) if q.stream in nxt else float("inf")
            name = next((n for bound, n in SYNTHETIC_TOOLS if gap < bound), names[-1])
            if rng.random() < SYNTHETIC_TOOL_NOISE:
                name = rng.choice([n for n in names if n != name])
            out[i] = name
        nxt[q.stream] = q.t
    return out


def poisson_offsets(sessions: list[Session], k: float, seed: int) -> tuple[list[float], float]:
    """Start offsets (s) in a seeded random order, and the rate; see module docstring."""
    rng = random.Random(seed)
    order = list(range(len(sessions)))
    rng.shuffle(order)
    unit = []  # arrival times of a unit-rate Poisson process
    t = 0.0
    for _ in order:
        unit.append(t)
        t += rng.expovariate(1.0)
    durs = [sessions[i].duration for i in order]

    def concurrency(lam: float) -> float:
        starts = [u / lam for u in unit]
        window = starts[-1] if starts[-1] > 0 else 1.0
        busy = sum(max(0.0, min(s + d, window) - s) for s, d in zip(starts, durs, strict=True))
        return busy / window

    lo, hi = 1e-9, 1e3
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        if concurrency(mid) < k:
            lo = mid
        else:
            hi = mid
    lam = (lo * hi) ** 0.5
    got = concurrency(lam)
    if abs(got - k) > 0.01 * k:
        raise ValueError(f"{len(sessions)} sessions cannot average {k:g} concurrent over "
                         f"their arrival window (at most ~{got:.1f}): use more sessions")
    offsets = [0.0] * len(sessions)
    for u, i in zip(unit, order, strict=True):
        offsets[i] = u / lam
    return offsets, lam


HINT_MODES = ("engine", "session_end", "none", "wrong", "ends", "tools", "ends+tools")


def agent_workload(sessions: list[Session], k: float, seed: int = 1, hints: str = "engine",
                   wrong_share: float = 0.3, name: str = "agent",
                   group_of: Callable[[str], str] = half_of,
                   idle_end_s: float = IDLE_END_S) -> Workload:
    """hints: 'engine' (TurnEnd at each turn end), 'session_end' (the oracle: plus
    SessionEnd per stream right after its last turn), 'ends' (engine hints plus the
    SessionEnds an engine knows: ``engine_ends`` with ``idle_end_s``), 'tools' (engine
    hints with the synthetic tool names of ``synthetic_tool_names``), 'ends+tools',
    'none', or 'wrong' (engine hints, ``wrong_share`` of them replaced by a different
    reason, seeded). ``group_of``: a session's file name -> its label in ``groups``."""
    if hints not in HINT_MODES:
        raise ValueError(f"hints {hints!r}: one of {', '.join(HINT_MODES)}")
    offsets, lam = poisson_offsets(sessions, k, seed)
    rng = random.Random(seed * 7919 + 13)
    tool_rng = random.Random(seed * 104729 + 7)
    events: list[Event] = []
    ns = "agent"
    intern = Interner()
    groups: dict[str | None, str] = {}
    for s, off in zip(sessions, offsets, strict=True):
        g = group_of(s.file) if s.file else "?"
        tools = synthetic_tool_names(s, tool_rng) if "tools" in hints else {}
        for i, q in enumerate(s.reqs):
            groups[q.stream] = g
            events.append((off + q.t, REQ, q.stream, intern(q.blocks)))
            if hints == "none":
                continue
            reason = STOP_REASON.get(q.stop, TurnEndReason.UNSPECIFIED)
            if hints == "wrong" and rng.random() < wrong_share:
                reason = rng.choice([r for r in WRONG_CHOICES if r != reason])
            ev = SessionEvent(ns, q.stream, TurnEnd(reason, tool_name=tools.get(i, "")))
            events.append((off + q.t + q.api_time, HINT, q.stream, ev))
        if hints.startswith("ends"):
            for t, stream in engine_ends(s, idle_end_s):
                # just after the TurnEnd of the same moment (a finished sub-agent)
                events.append((off + t + 1e-6, HINT, stream, SessionEvent(ns, stream,
                                                                         SessionEnd())))
        if hints == "session_end":
            for stream, end in s.stream_end.items():
                # just after the stream's last TurnEnd
                events.append((off + end + 1e-6, HINT, stream, SessionEvent(ns, stream,
                                                                             SessionEnd())))
    events.sort(key=lambda e: (e[0], e[1]))
    w = _count(Workload(f"{name}-K{k:g}-{hints}", 64, events, groups=groups))
    w.meta = {"K": k, "seed": seed, "lambda_per_s": lam, "sessions": len(sessions),
              "window_s": max(offsets) if offsets else 0.0, "hints": hints}
    if hints.startswith("ends"):
        w.meta["idle_end_s"] = idle_end_s
    return w
