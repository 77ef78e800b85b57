"""kvstore as a secondary tier under vLLM's TieringOffloadingSpec (GPU -> CPU -> kvstore).

vLLM launch::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "OffloadingConnector",
      "kv_role": "kv_both", "kv_connector_extra_config": {
        "spec_name": "TieringOffloadingSpec", "cpu_bytes_to_use": 8589934592,
        "secondary_tiers": [{"type": "KVStoreTier", "module_path": "kvstore.integrations.vllm",
                             "target": "unix:/run/kvstore/kvstore.sock"}]}}'

vLLM's ``SecondaryTierFactory`` imports ``KVStoreTier`` from ``module_path`` and
passes the tier's other fields as keyword arguments. Every tier call runs in
the scheduler under the manager's lock and must not block, so the tier only
queues work: one I/O thread turns the queued lookups into one kvstore Lookup
per batch (the tier answers RETRY until it knows, then HIT or MISS), each
store job into one Put and each load job into one Get, copying between the
primary CPU tier's chunks (``primary_kv_view[chunk_id]``) and kvstore, and
reports through ``get_finished_jobs()``.

Keys: vLLM's 36-byte offload keys (block hash + group) are kvstore keys as
they are. Namespace: ``vllm.<model>.<dtype>.tp<T>pp<P>.<digest>`` unless given,
the digest of everything that decides a chunk's bytes (the parallel layout,
KV cache groups, canonical or direct layout; see :func:`_namespace`).
Session: ``kv_transfer_params`` of a request may carry ``session_id`` (sent
with its Lookups, Puts and Gets) and, for the end of the turn,
``turn_end`` (tool_call / awaiting_user / done), ``expected_gap_ms``,
``tool_name`` and ``session_end``; these reach kvstore's SessionEvent API when
the request finishes. The same fields are read from a ``kv_hints`` action of
type ``kvstore.session``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvstore.integrations import engine_missing

try:
    from vllm.v1.kv_offload.base import (  # type: ignore[import-not-found, unused-ignore]
        LookupResult,
        Medium,
        OffloadKey,
        ReqContext,
        RequestOffloadingContext,
    )
    from vllm.v1.kv_offload.tiering.base import JobResult, SecondaryTierManager, TransferJob  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:
    raise engine_missing("vllm", "vLLM", "'vllm==0.33.0' (kvstore's vllm extra)") from exc

from kvstore.integrations.link import LinkConfig, StoreLink

log = logging.getLogger("kvstore.integrations.vllm")
_NS_BAD = re.compile(r"[^A-Za-z0-9._:-]")
_HINT_TYPE = "kvstore.session"
#: The lookup answers kept before the first sweep of those past their time.
_KNOWN_SWEEP_MIN = 4096
#: How long an answer no lookup has asked for yet is kept through a sweep.
_UNTOLD_KEEP_S = 60.0
#: The I/O thread's priorities: reads and hints, then stores, then the stop.
_FIRST, _LATER, _LAST = 0, 1, 2


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What one vLLM request tells kvstore's session policy."""

    session_id: str | None = None
    turn_end: str | None = None
    expected_gap_ms: int = 0
    tool_name: str = ""
    session_end: bool = False

    @classmethod
    def of(cls, req: ReqContext) -> SessionInfo:
        fields: dict[str, Any] = dict(req.kv_transfer_params or {})
        hints = getattr(req, "kv_hints", None)
        for action in getattr(hints, "actions", None) or ():
            if getattr(action, "action_type", "") == _HINT_TYPE:
                fields.update(action.payload or {})
        sid = fields.get("session_id")
        return cls(session_id=str(sid) if sid else None,
                   turn_end=str(fields["turn_end"]) if fields.get("turn_end") else None,
                   expected_gap_ms=int(fields.get("expected_gap_ms") or 0),
                   tool_name=str(fields.get("tool_name") or ""),
                   session_end=bool(fields.get("session_end")))


def _session(req: ReqContext) -> SessionInfo:
    info = req.get_state(SessionInfo)
    if info is None:
        info = SessionInfo.of(req)
        req.set_state(info)
    return info


class KVStoreTier(SecondaryTierManager):
    """A vLLM secondary tier backed by kvstore (see the module's docstring)."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(self, offloading_spec: Any, primary_kv_view: memoryview, tier_type: str,
                 target: str = "127.0.0.1:50051", namespace: str | None = None,
                 shm: str = "auto", timeout: float = 10.0, retry_s: float = 1.0,
                 ack: str = "memory", hit_ttl_s: float = 2.0,
                 backpressure_detector: Any = None, **_: Any) -> None:
        super().__init__(offloading_spec=offloading_spec, primary_kv_view=primary_kv_view,
                         tier_type=tier_type, backpressure_detector=backpressure_detector)
        self.link = StoreLink(LinkConfig(target=target,
                                         namespace=namespace or _namespace(offloading_spec),
                                         shm=shm, timeout=timeout, retry_s=retry_s, ack=ack))
        # A 2-D memoryview cannot be indexed by row: address chunk c in a flat view.
        self._flat = primary_kv_view.cast("B") if primary_kv_view.ndim != 1 else primary_kv_view
        self._hit_ttl_s = hit_ttl_s
        self._state = threading.Lock()
        # key -> (stored, when answered, told to the scheduler yet)
        self._known: dict[OffloadKey, tuple[bool, float, bool]] = {}
        self._sweep_at = _KNOWN_SWEEP_MIN
        self._asked: dict[OffloadKey, str | None] = {}  # lookups waiting, with their session
        self._done: list[JobResult] = []
        # (priority, order, item): lookups, loads and session hints go before
        # queued stores -- a new request's lookup must not wait behind a burst
        # of stores (its time to first token does); stores keep their order.
        self._work: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._idle = threading.Condition(self._state)
        self._busy = 0
        self._thread = threading.Thread(target=self._run, name="kvstore-tier", daemon=True)
        self._thread.start()

    # -- scheduler-side calls (non-blocking) --------------------------------------------

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        now = time.monotonic()
        with self._state:
            known = self._known.get(key)
            # An answer (HIT or MISS) is reused for hit_ttl_s: vLLM's scheduler
            # may look a key up more than once in one call (a sliding-window
            # group that tightens the hit re-runs every group's lookup), and an
            # answer told only once would turn the second lookup into RETRY,
            # deferring the request again at every step.
            # A fresh answer is told at least once, however short hit_ttl_s.
            if known is not None and (now - known[1] < self._hit_ttl_s or not known[2]):
                if not known[2]:
                    self._known[key] = (known[0], known[1], True)
                return LookupResult.HIT if known[0] else LookupResult.MISS
            first = not self._asked
            self._asked.setdefault(key, _session(req_context).session_id)
        if first:  # the batch's first key: the thread takes every key asked by then
            self._submit(("lookup",))
        return LookupResult.RETRY

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(("store", job_metadata))

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(("load", job_metadata))

    def get_finished_jobs(self) -> Iterable[JobResult]:
        with self._state:
            done, self._done = self._done, []
        return done

    def has_pending_work(self) -> bool:
        with self._state:
            return self._busy > 0 or bool(self._asked)

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        _session(req_context)
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        info = _session(req_context)
        if info.session_id and (info.turn_end or info.session_end):
            self._submit(("session", info))

    def drain_jobs(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._busy == 0)

    def shutdown(self) -> None:
        self._work.put((_LAST, next(self._order), None))  # after the work queued
        self._thread.join(timeout=30)
        self.link.close()

    # -- the I/O thread -----------------------------------------------------------------

    def _submit(self, item: Any) -> None:
        with self._state:
            self._busy += 1
        self._work.put((_LATER if item[0] == "store" else _FIRST, next(self._order), item))

    def _run(self) -> None:
        while True:
            _, _, item = self._work.get()
            if item is None:
                return
            try:
                kind = item[0]
                if kind == "lookup":
                    self._do_lookups()
                elif kind == "store":
                    self._finish(self._do_store(item[1]))
                elif kind == "load":
                    self._finish(self._do_load(item[1]))
                else:
                    self._do_session(item[1])
            except Exception:  # a tier bug must not stop the thread: fail the job instead
                log.exception("kvstore tier: %s failed", item[0])
                if item[0] in ("store", "load"):
                    self._finish(JobResult(job_id=item[1].job_id, success=False))
            finally:
                with self._idle:
                    self._busy -= 1
                    self._idle.notify_all()

    def _chunk(self, chunk_id: int) -> memoryview:
        size = self.block_size_bytes
        return self._flat[chunk_id * size : (chunk_id + 1) * size]

    def _remember(self, keys: Iterable[OffloadKey], answers: Iterable[bool]) -> None:
        """Record lookup answers (under ``_state``); answers past their
        time are dropped once the table has doubled since the last sweep, so
        it holds about what the last ``hit_ttl_s`` seconds asked or stored,
        not every block ever seen."""
        now = time.monotonic()
        for key, stored in zip(keys, answers, strict=True):
            self._known[key] = (stored, now, False)
        if len(self._known) > self._sweep_at:
            # Answers not yet told are kept a while longer (their request may
            # still ask), not forever (it may have been aborted).
            told_by, untold_by = now - self._hit_ttl_s, now - _UNTOLD_KEEP_S
            self._known = {k: v for k, v in self._known.items()
                           if v[1] >= told_by or (not v[2] and v[1] >= untold_by)}
            self._sweep_at = max(_KNOWN_SWEEP_MIN, 2 * len(self._known))

    def _finish(self, result: JobResult) -> None:
        with self._state:
            self._done.append(result)

    def _do_lookups(self) -> None:
        with self._state:
            asked, self._asked = self._asked, {}
        by_session: dict[str | None, list[OffloadKey]] = {}
        for key, sid in asked.items():
            by_session.setdefault(sid, []).append(key)
        for sid, keys in by_session.items():
            found = self.link.exists([bytes(k) for k in keys], sid)  # one Lookup
            with self._state:
                self._remember(keys, found)

    def _do_store(self, job: TransferJob) -> JobResult:
        keys = [bytes(k) for k in job.keys]
        blocks = [[self._chunk(int(c))] for c in job.chunk_ids]
        start = time.monotonic()
        ok = self.link.put(keys, blocks, _session(job.req_context).session_id)  # one Put
        if ok:
            with self._state:
                self._remember(job.keys, [True] * len(keys))
        return JobResult(job_id=job.job_id, success=ok, transfer_time=time.monotonic() - start,
                         transfer_bytes=self.block_size_bytes * len(keys) if ok else 0)

    def _do_load(self, job: TransferJob) -> JobResult:
        keys = list(job.keys)
        blocks = [[self._chunk(int(c))] for c in job.chunk_ids]
        start = time.monotonic()
        sizes = self.link.get([bytes(k) for k in keys], blocks,
                              _session(job.req_context).session_id)  # one Get
        good = [k for k, n in zip(keys, sizes, strict=True) if n == self.block_size_bytes]
        with self._state:
            for key, n in zip(keys, sizes, strict=True):
                if n != self.block_size_bytes:
                    self._known.pop(key, None)
        return JobResult(job_id=job.job_id, success=len(good) == len(keys),
                         successful_keys=None if len(good) == len(keys) else good,
                         transfer_time=time.monotonic() - start,
                         transfer_bytes=self.block_size_bytes * len(good))

    def _do_session(self, info: SessionInfo) -> None:
        assert info.session_id
        if info.turn_end:
            self.link.turn_end(info.session_id, info.turn_end, info.expected_gap_ms,
                               info.tool_name)
        if info.session_end:
            self.link.session_end(info.session_id)

    def touch(self, keys: Collection[OffloadKey], req_context: ReqContext) -> None:
        return  # recency is kvstore's to track (each Get and Lookup counts)


def _namespace(spec: Any) -> str:
    """``vllm.<model>.<dtype>.tp<T>pp<P>.<layout digest>``.

    A chunk of the primary tier is every worker's bytes of the block in rank
    order, so its bytes depend on the whole parallel layout (TP 4 and TP 2 x
    PP 2 give chunks of the same size and other contents), on the KV cache
    groups and on the canonical or direct layout: all of it is in the digest,
    as vLLM's own file tier keys its folders on it. Data-parallel replicas of
    one layout share a namespace (their chunks are the same bytes)."""
    config = getattr(spec, "config", None)
    model = getattr(config, "model", None)
    name = getattr(model, "name", "") or "model"
    dtype = getattr(model, "dtype", "") or "kv"
    parallel = getattr(config, "parallel", None)
    layout = {
        "world": getattr(parallel, "world_size", 1),
        **{f: getattr(parallel, f, 1) for f in ("tp_size", "pp_size", "pcp_size", "dcp_size")},
        "tokens_per_hash": getattr(getattr(config, "cache", None), "tokens_per_hash", 0),
        "blocks_per_chunk": getattr(getattr(config, "cache", None), "blocks_per_chunk", 0),
        "worker_bytes": getattr(config, "worker_kv_bytes_per_block", 0),
        "groups": [[getattr(g, "tokens_per_block", 0), list(getattr(g, "layer_names", ()))]
                   for g in getattr(config, "groups", ()) or ()],
        "canonical": bool(getattr(config, "canonical_layout", False)),
        "kv_cache_layout": getattr(config, "kv_cache_layout", None),
        "replicated": bool(getattr(config, "replicated_layout", False)),
    }
    digest = hashlib.sha256(json.dumps(layout, sort_keys=True, default=str).encode())
    head = _NS_BAD.sub("-", f"vllm.{name.replace('/', '-')}.{dtype}"
                            f".tp{layout['tp_size']}pp{layout['pp_size']}")
    return f"{head[:128 - 13]}.{digest.hexdigest()[:12]}"
