"""Tables (markdown) and plots (PNG, if matplotlib is installed) from lab rows.

Merge the rows of several lab runs (later files win for the same workload, K, policy and
capacity) into one report, plots and a small summary JSON:

    .venv/bin/python -m bench.replay.report /tmp/replay/*.jsonl --out bench/replay/results \
        --tag final
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

BEST_OF = ("s3fifo", "sieve", "gdsf")


def _groups(rows: list[dict[str, Any]]) -> dict[tuple[str, Any], list[dict[str, Any]]]:
    g: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        g[(r["workload"], r["K"])].append(r)
    return g


def gap_closed(rows: list[dict[str, Any]], label: str) -> list[tuple[int, float, float, bool]]:
    """Per capacity where LRU's hit rate is in [40%, 85%]: (pct, LRU hit, share of the
    LRU->Belady gap in recomputed blocks closed by ``label``, beats best of S3/SIEVE/GDSF)."""
    by = {(r["label"], r["pct"]): r for r in rows}
    out = []
    for pct in sorted({r["pct"] for r in rows}):
        lru, bel, p = by.get(("lru", pct)), by.get(("belady", pct)), by.get((label, pct))
        if not (lru and bel and p) or not 0.40 <= lru["hit_rate"] <= 0.85:
            continue
        gap = lru["misses"] - bel["misses"]
        closed = (lru["misses"] - p["misses"]) / gap if gap > 0 else 0.0
        best = min((by[(b, pct)]["misses"] for b in BEST_OF if (b, pct) in by), default=None)
        out.append((pct, lru["hit_rate"], closed, best is None or p["misses"] < best))
    return out


def tables(rows: list[dict[str, Any]]) -> str:
    lines = []
    for (wl, k), rs in sorted(_groups(rows).items(), key=lambda x: (x[0][0], x[0][1] or 0)):
        pcts = sorted({r["pct"] for r in rs})
        labels = sorted({r["label"] for r in rs}, key=lambda s: (s != "lru", s == "belady", s))
        by = {(r["label"], r["pct"]): r for r in rs}
        head = f"{wl}" + (f", K={k:g}" if k else "")
        meta = rs[0].get("meta") or {}
        window = f", window {meta['window_s']:.0f} s" if meta else ""
        lines.append(f"\n#### {head}  ({rs[0]['n_unique']:,} unique blocks, "
                     f"{rs[0]['refs']:,} refs{window})\n")
        lines.append("| policy | " + " | ".join(f"{p}%" for p in pcts) + " |")
        lines.append("| --- |" + " --- |" * len(pcts))
        for lb in labels:
            cells = []
            for p in pcts:
                r = by.get((lb, p))
                cells.append(f"{100 * r['hit_rate']:.1f}" if r else "")
            lines.append(f"| {lb} | " + " | ".join(cells) + " |")
        lru_ok = []
        for lb in labels:
            if lb in ("lru", "belady"):
                continue
            worst = min(((by[(lb, p)]["hit_rate"] - by[("lru", p)]["hit_rate"]) for p in pcts
                         if (lb, p) in by and ("lru", p) in by), default=None)
            # (no LRU row to compare with: said so, not "+0.00")
            lru_ok.append(f"{lb}: n/a (no LRU rows)" if worst is None else
                          f"{lb}: {100 * worst:+.2f}")
        lines.append(f"\nworst hit-rate difference vs LRU (points): {'; '.join(lru_ok)}")
        for lb in labels:
            if not lb.startswith("session"):
                continue
            gc = gap_closed(rs, lb)
            if gc:
                avg = sum(c for _, _, c, _ in gc) / len(gc)
                cells = ", ".join(f"{p}%: {100 * c:.0f}%{'' if b else ' (not < best baseline)'}"
                                  for p, _, c, b in gc)
                lines.append(f"\n{lb}: gap closed (LRU 40-85% cells) avg **{100 * avg:.0f}%** "
                             f"[{cells}]")
    return "\n".join(lines)


def plots(rows: list[dict[str, Any]], out: Path, tag: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: skipping plots (.venv/bin/pip install matplotlib)")
        return
    for (wl, k), rs in _groups(rows).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        for lb in sorted({r["label"] for r in rs}):
            pts = sorted((r["pct"], r["hit_rate"]) for r in rs if r["label"] == lb)
            ax.plot([p for p, _ in pts], [100 * h for _, h in pts], marker="o", label=lb,
                    linestyle="--" if lb == "belady" else "-")
        ax.set_xscale("log")
        ax.set_xlabel("capacity (% of unique blocks)")
        ax.set_ylabel("block hit rate (%)")
        ax.set_title(f"{wl}" + (f", K={k:g}" if k else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        suffix = f"-K{k:g}" if k else ""
        name = out / f"{tag}-{wl}{suffix}.png"
        fig.tight_layout()
        fig.savefig(name, dpi=100)
        plt.close(fig)
        print(f"wrote {name}")


def split_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of a replay of several groups (e.g. halves a and b of all sessions) -> one
    derived row per group (workload ``<name>[<group>]``) with that group's refs and hits."""
    out = []
    for r in rows:
        extra = r.get("extra") or {}
        groups = sorted(k.split(":", 1)[1] for k in extra if k.startswith("refs:"))
        if len(groups) < 2:
            continue
        for g in groups:
            d = dict(r)
            d["workload"] = f"{r['workload']}[{g}]"
            d["refs"] = int(extra[f"refs:{g}"])
            d["hits"] = int(extra[f"hits:{g}"])
            d["misses"] = d["refs"] - d["hits"]
            d["hit_rate"] = d["hits"] / d["refs"] if d["refs"] else 0.0
            out.append(d)
    return out


def load_rows(paths: list[str]) -> list[dict[str, Any]]:
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for p in paths:
        text = Path(p).read_text()
        rows = json.loads(text)["rows"] if p.endswith(".json") else \
            [json.loads(line) for line in text.splitlines() if line.strip()]
        for r in rows:
            merged[(r["workload"], r["K"], r["label"], r["pct"])] = r
    return list(merged.values())


def speed_table(rows: list[dict[str, Any]]) -> str:
    """Median and best refs/s per policy over the runs (agent, Mooncake)."""
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        if r.get("refs_per_s"):
            kind = "mooncake" if r["workload"].startswith("mooncake") else "agent"
            by[(r["label"], kind)].append(r["refs_per_s"])
    labels = sorted({lb for lb, _ in by}, key=lambda s: (s == "belady", s))
    lines = ["| policy | agent median | agent best | mooncake median | mooncake best |",
             "| --- | --- | --- | --- | --- |"]
    for lb in labels:
        cells = []
        for kind in ("agent", "mooncake"):
            v = by.get((lb, kind))
            cells += [f"{statistics.median(v) / 1e6:.2f}M", f"{max(v) / 1e6:.2f}M"] if v \
                else ["", ""]
        lines.append(f"| {lb} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload: hit rate per policy and capacity, gap closed per session variant."""
    out: dict[str, Any] = {}
    for (wl, k), rs in _groups(rows).items():
        key = wl + (f" K={k:g}" if k else "")
        hit = {f"{r['label']}@{r['pct']}": round(r["hit_rate"], 5) for r in rs}
        gaps = {}
        for lb in sorted({r["label"] for r in rs if r["label"].startswith("session")}):
            gc = gap_closed(rs, lb)
            if gc:
                gaps[lb] = {"cells": {str(p): round(c, 4) for p, _, c, _ in gc},
                            "beats_best_baseline": {str(p): b for p, _, _, b in gc},
                            "mean": round(sum(c for _, _, c, _ in gc) / len(gc), 4)}
        out[key] = {"hit_rate": hit, "gap_closed": gaps}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replay.report")
    ap.add_argument("files", nargs="+", help="lab .json or .partial.jsonl files")
    ap.add_argument("--out", default="")
    ap.add_argument("--tag", default="report")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    rows = load_rows(args.files)
    rows += split_groups(rows)
    print(tables(rows))
    print("\n" + speed_table(rows))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.tag}-summary.json").write_text(json.dumps(summary(rows), indent=1))
        if not args.no_plots:
            plots(rows, out, args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
