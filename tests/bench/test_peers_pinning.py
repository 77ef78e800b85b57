"""bench.peers --pin: every system's processes go on the same CPUs, so a
latency comparison is not a comparison of the scheduler's placements."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from bench.peers import pin_process, placement


def test_placement_modes() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    assert placement("none") is None
    assert placement("same") == ({cpus[0]}, {cpus[0]})
    if len(cpus) >= 2:
        assert placement("apart") == ({cpus[0]}, {cpus[1]})
    else:
        with pytest.raises(SystemExit, match="two CPUs"):
            placement("apart")


def test_pin_process_moves_every_thread_and_threads_started_later() -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    code = ("import threading, os, sys\n"
            "ev = threading.Event()\n"
            "threading.Thread(target=ev.wait, daemon=True).start()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "out = []\n"
            "t = threading.Thread(target=lambda: out.append(os.sched_getaffinity(0)))\n"
            "t.start(); t.join()\n"
            "print(sorted(out[0]), flush=True)\n")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert proc.stdout.readline().strip() == "ready"
            pin_process(proc.pid, {cpu})
            tids = os.listdir(f"/proc/{proc.pid}/task")
            assert len(tids) >= 2
            assert all(os.sched_getaffinity(int(t)) == {cpu} for t in tids)
            proc.stdin.write("\n")
            proc.stdin.flush()
            started = time.monotonic()
            line = proc.stdout.readline().strip()
            assert time.monotonic() - started < 20
            assert line == str([cpu])
        finally:
            proc.kill()
