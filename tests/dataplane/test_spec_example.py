"""docs/dataplane.md's worked example holds the bytes the codec makes."""

from __future__ import annotations

import re
from pathlib import Path

from kvstore.dataplane import frames as f

DOC = Path(__file__).resolve().parents[2] / "docs" / "dataplane.md"


def example_frames(heading: str = "## Worked example\n") -> list[bytes]:
    """Each frame of a worked example: the leading hex pairs of its lines."""
    block = DOC.read_text().split(heading)[1].split("```")[1]
    frames: list[bytes] = []
    for line in block.splitlines():
        if line.startswith(("→", "←")):
            frames.append(b"")
            continue
        if not frames:
            continue
        pairs = []
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            pairs.append(token)
        frames[-1] += bytes.fromhex("".join(pairs))
    return frames


def test_the_worked_example_is_what_the_codec_sends() -> None:
    ticket = bytes(range(32))
    expected = [
        f.frame(f.Op.HELLO, 1, f.Hello(ticket).encode()),
        f.frame(f.Op.HELLO | f.RESPONSE, 1, f.HelloOk(1, 1024**2, 1024**3, 30_000).encode()),
        f.frame(f.Op.PUT, 2, f.PutRequest("chat", [f.PutBlock(b"\xaa\xbb", 5)]).encode(), 5)
        + b"hello",
        f.frame(f.Op.PUT | f.RESPONSE, 2, f.Counted(1, 5).encode()),
        f.frame(f.Op.GET, 3, f.GetRequest("chat", [b"\xaa\xbb"]).encode()),
        f.encode_get_frame(3, 0, 1, 5, 0) + b"hello",
        f.frame(f.Op.ERROR, 3, f.ErrorInfo(5, "UnknownNamespace",
                                           "namespace 'x' is not served here").encode()),
    ]
    assert example_frames() == expected


def test_the_shared_memory_put_example_is_what_the_codec_sends() -> None:
    crc = 0x9A71BB4C  # CRC-32C of b"hello"
    expected = [
        f.frame(f.Op.SHM_COMMIT, 4, f.ShmCommitRequest(
            "chat", [(0x11, 0x1000, 5, crc, 0)], [], 0, True, "", [b"\xaa\xbb"], [5]).encode(),
            0, f.FLAG_SHM_NEXT),
        f.frame(f.Op.SHM_COMMIT | f.RESPONSE, 4, f.ShmCommitResult(
            1, 5, 0, [(0x12, 0x2000, 5, 7)]).encode(), 0, f.FLAG_SHM_NEXT),
    ]
    assert example_frames("## Worked example: a shared-memory Put in one round trip\n") == \
        expected
    assert f.ShmCommitRequest.decode(expected[0][24:], True).keys == [b"\xaa\xbb"]
