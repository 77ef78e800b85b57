"""The data plane by hand, for the conformance and fault tests: frames are
built and parsed here from docs/dataplane.md's tables with ``struct``, not
with kvstore.dataplane.frames (which is what they check)."""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import grpc

from kvstore.wire.pb import kvstore_pb2 as pb

MAGIC = b"KVDP"
HELLO, PING, LOOKUP, GET, PUT = 0x01, 0x02, 0x03, 0x04, 0x05
SHM_RESERVE, SHM_COMMIT, SHM_ACQUIRE, SHM_RELEASE, SESSION_EVENT = 0x06, 0x07, 0x08, 0x09, 0x0A
ERROR = 0xFF
MORE, CLOSING = 0x0001, 0x0002


def u8(v: int) -> bytes:
    return struct.pack("<B", v)


def u16(v: int) -> bytes:
    return struct.pack("<H", v)


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def s(v: bytes | str) -> bytes:
    """A length-prefixed string (u16 length)."""
    raw = v.encode() if isinstance(v, str) else v
    return u16(len(raw)) + raw


def keys(ks: list[bytes]) -> bytes:
    return u32(len(ks)) + b"".join(s(k) for k in ks)


def u64s(vs: list[int]) -> bytes:
    return u32(len(vs)) + b"".join(u64(v) for v in vs)


def header(op: int, rid: int, meta_len: int, payload_len: int = 0, flags: int = 0,
           magic: bytes = MAGIC, version: int = 1) -> bytes:
    return magic + bytes([version, op]) + u16(flags) + u32(rid) + u32(meta_len) + \
        u64(payload_len)


def request(op: int, rid: int, meta: bytes = b"", payload: bytes = b"") -> bytes:
    return header(op, rid, len(meta), len(payload)) + meta + payload


class Frame(NamedTuple):
    op: int
    flags: int
    rid: int
    meta: bytes
    payload: bytes

    def error(self) -> tuple[int, str, str]:
        """An ERROR frame's (code, name, message)."""
        assert self.op == ERROR, self
        code = struct.unpack_from("<H", self.meta)[0]
        n = struct.unpack_from("<H", self.meta, 2)[0]
        name = self.meta[4:4 + n].decode()
        m = struct.unpack_from("<H", self.meta, 4 + n)[0]
        message = self.meta[6 + n:6 + n + m].decode()
        assert 6 + n + m == len(self.meta)
        return code, name, message


#: Every Raw made by the running test.
OPEN: list[Raw] = []


class Raw:
    """A socket speaking frames, every wait bounded."""

    def __init__(self, sock: socket.socket, timeout: float = 20.0) -> None:
        self.sock = sock
        sock.settimeout(timeout)
        OPEN.append(self)  # closed after each test (tests/dataplane/conftest.py)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return bytes(out)

    def frame(self) -> Frame:
        h = self.recv_exact(24)
        assert h[:4] == MAGIC and h[4] == 1, h
        op, flags, rid, meta_len, payload_len = h[5], *struct.unpack_from("<HIIQ", h, 6)
        meta = self.recv_exact(meta_len)
        return Frame(op, flags, rid, meta, self.recv_exact(payload_len))

    def closed(self) -> bool:
        """True when the server closed the connection (EOF, or a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def open_dp(target: str, token: str | None = None, namespace: str = "",
            shm_owner: str = "") -> pb.OpenDataPlaneResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary("/kvstore.v1.KVStore/OpenDataPlane",
                                   request_serializer=pb.OpenDataPlaneRequest.SerializeToString,
                                   response_deserializer=pb.OpenDataPlaneResponse.FromString)
        return call(pb.OpenDataPlaneRequest(namespace=namespace, shm_owner=shm_owner),
                    timeout=10, metadata=metadata)


def connect(resp: pb.OpenDataPlaneResponse, kind: str = "unix") -> Raw:
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(20)
        sock.connect(resp.unix_path)
    else:
        host, _, port = resp.tcp_address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=20)
    return Raw(sock)


def session(target: str, token: str | None = None, kind: str = "unix",
            namespace: str = "") -> Raw:
    """A connection that has said HELLO and got HELLO-OK."""
    resp = open_dp(target, token, namespace)
    raw = connect(resp, kind)
    raw.send(request(HELLO, 1, s(resp.ticket)))
    ok = raw.frame()
    assert ok.op == 0x81 and ok.rid == 1, ok
    return raw


def slow_session(target: str, receive_buffer: int = 16 * 1024) -> Raw:
    """A TCP session (HELLO said) whose socket buffer takes ``receive_buffer``
    bytes at most: a large answer waits in the server until the test reads."""
    resp = open_dp(target)
    host, _, port = resp.tcp_address.rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(20)
    sock.connect((host, int(port)))
    raw = Raw(sock)
    raw.send(request(HELLO, 1, s(resp.ticket)))
    ok = raw.frame()
    assert ok.op == 0x81 and ok.rid == 1, ok
    return raw


def put_meta(namespace: str, blocks: list[tuple[bytes, int, int, int | None]], ack: int = 0,
             session_id: str = "") -> bytes:
    """PUT metadata; blocks: (key, size, format, crc32c or None)."""
    meta = s(namespace) + u8(ack) + s(session_id) + u32(len(blocks))
    for key, size, fmt, crc in blocks:
        meta += s(key) + u64(size) + u8(fmt) + u8(0 if crc is None else 1) + u32(crc or 0)
    return meta


def get_meta(namespace: str, ks: list[bytes], session_id: str = "") -> bytes:
    return s(namespace) + s(session_id) + keys(ks)


def put(raw: Raw, rid: int, namespace: str, blocks: dict[bytes, bytes]) -> Frame:
    meta = put_meta(namespace, [(k, len(v), 0, None) for k, v in blocks.items()])
    raw.send(request(PUT, rid, meta, b"".join(blocks.values())))
    return raw.frame()


def get(raw: Raw, rid: int, namespace: str, ks: list[bytes]) -> list[Frame]:
    """Every response frame to one GET (up to the one without MORE)."""
    raw.send(request(GET, rid, get_meta(namespace, ks)))
    frames = [raw.frame()]
    while frames[-1].flags & MORE:
        frames.append(raw.frame())
    return frames


def block_of(frame: Frame) -> bytes | None:
    """A GET response frame's block, or None for a miss."""
    assert frame.op == 0x84 and len(frame.meta) == 6, frame
    hit = frame.meta[4]
    return frame.payload if hit else None


def ready_info(data_dir: Path) -> dict[str, str]:
    ready = max(data_dir.glob("ready-*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(ready.read_text())  # type: ignore[no-any-return]


def metric(data_dir: Path, name: str) -> float:
    """One unlabelled series from the server's /metrics."""
    address = ready_info(data_dir)["metrics"]
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def wait_until(check: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)  # polling with a deadline
    return bool(check())  # type: ignore[operator]
