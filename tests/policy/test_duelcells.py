"""bench.replay.duelcells: scoring a replay against an earlier cross-validation run's cells
(the final run's layout with --final)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.replay import duelcells


def _cell(fold: int | str, k: int, pct: float, lru: float, belady: float,
          policy: float) -> dict[str, object]:
    return {"fold": fold, "K": k, "seed": 1, "pct": pct, "lru": lru, "belady": belady,
            "policy": policy}


@pytest.fixture
def final_run(tmp_path: Path) -> str:
    path = tmp_path / "cv-final.json"
    path.write_text(json.dumps({
        "protocol": {"capacities": {"16/1": [0.5], "64/1": [2.0, 3.0]}},
        "cells": {
            "after / engine": [_cell(4, 64, 3.0, 0.70, 0.90, 0.75),
                               _cell("all", 64, 3.0, 0.60, 0.80, 0.62),
                               _cell(4, 16, 0.5, 0.50, 0.60, 0.55)],
            "after / ends": [_cell(4, 64, 3.0, 0.70, 0.90, 0.76)],
        }}))
    return str(path)


def test_final_capacities_are_the_final_runs(final_run: str) -> None:
    assert duelcells.final_capacities(final_run, 64, 1) == [2.0, 3.0]
    assert duelcells.final_capacities(final_run, 16, 1) == [0.5]
    assert duelcells.final_capacities(final_run, 32, 1) == []  # (not in that run)


def test_reference_rates_and_policy_per_variant(final_run: str) -> None:
    assert duelcells.reference_rates(final_run, 64, 1, 3.0) == {"4": (0.70, 0.90),
                                                                "all": (0.60, 0.80)}
    assert duelcells.reference_policy(final_run, 64, 1, 3.0, "engine") == {"4": 0.75,
                                                                           "all": 0.62}
    assert duelcells.reference_policy(final_run, 64, 1, 3.0, "ends") == {"4": 0.76}
    assert duelcells.reference_policy(final_run, 64, 1, 3.0, "none") == {}  # not replayed


def test_before_marks_an_exact_reproduction() -> None:
    # before 0.75 on LRU 0.70 / Belady 0.90: 25 % of the gap closed
    assert duelcells._before(0.75, 0.70, 0.90, 0.75, 1000) == " 25.0 == "
    assert duelcells._before(0.75, 0.70, 0.90, 0.746, 1000) == " 25.0 [-4 hits] -> "
    assert duelcells._before(None, 0.70, 0.90, 0.75, 1000) == ""


def test_final_needs_a_capacity_for_a_k_the_final_run_had_not(final_run: str) -> None:
    with pytest.raises(SystemExit):
        duelcells.main(["--final", "--k", "32", "--ref", final_run])
