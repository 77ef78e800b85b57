"""Tables (markdown) and plots (PNG, if matplotlib is installed) from lab rows."""

from __future__ import annotations

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
                         if (lb, p) in by and ("lru", p) in by), default=0.0)
            lru_ok.append(f"{lb}: {100 * worst:+.2f}")
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
