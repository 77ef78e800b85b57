"""Replay lab: every policy x capacity x workload, plus Belady; JSON, plots, markdown.

    .venv/bin/python -m bench.replay --suite agent --runs a:16,b:16,all:64 --jobs 2
    .venv/bin/python -m bench.replay --suite mooncake --jobs 2

``--runs`` lists layouts as ``half:K``: the sessions of half ``a`` (tuning), ``b``
(held-out) or ``all``, arriving as a seeded Poisson process with K concurrent on average.
A half (~100 sessions) cannot average 64 concurrent sessions over its arrival window (the
window shrinks to nothing before it does: at most ~n/2), so K=64 replays all 202 and
reports each half's references separately (``Workload.groups``).

The session policy runs with the server's own options: ``--config FILE`` reads its
``[policy.session]`` table (the server's TOML file), ``--session-args JSON`` overrides
options by name (e.g. ``'{"duel": false}'``); both become one ``SessionPolicyConfig``,
recorded with the results, so a tuned policy deploys as is (the same TOML table, or
``--policy-session-<option>`` flags, ``KVSTORE_POLICY_SESSION_<OPTION>`` variables).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench.replay import sim
from bench.replay.workloads import (
    MOONCAKE_DIR,
    TRACES,
    Workload,
    agent_files,
    agent_workload,
    load_mooncake,
    load_sessions,
    split_half,
)
from kvstore import config as kvconfig
from kvstore.config import SessionPolicyConfig
from kvstore.errors import InvalidConfig
from kvstore.policy import POLICIES, SessionPolicy
from kvstore.types import TierName

BASELINES = ("lru", "s3fifo", "sieve", "gdsf")
#: session-policy variants: (label, hint mode of the workload)
SESSION_VARIANTS = (("session", "engine"), ("session+end", "session_end"),
                    ("session/nohints", "none"), ("session/wrong30", "wrong"))
CAPS = (1, 2, 5, 10, 25, 50)

_cache: dict[tuple[Any, ...], Workload] = {}
_nxt: dict[tuple[Any, ...], Any] = {}


def _workload(spec: tuple[Any, ...]) -> Workload:
    w = _cache.get(spec)
    if w is None:
        _cache.clear()
        _nxt.clear()
        if spec[0] == "mooncake":
            w = load_mooncake(spec[1])
        else:
            _, half, k, seed, hints, max_sessions = spec
            files = split_half(agent_files(), half)[:max_sessions]
            w = agent_workload(load_sessions(files), k, seed, hints, name=f"agent-{half}")
        _cache[spec] = w
    return w


def session_config(config_file: str = "", session_args: str = "") -> SessionPolicyConfig:
    """The session policy's options: ``[policy.session]`` of the TOML ``config_file``
    (defaults if none), then ``session_args`` (a JSON object: option -> value, parsed as
    the server parses that option). Unknown options and bad values are InvalidConfig."""
    # The server's order (defaults < file < KVSTORE_* environment): the policy replayed is
    # the one a server started in this environment runs (the environment was ignored).
    cfg = kvconfig.load(env=os.environ, file=config_file or None).policy.session
    if session_args:
        overrides = json.loads(session_args)
        if not isinstance(overrides, dict):
            raise InvalidConfig("--session-args must be a JSON object: option -> value")
        fields = {f.name: f for f in dataclasses.fields(SessionPolicyConfig)}
        values = {}
        for name, raw in overrides.items():
            if name not in fields:
                raise InvalidConfig(f"unknown session policy option {name!r}; options: "
                                    f"{', '.join(fields)}")
            values[name] = fields[name].metadata["parse"](raw)
        cfg = dataclasses.replace(cfg, **values)
    kvconfig.validate_session_policy(cfg)
    return cfg


#: the session policy's options (``--config``, ``--session-args``), set before the runs
SESSION_CONFIG = SessionPolicyConfig()


def run_one(job: tuple[tuple[Any, ...], str, str, int]) -> dict[str, Any]:
    spec, label, policy, pct = job
    w = _workload(spec)
    cap = max(1, int(w.n_unique * pct / 100))
    if policy == "belady":
        if spec not in _nxt:
            _nxt[spec] = sim.next_uses(w)
        r = sim.belady(w, cap, _nxt[spec])
    else:
        p = (SessionPolicy([TierName.L1], SESSION_CONFIG) if policy == "session"
             else POLICIES[policy]([TierName.L1]))
        r = sim.simulate(w, p, cap)
    d = r.as_dict(w.tokens_per_block)
    d.update(label=label, pct=pct, workload=w.name.split("-K")[0] if spec[0] != "mooncake"
             else w.name, K=spec[2] if spec[0] == "agent" else None, meta=w.meta,
             n_unique=w.n_unique)
    if policy == "session":
        d["trust_end"] = p.trust  # type: ignore[attr-defined]
        d["choices"] = dict(p.stats)  # type: ignore[attr-defined]
    print(f"{d['workload']:>22} K={d['K']} {label:>16} {pct:>3}% hit={d['hit_rate']:.4f} "
          f"{d['refs_per_s'] / 1e6:.2f}M refs/s", flush=True)
    return d


def jobs_for(args: argparse.Namespace) -> list[tuple[tuple[Any, ...], str, str, int]]:
    caps = [int(c) for c in args.caps.split(",")]
    jobs = []
    if args.suite in ("mooncake", "all"):
        for name in ("conversation", "synthetic"):
            spec = ("mooncake", name)
            for pct in caps:
                for pol in (*BASELINES, "session", "belady"):
                    jobs.append((spec, pol, pol, pct))
    only = set(args.only.split(",")) if args.only else None
    if args.suite in ("agent", "all"):
        for run in args.runs.split(","):
            half, k_s = run.split(":")
            k = float(k_s)
            for label, hints in (("", "engine"), *[(lb, h) for lb, h in SESSION_VARIANTS]):
                spec = ("agent", half, k, args.seed, hints, args.max_sessions)
                pols = [(p, p) for p in (*BASELINES, "belady")] if not label \
                    else [(label, "session")]
                pols = [(lb, p) for lb, p in pols if only is None or lb in only]
                for pct in caps:
                    for lb, pol in pols:
                        jobs.append((spec, lb, pol, pct))
    if only is not None:
        jobs = [j for j in jobs if j[1] in only]
    return jobs


def missing_traces(args: argparse.Namespace) -> str:
    """What the runs asked for lack ("" when nothing): a clear refusal, not
    a traceback from deep inside a worker."""
    if args.suite in ("mooncake", "all"):
        for name in ("conversation", "synthetic"):
            path = MOONCAKE_DIR / f"{name}_trace.jsonl"
            if not path.is_file():
                return f"no Mooncake trace {path}"
    if args.suite in ("agent", "all"):
        for run in args.runs.split(","):
            half = run.split(":")[0]
            if not split_half(agent_files(), half):
                return f"no agent sessions for half {half!r} in {TRACES / 'agentic-cc' / 'dev'}"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=("agent", "mooncake", "all"), default="all")
    ap.add_argument("--runs", default="a:16,b:16,all:64",
                    help="agent layouts half:K (half a = tuning, b = held-out, all), "
                         "comma-separated")
    ap.add_argument("--only", default="",
                    help="run only these labels (e.g. session,session+end), comma-separated")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--caps", default=",".join(map(str, CAPS)),
                    help="capacities, %% of unique blocks")
    ap.add_argument("--max-sessions", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default="bench/replay/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--config", default="",
                    help="the server's TOML config file: the session policy runs with its "
                         "[policy.session] options")
    ap.add_argument("--session-args", default="",
                    help='session policy options (JSON, override --config), e.g. '
                         '\'{"duel": false}\'')
    args = ap.parse_args(argv)
    if args.only:
        known = {*BASELINES, "belady", "session", *(label for label, _ in SESSION_VARIANTS)}
        unknown = sorted(set(args.only.split(",")) - known)
        if unknown:
            ap.error(f"--only: unknown labels {', '.join(unknown)}; labels: "
                     f"{', '.join(sorted(known))}")
    missing = missing_traces(args)
    if missing:
        ap.error(f"{missing}: the replay reads the shared traces from {TRACES} "
                 "(KVSTORE_TRACES, else shared/traces beside the checkout)")
    global SESSION_CONFIG
    SESSION_CONFIG = session_config(args.config, args.session_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = jobs_for(args)
    t0 = time.time()
    tag = args.tag or args.suite
    partial = out / f"{tag}.partial.jsonl"  # one row per finished run, as they finish
    rows = []
    with partial.open("w") as f:
        if args.jobs > 1:
            with mp.get_context("fork").Pool(args.jobs) as pool:
                for d in pool.imap_unordered(run_one, jobs, chunksize=1):
                    rows.append(d)
                    f.write(json.dumps(d) + "\n")
                    f.flush()
        else:
            for j in jobs:
                rows.append(run_one(j))
                f.write(json.dumps(rows[-1]) + "\n")
    path = out / f"{tag}.json"
    path.write_text(json.dumps({"args": vars(args), "rows": rows,
                                "session_config": dataclasses.asdict(SESSION_CONFIG),
                                "wall_s": time.time() - t0}, indent=1))
    print(f"wrote {path} ({len(rows)} runs, {time.time() - t0:.0f} s)")
    from bench.replay.report import plots, tables
    print(tables(rows))
    plots(rows, out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
