"""The engine adapters' link (``kvstore.integrations.link.StoreLink``) against a
real server, without any engine: what it answers when the server refuses a
request, which no engine would otherwise hear of."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kvstore.errors import BlockTooLarge
from kvstore.integrations.link import LinkConfig, StoreLink

KiB = 1024


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_chunk_over_the_servers_limit_is_counted_and_said_once(
        server_factory: type, transport: str, caplog: pytest.LogCaptureFixture) -> None:
    with server_factory("--server-max-block-bytes", "256KiB", l1_capacity="64MiB") as server:
        target = server.tcp if transport == "tcp" else server.unix_target
        link = StoreLink(LinkConfig(target=target, namespace="link-limit", shm="off"))
        try:
            big = memoryview(bytes(300 * KiB))
            with caplog.at_level(logging.WARNING, logger="kvstore.integrations"):
                assert link.put([b"big"], [[big]]) is False
                assert link.put([b"big2"], [[big]]) is False
            assert link.failures == 2
            assert isinstance(link.last_error, BlockTooLarge)
            said = [r for r in caplog.records if "BlockTooLarge" in r.getMessage()]
            assert len(said) == 1, [r.getMessage() for r in caplog.records]
            assert "256" in said[0].getMessage() or "262144" in said[0].getMessage()
            # The connection was kept: the next chunk that fits is stored at once
            # (a dropped one would answer misses for retry_s).
            client = link.client()
            small = np.arange(64 * KiB, dtype=np.uint8)
            assert link.put([b"small"], [[memoryview(small)]]) is True
            assert link.client() is client
            out = np.zeros(64 * KiB, dtype=np.uint8)
            assert link.get([b"small"], [[memoryview(out)]]) == [64 * KiB]
            assert np.array_equal(out, small)
            # A block larger than the engine's buffer is a miss, not a failure.
            tiny = np.zeros(KiB, dtype=np.uint8)
            assert link.get([b"small"], [[memoryview(tiny)]]) == [None]
            assert link.failures == 2
        finally:
            link.close()
