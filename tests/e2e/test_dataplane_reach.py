"""An engine that reaches the server's gRPC but whose data plane, at the
address the server offers, is out of reach or not this server's: the setups
of docs/deploy.md ("Data plane") and docs/cross-host.md, where the engine is
on another host behind a Service, a NAT or a port-forward. Every call must
return the right bytes by gRPC, and opening the data plane may cost a call
OPEN_TIMEOUT_S at most, not the client's timeout, and not again at once.

The unreachable cases need a network namespace of their own for the client
(``unshare -n -m``, root; the mount namespace gives it a directory of its
own): a port-forward into it carries gRPC to the server's unix socket, and
the data plane's port or path as offered leads to whatever the test puts
there. Without the privilege they are skipped with the reason."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvstore import TLS, AsyncClient, Client
from kvstore.client._dproute import OPEN_TIMEOUT_S
from tests.pki import make_ca, make_leaf, needs_openssl

ROOT = Path(__file__).resolve().parents[2]


@needs_openssl
def test_tls_data_plane_checks_the_name_the_client_reached_grpc_at(
        server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The certificate names the server as clients reach it (here only
    "localhost"); the data plane offers the address it listens on
    (127.0.0.1). Checking the certificate against that address failed the
    handshake, and the client kept to gRPC without a word above debug."""
    make_ca(tmp_path, "ca")
    cert, key = make_leaf(tmp_path, "ca", "server", "DNS:localhost")
    with server_factory("--server-tls-cert", str(cert), "--server-tls-key", str(key),
                        unix=False) as server:
        target = f"localhost:{server.tcp.rsplit(':', 1)[1]}"
        tls = TLS(ca=str(tmp_path / "ca.pem"))
        with Client(target, namespace="tlsname", tls=tls, timeout=10, data_plane="tcp") as c:
            c.put({b"k": b"v" * 4096})
            assert c.get([b"k"]) == [b"v" * 4096]
            assert c.data_plane_calls == 2

        async def aio() -> int:
            async with AsyncClient(target, namespace="tlsname", tls=tls, timeout=10,
                                   data_plane="tcp") as a:
                await a.put({b"a": b"w" * 4096})
                assert await a.get([b"a", b"k"]) == [b"w" * 4096, b"v" * 4096]
                return a.data_plane_calls

        assert asyncio.run(aio()) == 2


def _unshare_unavailable() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip (util-linux, iproute2) is not installed"
    done = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, text=True,
                          timeout=10)
    if done.returncode != 0:
        return f"`unshare -n -m` is not permitted here: {done.stderr.strip()}"
    return None


# Runs in its own network namespace: argv = the server's gRPC unix socket, the
# data plane's offered port, what to put there; prints one JSON line.
CLIENT = textwrap.dedent("""
    import asyncio, json, logging, os, socket, subprocess, sys, tempfile, threading, time
    from kvstore import AsyncClient, Client

    grpc_unix, port, there = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    warnings = []
    class Catch(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                warnings.append(record.getMessage())
    logging.getLogger("kvstore.client").addHandler(Catch())

    def pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # A port-forward (kubectl port-forward, an SSH tunnel) to the server's gRPC.
    forward = socket.create_server(("127.0.0.1", 0))
    def serve():
        while True:
            c, _ = forward.accept()
            u = socket.socket(socket.AF_UNIX)
            u.connect(grpc_unix)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    target = f"127.0.0.1:{forward.getsockname()[1]}"

    held, other = [], None
    if there == "blackhole":  # a full accept queue: SYNs are dropped, not refused
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", port))
        lsock.listen(0)
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            held.append(s)
        time.sleep(0.2)  # the handshakes complete in the kernel, no answer to wait for
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            sys.exit("the blackhole accepted a connection")
        except TimeoutError:
            pass
    elif there == "closing":  # accepts and closes (a proxy or sidecar with no upstream)
        lsock = socket.create_server(("127.0.0.1", port))
        def close_each():
            while True:
                conn, _ = lsock.accept()
                conn.close()
        threading.Thread(target=close_each, daemon=True).start()
    elif there == "stall":  # accepts and never answers
        lsock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=lambda: [held.append(lsock.accept()) for _ in iter(int, 1)],
                         daemon=True).start()
    elif there.startswith("other-server"):  # another kvstore server's data plane there
        d = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(__file__)))
        if there == "other-server-unix":  # this host's own server, at the same path
            unix = sys.argv[4]
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", os.path.dirname(unix)], check=True)
            listen = ["--server-data-plane-listen", "off", "--server-data-plane-unix", unix]
        else:
            listen = ["--server-data-plane-listen", f"127.0.0.1:{port}"]
        other = subprocess.Popen(
            [sys.executable, "-m", "kvstore", "serve", "--data-dir", d,
             "--server-listen", "127.0.0.1:0", *listen,
             "--l1-capacity", "32MiB", "--l1-prefault", "false",
             "--ready-file", d + "/ready.json"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not os.path.exists(d + "/ready.json") or not os.path.getsize(d + "/ready.json"):
            assert time.monotonic() < deadline and other.poll() is None, "other server"
            time.sleep(0.05)
        other_target = json.load(open(d + "/ready.json"))["tcp"]

    block = os.urandom(64 * 1024)
    out = {}

    async def aio():
        async with AsyncClient(target, namespace="reach", timeout=8) as a:
            times, right = [], True
            for i in range(4):
                started = time.monotonic()
                await a.put({b"a%d" % i: block})
                right &= await a.get([b"a%d" % i]) == [block]
                times.append(time.monotonic() - started)
            return {"times": times, "right": right, "dp_calls": a.data_plane_calls}

    try:
        with Client(target, namespace="reach", timeout=8) as c:
            times, right = [], True
            for i in range(4):
                started = time.monotonic()
                c.put({b"s%d" % i: block})
                right &= c.get([b"s%d" % i]) == [block]
                times.append(time.monotonic() - started)
            out["sync"] = {"times": times, "right": right, "dp_calls": c.data_plane_calls}
        out["aio"] = asyncio.run(aio())
        out["warnings"] = warnings
        if other is not None:
            with Client(other_target, namespace="reach", data_plane=False) as o:
                out["on_other"] = o.lookup([b"s0", b"a0"]).found
    finally:
        if other is not None:
            other.terminate()
            other.wait(30)
    print(json.dumps(out))
""")


@pytest.mark.parametrize("there", ["blackhole", "stall", "closing", "other-server",
                                   "other-server-unix"])
def test_a_data_plane_out_of_reach_costs_one_bounded_try(
        server_factory, tmp_path: Path, there: str) -> None:  # type: ignore[no-untyped-def]
    """blackhole: the offered port drops SYNs (a Service or NAT that does not
    pass it); stall: it accepts and never answers; closing: it accepts and
    closes (a proxy or mesh sidecar with nowhere to send it); other-server: it is
    another kvstore server's data plane (a port-forward from a host that runs
    its own), on that port or at the unix socket path the server offers (a
    client that reaches gRPC at loopback looks there first). Before: the
    first call took the client's whole timeout (8 s here, 60 by default) and
    so did one every 5 s after (blackhole), every call raised
    DeadlineExceeded (stall), ConnectionFailed (closing) or Unauthenticated
    (other-server)."""
    why = _unshare_unavailable()
    if why:
        pytest.skip(why)
    unix = tmp_path / "dp" / "kv.sock"  # the other server's, on the client's "host"
    server = server_factory("--server-listen", "0.0.0.0:0", "--server-data-plane-unix",
                            str(unix) if there == "other-server-unix" else "off")
    server.start()
    ready = json.loads(sorted(server.data_dir.glob("ready-*.json"))[-1].read_text())
    port = ready["data_plane_tcp"].rsplit(":", 1)[1]
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-n", "-m", sys.executable, str(script), server.unix, port,
                           there, str(unix)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for side in ("sync", "aio"):
        got = out[side]
        assert got["right"] and got["dp_calls"] == 0, got
        first, *later = got["times"]
        assert first < OPEN_TIMEOUT_S + 2.5, got  # one bounded try, then gRPC
        assert max(later) < 1.0, got  # not tried again at once
    assert len(out["warnings"]) == 2, out["warnings"]  # one per client, saying why
    assert all("calls go by gRPC" in w for w in out["warnings"]), out["warnings"]
    if there == "other-server":
        assert out["on_other"] == 0  # nothing reached the other server


# Runs in its own network and mount namespaces: argv = a scratch directory;
# this "host" has the IPv6 address fd00::1 only, named v6host.test.
V6_SERVER = textwrap.dedent("""
    import json, os, subprocess, sys, time
    from kvstore import Client

    d = sys.argv[1]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", "fd00::1/128", "dev", "lo"], check=True)
    with open(d + "/hosts", "w") as f:
        f.write("127.0.0.1 localhost\\nfd00::1 v6host.test\\n")
    subprocess.run(["mount", "--bind", d + "/hosts", "/etc/hosts"], check=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--data-dir", d + "/data",
         "--server-listen", "v6host.test:0", "--l1-capacity", "32MiB", "--l1-prefault", "false",
         "--ready-file", d + "/ready.json"], stdout=subprocess.DEVNULL,
        stderr=open(d + "/server.log", "w"))
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(d + "/ready.json") or not os.path.getsize(d + "/ready.json"):
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("the server did not start: " + open(d + "/server.log").read()[-500:])
            time.sleep(0.05)
        ready = json.load(open(d + "/ready.json"))
        port = ready["tcp"].rsplit(":", 1)[1]
        with Client(f"v6host.test:{port}", namespace="v6", timeout=10, data_plane="tcp") as c:
            c.put({b"k": b"v" * 4096})
            right = c.get([b"k"]) == [b"v" * 4096]
            print(json.dumps({"offer": ready["data_plane_tcp"], "right": right,
                              "dp_calls": c.data_plane_calls}))
    finally:
        server.terminate()
        server.wait(30)
""")


def test_a_server_at_an_ipv6_only_name_serves_its_data_plane(tmp_path: Path) -> None:
    """server.listen names a host with IPv6 addresses only (an IPv6-only
    cluster). The data plane's listener took an IPv4 socket for any name
    without a colon, and the server refused to start ("cannot listen
    there ... Temporary failure in name resolution")."""
    why = _unshare_unavailable()
    if why:
        pytest.skip(why)
    script = tmp_path / "v6.py"
    script.write_text(V6_SERVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["unshare", "-n", "-m", sys.executable, str(script), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"offer": out["offer"], "right": True, "dp_calls": 2}, out
    assert out["offer"].startswith("v6host.test:"), out
