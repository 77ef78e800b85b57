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


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_refused_put_keeps_the_connection_and_the_reads(server_factory: type,
                                                          transport: str) -> None:
    """ack=remote on a server without an L3 is refused (TierNotConfigured):
    that Put is "not stored", and the blocks already stored still hit (the
    refusal dropped the connection, and every read missed for retry_s)."""
    with server_factory(l1_capacity="64MiB") as server:
        target = server.tcp if transport == "tcp" else server.unix_target
        plain = StoreLink(LinkConfig(target=target, namespace="link-refuse"))
        remote = StoreLink(LinkConfig(target=target, namespace="link-refuse", ack="remote",
                                      retry_s=30.0))
        try:
            assert plain.put([b"kept"], [[memoryview(b"k" * 4096)]]) is True
            assert remote.put([b"refused"], [[memoryview(b"r" * 4096)]]) is False
            assert remote.failures == 1 and type(remote.last_error).__name__ == \
                "TierNotConfigured"
            assert remote.lookup([b"kept"]) == 1  # at once, not after retry_s
            assert remote.exists([b"kept", b"refused"]) == [True, False]
        finally:
            plain.close()
            remote.close()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_a_block_larger_than_its_buffer_misses_alone(server_factory: type, tmp_path,  # type: ignore[no-untyped-def]
                                                     transport: str) -> None:
    """An outside review: in a batch of single-piece buffers (LMCache's), one
    stored block larger than its buffer made every block of the batch a
    miss; the others are answered now."""
    flags = ("--l1-shm-path", f"/dev/shm/kvstore-test-{tmp_path.name}") \
        if transport == "shm" else ()
    with server_factory(*flags, l1_capacity="64MiB") as server:
        target = server.tcp if transport == "tcp" else server.unix_target
        link = StoreLink(LinkConfig(target=target, namespace="link-big",
                                    shm="on" if transport == "shm" else "off"))
        try:
            stored = {b"good": bytes(range(256)) * 16, b"short": b"s" * 100, b"big": b"b" * 9000}
            for key, value in stored.items():
                assert link.put([key], [[memoryview(value)]]) is True
            outs = [np.zeros(4096, dtype=np.uint8) for _ in stored]
            assert link.get(list(stored), [[memoryview(o)] for o in outs]) == [4096, 100, None]
            assert outs[0].tobytes() == stored[b"good"]
            assert outs[1][:100].tobytes() == stored[b"short"]
            # Two keys into one buffer: refused as before (misses), never one
            # block's bytes answered as the other's.
            shared = np.zeros(4096, dtype=np.uint8)
            assert link.get([b"good", b"short"], [[memoryview(shared)]] * 2) == [None, None]
            assert link.failures == 0
        finally:
            link.close()


def test_a_link_config_refuses_what_it_would_get_wrong() -> None:
    """A typo in an engine's kvstore settings is refused when the engine
    starts: a bad ack made every Put fail quietly, and YAML's unquoted
    ``shm: on`` (a boolean) turned shared memory off."""
    with pytest.raises(ValueError, match="ack must be one of"):
        LinkConfig(ack="memroy")
    with pytest.raises(ValueError, match="shm must be one of"):
        LinkConfig.from_mapping({"x.shm": "yes"}, prefix="x.", namespace="n")
    assert LinkConfig.from_mapping({"x.shm": True}, prefix="x.", namespace="n").shm == "on"
    assert LinkConfig.from_mapping({"x.shm": False}, prefix="x.", namespace="n").shm == "off"
    with pytest.raises(ValueError, match="timeout"):
        LinkConfig(timeout=0)


def test_a_namespace_too_long_keeps_the_workers_part() -> None:
    """Cut at 128 characters, a long model path lost the rank / world size /
    dtype that followed it, and every worker read the others' blocks."""
    from kvstore.integrations.link import bounded_namespace
    from kvstore.types import validate_namespace

    head = "lmcache." + "-root-.cache-huggingface-hub-models--org--model-snapshots-" * 2
    names = {bounded_namespace(head, f".w2.{w}.half") for w in (0, 1)}
    names.add(bounded_namespace(head, ".w2.0.bfloat16"))
    names.add(bounded_namespace(head + "x", ".w2.0.half"))
    assert len(names) == 4
    for name in names:
        assert len(name) <= 128
        validate_namespace(name)
    assert bounded_namespace("lmcache.m", ".w1.0.half") == "lmcache.m.w1.0.half"
