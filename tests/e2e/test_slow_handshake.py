"""A server whose HTTP/2 handshake answers late (a loaded host, a long link)
is still reached by the SDK.

gRPC core gives each connection attempt ``grpc.min_reconnect_backoff_ms`` to
finish its handshake (its "minimum connect timeout", 20 s by default). The SDK
had set it to 100 ms together with its short reconnect backoff, so an attempt
whose SETTINGS frame came later than the backoff (at most 1 s) was abandoned
and retried for ever: every call failed "connection attempt timed out before
receiving SETTINGS frame" while the server was up and serving."""

from __future__ import annotations

import threading
import time

from delayproxy import DelayProxy

from kvstore import Client

#: What the server's answers are held back by, each chunk: longer than the
#: SDK's largest reconnect backoff (1 s), so no attempt could finish before.
ANSWER_DELAY_S = 1.3


def test_a_server_answering_its_handshake_late_is_reached(server_factory) -> None:  # type: ignore[no-untyped-def]
    with server_factory() as server:
        port = int(server.tcp.rsplit(":", 1)[1])
        proxy = DelayProxy(port, down_delay_s=ANSWER_DELAY_S)
        stop = threading.Event()

        def quicken_after_the_handshake() -> None:
            # Only the handshake is late: once the server's first bytes (its
            # SETTINGS) are through, its answers go at once (a short test).
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                if proxy.down_bytes:
                    proxy.down_delay_s = 0.0
                    return
                stop.wait(0.01)

        watcher = threading.Thread(target=quicken_after_the_handshake, daemon=True)
        watcher.start()
        try:
            with Client(f"127.0.0.1:{proxy.port}", namespace="slow", data_plane=False,
                        timeout=30) as client:
                client.put([(b"k", b"x" * 1000)])
                assert client.get([b"k"]) == [b"x" * 1000]
        finally:
            stop.set()
            watcher.join(5)
            proxy.close()
