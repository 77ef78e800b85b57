"""An engine developer misusing the public SDK, against a real server: every
client kind (Client, AsyncClient, ShmClient; data plane on and off) answers
each mistake with a clear error from kvstore.errors (or TypeError/ValueError
naming the argument) at once, stores nothing wrong, and the server stays up."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from serverproc import ServerProcess

from kvstore import AsyncClient, Client
from kvstore.client import InvalidBuffer
from kvstore.client import _convert as conv
from kvstore.client._aioput import put_stream
from kvstore.client.shm import ShmClient
from kvstore.errors import InvalidArgument, InvalidKey, InvalidNamespace

#: A client's deadline in these tests: a mistake must fail well before it.
TIMEOUT = 20.0
#: ... within this (a mistake found by the SDK costs no round trip).
PROMPT = 10.0

KINDS = ["sync", "sync-grpc", "aio", "aio-grpc", "shm", "shm-grpc"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("misuse")
    arena = f"/dev/shm/kvstore-test-misuse-{os.getpid()}"
    with ServerProcess(data, "--l1-shm-path", arena, l1_capacity="64MiB") as srv:
        yield srv
    assert not Path(arena).exists()


class AioFacade:
    """An AsyncClient's calls made blocking (its own event loop), so one
    test body covers the three client kinds."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self.loop.run_until_complete(
                asyncio.wait_for(method(*args, **kwargs), TIMEOUT + 5))
        return call

    def close(self) -> None:
        try:
            self.loop.run_until_complete(self.client.close())
        finally:
            self.loop.close()


def open_client(server: ServerProcess, kind: str, namespace: str,
                timeout: float = TIMEOUT) -> Any:
    dp = not kind.endswith("-grpc")
    if kind.startswith("sync"):
        return Client(server.tcp, namespace=namespace, data_plane=dp, timeout=timeout)
    if kind.startswith("shm"):
        return ShmClient(server.unix_target, namespace=namespace, data_plane=dp,
                         timeout=timeout)
    return AioFacade(AsyncClient(server.unix_target, namespace=namespace, data_plane=dp,
                                 timeout=timeout))


@pytest.fixture(params=KINDS)
def kv(request: pytest.FixtureRequest, server: ServerProcess) -> Iterator[Any]:
    c = open_client(server, request.param, f"misuse-{request.param}")
    try:
        yield c
    finally:
        c.close()
    assert server.alive()


def prompt(fn: Any, exc: type[BaseException], match: str) -> None:
    started = time.monotonic()
    with pytest.raises(exc, match=match):
        fn()
    assert time.monotonic() - started < PROMPT


# -- session ids and tool names that are not UTF-8 -----------------------------------

LONE_SURROGATE = "s\udc80"  # what bytes.decode(errors="surrogateescape") makes


def test_a_session_id_that_is_not_utf8_is_invalid_argument(kv: Any) -> None:
    # Before: UnicodeEncodeError from the encoders, and over gRPC a Put that
    # waited out its whole deadline (with none, for ever).
    prompt(lambda: kv.put({b"k": b"v"}, session_id=LONE_SURROGATE), InvalidArgument,
           "session_id")
    prompt(lambda: kv.get([b"k"], session_id=LONE_SURROGATE), InvalidArgument, "session_id")
    prompt(lambda: kv.lookup([b"k"], session_id=LONE_SURROGATE), InvalidArgument,
           "session_id")
    prompt(lambda: kv.turn_end(LONE_SURROGATE, "done"), InvalidArgument, "session_id")
    prompt(lambda: kv.turn_end("s", "tool_call", 5, LONE_SURROGATE), InvalidArgument,
           "tool_name")
    assert kv.get([b"k"]) == [None]  # nothing was stored


def test_a_put_stream_whose_messages_fail_ends_at_once(server: ServerProcess) -> None:
    # The gRPC Put of the sync client's loop and of AsyncClient: an iterator
    # that raised left the call waiting for more messages (no deadline here:
    # for ever) and the error in "Task exception was never retrieved".
    def messages() -> Iterator[bytes]:
        yield from conv.iter_put_messages("misuse-stream", conv.AckLevel.MEMORY,
                                          [(b"a", memoryview(b"x"))], "", 1 << 20)
        raise RuntimeError("the engine's buffer went away")

    async def main() -> None:
        client = AsyncClient(server.tcp, data_plane=False)
        try:
            rpc = client._rpc(conv.PUT)
            with pytest.raises(RuntimeError, match="went away"):
                await asyncio.wait_for(put_stream(rpc, messages(), None, None), PROMPT)
        finally:
            await client.close()

    asyncio.run(main())


class HalfCloseFails:
    """A grpc.aio stream call whose half-close fails as grpc's does when the
    channel closes under it (close() of a sync Client while its threads Put):
    the call is cancelled and ``done_writing`` raises grpc's internal error."""

    def __init__(self, call: Any) -> None:
        self.call = call

    def __getattr__(self, name: str) -> Any:
        return getattr(self.call, name)

    def __await__(self) -> Any:
        return self.call.__await__()

    async def done_writing(self) -> None:
        self.call.cancel()
        raise RuntimeError('Failed "execute_batch": (SendCloseFromClientOperation,)')


def test_a_put_stream_whose_half_close_fails_ends_with_its_status(server: ServerProcess) -> None:
    """Found in CI (two pytest workers): a sync Client closed while 16
    threads Put raised grpc's internal ExecuteBatchError out of a Put, where
    its caller expects a kvstore error: what a call's own writes raise is
    the call ending, and its status (CANCELLED here) says why."""
    messages = conv.iter_put_messages("misuse-stream", conv.AckLevel.MEMORY,
                                      [(b"a", memoryview(b"x"))], "", 1 << 20)

    async def main() -> None:
        client = AsyncClient(server.tcp, data_plane=False)
        try:
            real = client._rpc(conv.PUT)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await asyncio.wait_for(put_stream(lambda **kw: HalfCloseFails(real(**kw)),
                                                  messages, None, None), PROMPT)
            assert raised.value.code() == grpc.StatusCode.CANCELLED
        finally:
            await client.close()

    asyncio.run(main())


# -- numpy dtypes -------------------------------------------------------------------------


def test_bfloat16_arrays_put_and_get_into_as_their_bytes(kv: Any) -> None:
    # An LLM's KV cache dtype. Before: memoryview() refused it, and put and
    # get_into raised a bare ValueError ("cannot include dtype 'E' in a buffer").
    ml_dtypes = pytest.importorskip("ml_dtypes")
    k = np.arange(2 * 8 * 4, dtype=np.float32).reshape(2, 8, 4).astype(ml_dtypes.bfloat16)
    assert kv.put({b"bf16": k}).stored == 1
    assert kv.get([b"bf16"]) == [k.tobytes()]
    out = np.zeros_like(k)
    assert kv.get_into([b"bf16"], [out]) == [k.nbytes]
    assert out.tobytes() == k.tobytes()
    rows = np.zeros((2, k.nbytes // 2), ml_dtypes.bfloat16)  # two rows, one per key
    assert kv.get_into([b"bf16", b"missing"], list(rows)) == [k.nbytes, None]
    prompt(lambda: kv.put({b"bf": k[:, ::2]}), InvalidBuffer, "not C-contiguous")
    prompt(lambda: kv.get_into([b"bf16"], [np.zeros((8, 8), ml_dtypes.bfloat16)[:, :4]]),
           InvalidBuffer, "not C-contiguous")
    frozen = np.zeros_like(k)
    frozen.setflags(write=False)
    prompt(lambda: kv.get_into([b"bf16"], [frozen]), InvalidBuffer, "read-only")


def test_object_arrays_are_refused(kv: Any) -> None:
    # Before: put stored the objects' addresses, and get_into wrote a block
    # over the pointers (reading the array then crashed the process).
    objects = np.array(["a", None, 3], dtype=object)
    prompt(lambda: kv.put({b"obj": objects}), InvalidBuffer, "Python objects")
    prompt(lambda: kv.get_into([b"missing"], [objects]), InvalidBuffer, "Python objects")
    mixed = np.zeros(2, dtype=[("n", "<u2"), ("o", "O")])
    prompt(lambda: kv.put({b"obj": mixed}), InvalidBuffer, "Python objects")
    assert kv.get([b"obj"]) == [None]


def test_get_kv_into_refuses_a_page_named_twice(kv: Any) -> None:
    # Before: 2 blocks "restored", the second over the first one's page.
    rng = np.random.default_rng(1)
    k = [rng.standard_normal((4, 16, 2, 8)).astype(np.float16) for _ in range(2)]
    v = [rng.standard_normal((4, 16, 2, 8)).astype(np.float16) for _ in range(2)]
    assert kv.put_kv([b"p0", b"p1"], k, v, [[0], [1]]).stored == 2
    k2 = [np.zeros_like(a) for a in k]
    v2 = [np.zeros_like(a) for a in v]
    prompt(lambda: kv.get_kv_into([b"p0", b"p1"], k2, v2, [[2], [2]]), ValueError,
           r"page 2 is in page_lists\[0\] and page_lists\[1\]")
    prompt(lambda: kv.get_kv_into([b"p0"], k2, v2, [[3, 3]]), ValueError,
           r"page_lists\[0\] names page 3 twice")
    assert not any(a.any() for a in k2 + v2)  # nothing written
    assert kv.get_kv_into([b"p0", b"p1"], k2, v2, [[3], [2]]) == 2
    assert (k2[1][3] == k[1][0]).all() and (v2[0][2] == v[0][1]).all()


# -- get_into buffers that share memory -----------------------------------------------


def test_get_into_refuses_buffers_that_overlap(kv: Any) -> None:
    kv.put({b"a": b"A" * 10, b"b": b"B" * 5})
    buf = bytearray(b"." * 12)
    # Before: sizes [10, 5] and a buffer holding BBBBBAAAAA, "a" half overwritten.
    prompt(lambda: kv.get_into([b"a", b"b"], [buf, buf]), InvalidArgument,
           "buffers #0 and #1 overlap")
    view = memoryview(buf)
    prompt(lambda: kv.get_into([b"a", b"b"], [view[0:10], view[5:12]]), InvalidArgument,
           "overlap")
    arr = np.zeros(20, np.uint8)
    prompt(lambda: kv.get_into([b"a", b"b", b"a"], [arr[:10], arr[10:], arr[9:19]]),
           InvalidArgument, "buffers #0 and #2 overlap")
    assert bytes(buf) == b"." * 12  # nothing written
    # Slices of one staging buffer side by side are the usual case: fine.
    assert kv.get_into([b"a", b"b"], [view[0:10], arr[0:5]]) == [10, 5]
    assert bytes(buf[:10]) == b"A" * 10 and bytes(arr[:5]) == b"B" * 5
    assert kv.get_into([b"b", b"b"], [arr[0:5], arr[5:10]]) == [5, 5]
    rows = np.zeros((2, 10), np.uint8)  # a 2-D array: a sequence of rows
    assert kv.get_into([b"a", b"b"], rows) == [10, 5]


def test_get_into_refuses_one_buffer_for_the_list(kv: Any) -> None:
    prompt(lambda: kv.get_into([b"a", b"b"], bytearray(16)), InvalidArgument,
           "sequence of buffers")


def test_get_into_takes_any_iterable_of_buffers(kv: Any) -> None:
    # Before: with the data plane on, one key with a generator of buffers
    # raised a bare TypeError (len() of a generator); over gRPC it worked.
    kv.put({b"it": b"0123"})
    buf = bytearray(8)
    assert kv.get_into([b"it"], (b for b in [buf])) == [4]
    assert kv.get_into([b"it"], (buf,)) == [4]
    assert bytes(buf[:4]) == b"0123"


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize("make", [Client, ShmClient, AsyncClient])
def test_timeout_and_namespace_settings(server: ServerProcess, make: Any) -> None:
    target = server.unix_target
    bad: Any
    for bad in ("5", True, b"5", 0, -1, float("nan"), 1e12):
        with pytest.raises(InvalidArgument, match="timeout"):
            make(target, namespace="n", timeout=bad)
    for bad_ns in (5, b"n"):  # before: TypeError from the regular expression
        with pytest.raises(InvalidNamespace, match="must be a str"):
            make(target, namespace=bad_ns)


@pytest.mark.parametrize("timeout", [float("inf"), 1e9, np.float32(30), np.int64(30)])
def test_an_infinite_timeout_means_no_deadline(server: ServerProcess, timeout: float) -> None:
    # Before: inf (or any timeout past gRPC's range) failed every call at
    # once with DeadlineExceeded.
    for kind in KINDS:
        c = open_client(server, kind, "misuse-inf", timeout)
        try:
            # (numpy's scalars, from a config read into arrays: they worked
            # before timeouts were checked, and the check refused them)
            timeout_set = getattr(c, "client", c).timeout  # (an AioFacade's client's)
            assert timeout_set is None or type(timeout_set) is float
            assert c.put({b"t": b"v"}).stored == 1
            assert c.get([b"t"]) == [b"v"]
        finally:
            c.close()


# -- other arguments ---------------------------------------------------------------------


def test_list_blocks_prefix_and_limit_types(kv: Any) -> None:
    # Before: prefix=5 listed the keys starting with five zero bytes (none).
    prompt(lambda: kv.list_blocks(prefix=5), InvalidArgument, "prefix")
    prompt(lambda: kv.list_blocks(limit="5"), InvalidArgument, "limit")
    prompt(lambda: kv.list_blocks(limit=5.0), InvalidArgument, "limit")
    kv.list_blocks(limit=np.int64(5))  # (a numpy integer is an int: it worked before the check)


def test_block_format_unknown(kv: Any) -> None:
    prompt(lambda: kv.put({b"f": b"x"}, block_format=7), InvalidArgument, "block_format")


def test_keys_none_or_one_key(kv: Any) -> None:
    prompt(lambda: kv.get(None), InvalidArgument, "keys must be")
    # Before: the key's bytes became ints ("key #0 is an int").
    prompt(lambda: kv.prefetch("s", b"k"), InvalidArgument, "not a single key")
    prompt(lambda: kv.pin(b"k", 1000), InvalidArgument, "not a single key")
    prompt(lambda: kv.unpin(b"k"), InvalidArgument, "not a single key")


def test_keys_in_a_numpy_bytes_array_are_refused(kv: Any) -> None:
    # Before: b"ab\x00" came out of the array as b"ab", another key (a
    # 32-byte hash ends in a zero byte one time in 256).
    kv.put({b"ab\x00": b"1", b"cd": b"2"})
    keys = np.array([b"ab\x00", b"cd"])
    prompt(lambda: kv.get(keys), InvalidArgument, "trailing zero bytes")
    prompt(lambda: kv.delete(keys), InvalidArgument, "trailing zero bytes")
    prompt(lambda: kv.lookup(keys), InvalidArgument, "trailing zero bytes")
    assert kv.get([b"ab"]) == [None]


def test_duplicate_keys_in_one_put_the_last_wins(kv: Any) -> None:
    # Documented (README, "Keys and values"): the blocks are stored in
    # order, so the last one under a key is the one kept.
    kv.put([(b"dup", b"first-and-longer"), (b"dup", b"2nd")])
    assert kv.get([b"dup", b"dup"]) == [b"2nd", b"2nd"]


# -- ShmClient's own calls ---------------------------------------------------------------


@pytest.mark.parametrize("dp", [True, False])
def test_shm_reserve_acquire_commit_arguments(server: ServerProcess, dp: bool) -> None:
    with ShmClient(server.unix_target, namespace="misuse-shm", data_plane=dp,
                   timeout=TIMEOUT) as c:
        # Before: TypeError / ValueError from protobuf, struct.error from the
        # frames, and an empty key reserved an anonymous slot.
        prompt(lambda: c.reserve([("k", 10)]), InvalidKey,  # type: ignore[list-item]
               "key #0 is a str")
        prompt(lambda: c.reserve([(b"", 10)]), InvalidKey, "empty")
        prompt(lambda: c.reserve([(b"k", -1)]), InvalidArgument, "size")
        prompt(lambda: c.reserve([(b"k", 4.0)]), InvalidArgument, "size")  # type: ignore[list-item]
        prompt(lambda: c.acquire([b"k"], lease_ms=-5), InvalidArgument, "lease_ms")
        prompt(lambda: c.acquire([b"k"], lease_ms=5.0), InvalidArgument,  # type: ignore[arg-type]
               "lease_ms")
        # A numpy integer (a size from np.prod, say) worked before the checks:
        # it still does.
        c.commit(c.reserve([(b"n", np.int64(4))]))
        c.release(c.acquire([b"n"], lease_ms=np.int64(1000)))  # type: ignore[arg-type]
        k_pages = [np.zeros((4, 16, 2, 8), np.float16)]
        prompt(lambda: c.put_kv(["k1"], k_pages, None, [[0]]),  # type: ignore[list-item]
               InvalidKey, "str")
        prompt(lambda: c.put_kv([b""], k_pages, None, [[0]]), InvalidKey, "empty")
        slots = c.reserve([(b"k", 4)])
        slots[0].view[:] = b"abcd"
        prompt(lambda: c.commit(slots, [1, 2]), InvalidArgument, "1 slots but 2 crcs")
        assert c.commit(slots).stored == 1
        assert c.get([b"k"]) == [b"abcd"]
