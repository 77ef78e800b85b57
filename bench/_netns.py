"""Two hosts on one machine: network namespaces joined by a link with an
added round-trip delay, for ``bench.cross_host`` and its test.

``NetnsPair`` makes two uniquely named namespaces, a *server* side (address
``SERVER_IP``) and a *client* side (``CLIENT_IP``), and a link between them
whose round-trip time it raises by ``set_delay(ms)``, half in each direction:

* ``netem``: a veth pair with a ``tc netem`` qdisc on each end (the kernel's
  own delay line), when this kernel has sch_netem;
* ``tun``: otherwise, a TUN device in each namespace (point to point, MTU
  65,000, so one packet carries up to 64 KB as a GSO segment would) and one
  forwarding process per direction that holds each packet for the delay
  before writing it to the other side: ``bench/_delayline.c``, compiled
  with ``cc`` on first use, or the same loop in Python (``python -m
  bench._netns delay-line``) where there is no compiler. The TCP stacks on
  both sides see a real delay; what it adds besides is the forwarder's own
  cost, which the raw-socket baseline of the bench shows (at delay 0 too,
  since the link is the same at every delay).

``close`` deletes the namespaces (and with them the link and every process's
view of it); the forwarders exit when their devices go. Needs root (or
CAP_NET_ADMIN and CAP_SYS_ADMIN): :func:`netns_unavailable` says why not.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import fcntl
import hashlib
import os
import select
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

SERVER_IP = "10.200.0.1"
CLIENT_IP = "10.200.0.2"
_TUN_MTU = 65_000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _compiled_delay_line() -> str | None:
    """The C delay line's executable (built once per source version), or None
    without a C compiler."""
    source = Path(__file__).with_name("_delayline.c")
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvstore"
    exe = cache / f"delayline-{digest}"
    if exe.exists():
        return str(exe)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_suffix(f".{os.getpid()}")
    try:
        done = subprocess.run(["cc", "-O2", "-o", str(tmp), str(source)], capture_output=True)
    except FileNotFoundError:
        return None
    if done.returncode != 0:
        return None
    os.replace(tmp, exe)
    return str(exe)


def netns_unavailable() -> str | None:
    """Why two namespaces cannot be made here (None: they can)."""
    name = f"kvprobe{os.getpid()}"
    try:
        done = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    except FileNotFoundError:
        return "the `ip` command (iproute2) is not installed"
    if done.returncode != 0:
        return f"`ip netns add` is not permitted here: {done.stderr.strip()}"
    try:
        if not _has_netem(name) and not os.path.exists("/dev/net/tun"):
            return "this kernel has neither sch_netem (tc netem) nor /dev/net/tun to delay a link"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _has_netem(ns: str) -> bool:
    """Whether ``tc netem`` works (tried on the loopback of namespace ``ns``)."""
    try:
        probe = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo",
                                "root", "netem", "delay", "1ms"], capture_output=True)
    except FileNotFoundError:
        return False
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"],
                   capture_output=True)
    return probe.returncode == 0


class NetnsPair:
    """See the module's docstring. ``method``: "auto" (netem if the kernel
    has it, else tun), "netem" or "tun"."""

    def __init__(self, method: str = "auto") -> None:
        tag = uuid.uuid4().hex[:6]
        self.server_ns = f"kvxh-{tag}-srv"
        self.client_ns = f"kvxh-{tag}-cli"
        self._links = (f"kvxh{tag}s", f"kvxh{tag}c")  # at most 15 characters
        self.want = method
        self.method = ""
        self.line = ""  # tun: which delay line forwards ("C" or "Python")
        self.delay_ms = 0.0
        self._forwarders: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    # -- set-up --------------------------------------------------------------------

    def start(self) -> NetnsPair:
        try:
            for ns in (self.server_ns, self.client_ns):
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            method = self.want
            if method == "auto":
                method = "netem" if _has_netem(self.server_ns) else "tun"
            if method == "netem":
                self._veth()
            else:
                self._tun()
            self.method = method
        except BaseException:
            self.close()
            raise
        return self

    def _veth(self) -> None:
        s, c = self._links
        _ip("link", "add", s, "type", "veth", "peer", "name", c)
        for link, ns, addr in ((s, self.server_ns, SERVER_IP), (c, self.client_ns, CLIENT_IP)):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")

    def _tun(self) -> None:
        fds = {}
        try:
            for link in self._links:
                fd = os.open("/dev/net/tun", os.O_RDWR)
                fds[link] = fd
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", link.encode(),
                                                        _IFF_TUN | _IFF_NO_PI))
            s, c = self._links
            for link, ns, addr, peer in ((s, self.server_ns, SERVER_IP, CLIENT_IP),
                                         (c, self.client_ns, CLIENT_IP, SERVER_IP)):
                _ip("link", "set", link, "netns", ns)
                _ip("-n", ns, "link", "set", link, "mtu", str(_TUN_MTU), "txqueuelen", "10000")
                _ip("-n", ns, "addr", "add", addr, "peer", peer, "dev", link)
                _ip("-n", ns, "link", "set", link, "up")
            exe = _compiled_delay_line()
            self.line = "C" if exe else "Python"
            line = [exe] if exe else [sys.executable, "-m", "bench._netns", "delay-line"]
            for src, dst in ((s, c), (c, s)):
                self._forwarders.append(subprocess.Popen(
                    [*line, str(fds[src]), str(fds[dst])], stdin=subprocess.PIPE,
                    pass_fds=(fds[src], fds[dst]), cwd=Path(__file__).resolve().parent.parent))
        finally:
            for fd in fds.values():
                os.close(fd)  # the forwarders hold them now

    # -- use -----------------------------------------------------------------------

    def set_delay(self, rtt_ms: float) -> None:
        """Add ``rtt_ms`` to the round trip (half each way)."""
        half = rtt_ms / 2.0
        if self.method == "netem":
            for link, ns in zip(self._links, (self.server_ns, self.client_ns), strict=True):
                args = ["ip", "netns", "exec", ns, "tc", "qdisc"]
                subprocess.run([*args, "del", "dev", link, "root"], capture_output=True)
                if rtt_ms > 0:
                    subprocess.run([*args, "add", "dev", link, "root", "netem", "delay",
                                    f"{half * 1000:.0f}us", "limit", "100000"],
                                   check=True, capture_output=True)
        else:
            for proc in self._forwarders:
                assert proc.stdin is not None
                proc.stdin.write(f"{half / 1000.0!r}\n".encode())
                proc.stdin.flush()
        self.delay_ms = rtt_ms

    def describe(self) -> str:
        return f"tun link, {self.line} delay line" if self.method == "tun" else \
            "veth pair, tc netem"

    def argv(self, ns: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside namespace ``ns``."""
        return ["ip", "netns", "exec", ns, *command]

    def close(self) -> None:
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made = []
        for proc in self._forwarders:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input: the forwarder exits
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forwarders = []

    def __enter__(self) -> NetnsPair:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the TUN delay line (one process per direction) -----------------------------------


def _fine_timer_slack() -> None:
    """Wake-ups within microseconds of the deadline (the default slack is 50 µs)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(29, 1000, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 µs
    except (OSError, AttributeError):
        pass


def delay_line(fd_in: int, fd_out: int, control: int) -> None:
    """Copy IP packets from ``fd_in`` to ``fd_out``, each held for the current
    one-way delay (s, read as lines from ``control``; end of input: exit)."""
    _fine_timer_slack()
    os.set_blocking(fd_in, False)
    delay = [0.0]
    done = threading.Event()

    def read_control() -> None:
        with os.fdopen(control, "rb") as lines:
            for line in lines:
                delay[0] = float(line)
        done.set()

    threading.Thread(target=read_control, daemon=True).start()
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    while not done.is_set():
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            try:
                os.write(fd_out, queue.popleft()[1])
            except OSError:  # the other side is gone or full: the packet is lost
                pass
        timeout = max(0.0, queue[0][0] - now) if queue else 0.2
        try:
            readable, _, _ = select.select([fd_in], [], [], timeout)
        except OSError:
            return
        if not readable:
            continue
        while True:
            try:
                packet = os.read(fd_in, 65_536)
            except BlockingIOError:
                break
            except OSError:  # the device went with its namespace
                return
            queue.append((time.monotonic() + delay[0], packet))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._netns")
    sub = parser.add_subparsers(dest="cmd", required=True)
    line = sub.add_parser("delay-line", help="forward one direction (internal)")
    line.add_argument("fd_in", type=int)
    line.add_argument("fd_out", type=int)
    args = parser.parse_args(argv)
    delay_line(args.fd_in, args.fd_out, sys.stdin.fileno())


if __name__ == "__main__":
    main()
