"""Client-side argument checking: targets, namespaces, keys, buffers, reassembly."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from kvstore.client import InvalidBuffer, ProtocolError
from kvstore.client._common import (
    GetAssembler,
    channel_options,
    normalize_blocks,
    normalize_buffers,
    normalize_keys,
    parse_ack,
    parse_target,
    resolve_namespace,
)
from kvstore.client._convert import GetPiece
from kvstore.errors import InvalidArgument, InvalidKey, InvalidNamespace
from kvstore.types import AckLevel


@pytest.mark.parametrize(("given", "expected"), [
    ("127.0.0.1:50051", "127.0.0.1:50051"),
    ("  localhost:9000 ", "localhost:9000"),
    ("[::1]:50051", "[::1]:50051"),
    ("kvstore.internal", "kvstore.internal:50051"),
    ("unix:/run/kvstore.sock", "unix:/run/kvstore.sock"),
    ("unix:///run/kvstore.sock", "unix:///run/kvstore.sock"),
    ("unix:relative.sock", "unix:relative.sock"),
    ("/run/kvstore.sock", "unix:/run/kvstore.sock"),
    ("dns:///kv.example:50051", "dns:///kv.example:50051"),
    ("unix-abstract:kvstore", "unix-abstract:kvstore"),
])
def test_parse_target(given: str, expected: str) -> None:
    assert parse_target(given) == expected


@pytest.mark.parametrize("bad", ["", "   ", "host:99999", "unix:", "unix://host/x", "a b:1",
                                 "host:port"])
def test_parse_target_rejects(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_target(bad)


def test_channel_options() -> None:
    opts = dict(channel_options(1 << 20, None))
    assert opts["grpc.max_send_message_length"] == 8 << 20
    assert opts["grpc.max_receive_message_length"] == 8 << 20
    opts = dict(channel_options(16 << 20, {"grpc.max_receive_message_length": 1}))
    assert opts["grpc.max_send_message_length"] > 16 << 20
    assert opts["grpc.max_receive_message_length"] == 1
    opts = dict(channel_options(1 << 20, [("grpc.primary_user_agent", "x")]))
    assert opts["grpc.primary_user_agent"] == "x"


def test_namespace_resolution() -> None:
    assert resolve_namespace(None, "default") == "default"
    assert resolve_namespace("call", "default") == "call"
    with pytest.raises(InvalidNamespace, match="namespace is required"):
        resolve_namespace(None, None)
    with pytest.raises(InvalidNamespace):
        resolve_namespace("-bad", None)
    with pytest.raises(InvalidNamespace):
        resolve_namespace("", "default")


def test_parse_ack() -> None:
    assert parse_ack("memory") is AckLevel.MEMORY
    assert parse_ack("LOCAL") is AckLevel.LOCAL
    assert parse_ack(AckLevel.REMOTE) is AckLevel.REMOTE
    assert parse_ack(2) is AckLevel.LOCAL
    for bad in ("disk", 0, 4, True, None):
        with pytest.raises(InvalidArgument):
            parse_ack(bad)  # type: ignore[arg-type]


def test_keys() -> None:
    assert normalize_keys([b"a", bytearray(b"b"), memoryview(b"c")]) == [b"a", b"b", b"c"]
    with pytest.raises(InvalidKey, match="key #1"):
        normalize_keys([b"a", b""])
    with pytest.raises(InvalidKey, match="65 bytes"):
        normalize_keys([b"k" * 65])
    with pytest.raises(InvalidKey, match="encode the str"):
        normalize_keys(["text"])
    with pytest.raises(InvalidArgument, match="not a single key"):
        normalize_keys(b"abc")
    with pytest.raises(InvalidKey, match="key #0 is an int"):
        normalize_keys([1])


@pytest.mark.parametrize("single", [b"abc", "abc", bytearray(b"abc")])
def test_get_with_a_single_key_says_so(single: object) -> None:
    """``get(b"k")`` instead of ``get([b"k"])``: refused before ``list()`` turns the
    key into ints (or characters), with no server needed."""
    from kvstore.client import AsyncClient, Client

    with Client("127.0.0.1:1", data_plane=False) as client:
        for call in (lambda: client.get(single), lambda: client.get_into(single, [])):  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="not a single key"):
                call()

    async def aio() -> None:
        async with AsyncClient("127.0.0.1:1", data_plane=False) as client:
            with pytest.raises(InvalidArgument, match="not a single key"):
                await client.get(single)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgument, match="not a single key"):
                await client.get_into(single, [])  # type: ignore[arg-type]

    asyncio.run(aio())


def test_data_plane_setting_errors_name_their_source(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvstore.client.dataplane import data_plane_mode

    monkeypatch.delenv("KVSTORE_DATA_PLANE", raising=False)
    with pytest.raises(InvalidArgument) as info:
        data_plane_mode("bogus")
    assert "KVSTORE_DATA_PLANE" not in str(info.value) and "'bogus'" in str(info.value)
    assert data_plane_mode("auto") == "auto" and data_plane_mode(None) == "auto"
    monkeypatch.setenv("KVSTORE_DATA_PLANE", "bogus")
    with pytest.raises(InvalidArgument, match=r"\$KVSTORE_DATA_PLANE must be .* not 'bogus'"):
        data_plane_mode(None)
    monkeypatch.setenv("KVSTORE_DATA_PLANE", "tcp")
    assert data_plane_mode(None) == "tcp"


def test_blocks_accept_buffers_without_copy() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    ba = bytearray(b"xyz")
    blocks = normalize_blocks({b"a": arr, b"b": ba, b"c": b"bytes", b"d": memoryview(b"mv")})
    assert [k for k, _ in blocks] == [b"a", b"b", b"c", b"d"]
    view = blocks[0][1]
    assert view.format == "B" and view.ndim == 1 and len(view) == 48
    assert view.obj is not None
    ba[0] = ord("X")  # shares memory with the caller's buffer
    assert blocks[1][1].tobytes() == b"Xyz"
    pairs = normalize_blocks([(b"k1", b"1"), (b"k2", b"2")])
    assert [(k, v.tobytes()) for k, v in pairs] == [(b"k1", b"1"), (b"k2", b"2")]


def test_blocks_rejects() -> None:
    arr = np.zeros((4, 4), dtype=np.uint8)
    with pytest.raises(InvalidBuffer, match="not C-contiguous") as info:
        normalize_blocks({b"k": arr[:, 1]})
    assert isinstance(info.value, TypeError) and isinstance(info.value, InvalidArgument)
    with pytest.raises(InvalidBuffer, match="buffer protocol"):
        normalize_blocks({b"k": [1, 2, 3]})
    with pytest.raises(InvalidArgument, match="empty"):
        normalize_blocks({b"k": b""})
    with pytest.raises(InvalidArgument, match="pair"):
        normalize_blocks([b"abc"])
    with pytest.raises(InvalidKey, match="key #1"):
        normalize_blocks([(b"ok", b"1"), (b"", b"2")])


def test_buffers() -> None:
    views = normalize_buffers([bytearray(4), np.zeros(2, dtype=np.int64)], 2)
    assert [len(v) for v in views] == [4, 16]
    with pytest.raises(InvalidBuffer, match="read-only"):
        normalize_buffers([b"immutable"], 1)
    with pytest.raises(InvalidArgument, match="2 keys but 1 buffers"):
        normalize_buffers([bytearray(4)], 2)
    with pytest.raises(InvalidBuffer, match="not C-contiguous"):
        normalize_buffers([np.zeros((4, 4))[:, 0]], 1)


def _p(i: int, data: bytes = b"", *, hit: bool = True, size: int = 0, off: int = 0) -> GetPiece:
    return GetPiece(i, hit, size, off, memoryview(data), 1 if size else 0)


def test_assembler_reassembles() -> None:
    asm = GetAssembler(3)
    asm.feed(_p(0, b"abc", size=6))
    asm.feed(_p(0, b"def", off=3))
    asm.feed(_p(1, hit=False))
    asm.feed(_p(2, b"z", size=1))
    out = asm.done()
    assert out == [b"abcdef", None, b"z"]
    assert all(type(x) is bytes for x in (out[0], out[2]))


def test_assembler_into_buffers() -> None:
    bufs = [bytearray(8), np.zeros(3, dtype=np.uint8)]
    asm = GetAssembler(2, normalize_buffers(bufs, 2))
    asm.feed(_p(0, b"ab", size=4))
    asm.feed(_p(0, b"cd", off=2))
    asm.feed(_p(1, b"xyz", size=3))
    assert asm.done() == [4, 3]
    assert bytes(bufs[0][:4]) == b"abcd" and bufs[1].tobytes() == b"xyz"


def test_assembler_buffer_too_small() -> None:
    asm = GetAssembler(2, normalize_buffers([bytearray(8), bytearray(2)], 2))
    asm.feed(_p(0, b"a", size=1))
    with pytest.raises(InvalidArgument, match=r"buffer #1 is 2 bytes but key #1 .* 5 bytes"):
        asm.feed(_p(1, b"abcde", size=5))


@pytest.mark.parametrize("pieces", [
    [_p(1, b"a", size=1)],  # skipped key 0
    [_p(0, b"a", size=2), _p(1, b"b", size=1)],  # switched before complete
    [_p(0, b"a", size=2), _p(0, b"b", off=5)],  # wrong offset
    [_p(0, b"abc", size=2)],  # too many bytes
    [_p(0, b"a", size=0)],  # hit without size
    [_p(0, b"a", size=1, off=1)],  # first chunk not at 0
    [_p(0, b"data", hit=False)],  # miss with data
    [_p(0, hit=False), _p(0, hit=False)],  # key answered twice
])
def test_assembler_rejects_contract_violations(pieces: list[GetPiece]) -> None:
    asm = GetAssembler(2)
    for p in pieces[:-1]:
        asm.feed(p)
    with pytest.raises(ProtocolError):
        asm.feed(pieces[-1])


def test_assembler_incomplete_stream() -> None:
    asm = GetAssembler(2)
    asm.feed(_p(0, hit=False))
    with pytest.raises(ProtocolError, match="after 1 of 2"):
        asm.done()
    asm = GetAssembler(1)
    asm.feed(_p(0, b"a", size=2))
    with pytest.raises(ProtocolError, match="inside key #0"):
        asm.done()
