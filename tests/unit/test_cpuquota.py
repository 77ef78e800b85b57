"""kvstore.cpuquota: finding the cgroup's cpu.stat, and the pause after its
count of throttled periods rose (what the server's loop and the SDK's busy
poll both read)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstore import cpuquota
from kvstore.cpuquota import ThrottleWatch


def test_cpu_stat_path_finds_the_cgroup(tmp_path: Path) -> None:
    """cgroup v1 (the cpu controller's path under its mount, or the mount's
    own file inside a container), v2, and none."""
    root = tmp_path / "fs"
    (root / "cpu,cpuacct" / "kubepods" / "pod1").mkdir(parents=True)
    (root / "cpu,cpuacct" / "kubepods" / "pod1" / "cpu.stat").write_text("nr_throttled 2\n")
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/kubepods/pod1\n2:cpu,cpuacct:/kubepods/pod1\n")
    assert cpuquota.cpu_stat_path(str(proc), str(root)) == \
        root / "cpu,cpuacct" / "kubepods" / "pod1" / "cpu.stat"
    proc.write_text("2:cpu,cpuacct:/docker/abc\n")  # path hidden: the mount's own
    (root / "cpu,cpuacct" / "cpu.stat").write_text("nr_throttled 0\n")
    assert cpuquota.cpu_stat_path(str(proc), str(root)) == root / "cpu,cpuacct" / "cpu.stat"
    (root / "user.slice").mkdir()
    (root / "user.slice" / "cpu.stat").write_text("usage_usec 5\nnr_throttled 0\n")
    proc.write_text("0::/user.slice\n")
    assert cpuquota.cpu_stat_path(str(proc), str(root)) == root / "user.slice" / "cpu.stat"
    proc.write_text("0::/elsewhere\n")
    (root / "cpu.stat").unlink(missing_ok=True)
    assert cpuquota.cpu_stat_path(str(proc), str(root)) is None
    assert cpuquota.cpu_stat_path(str(tmp_path / "missing"), str(root)) is None


def test_the_watch_pauses_after_the_count_rose_and_only_then(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read at most once per THROTTLE_CHECK_S; a rise of nr_throttled between
    two reads pauses for THROTTLED_PAUSE_S; the first read, a count that did
    not rise, no cgroup, an unreadable file: no pause."""
    now = [100.0]
    stat = tmp_path / "cpu.stat"
    stat.write_text("nr_periods 10\nnr_throttled 4\n")
    watch = ThrottleWatch(lambda: stat, clock=lambda: now[0])
    assert watch.quota_left()  # first read: nothing to compare with
    stat.write_text("nr_periods 20\nnr_throttled 9\n")
    now[0] += cpuquota.THROTTLE_CHECK_S / 2
    assert watch.quota_left()  # not read again yet
    now[0] += cpuquota.THROTTLE_CHECK_S
    assert not watch.quota_left()  # rose: paused
    now[0] += cpuquota.THROTTLED_PAUSE_S - 0.01
    assert not watch.quota_left()  # (read again: no rise, still within the pause)
    now[0] += 0.02
    assert watch.quota_left()
    stat.unlink()
    now[0] += cpuquota.THROTTLE_CHECK_S
    assert watch.quota_left()  # unreadable: as no cgroup
    assert ThrottleWatch(lambda: None, clock=lambda: now[0]).quota_left()
