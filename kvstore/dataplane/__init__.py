"""The data plane beside gRPC (issue 14; spec: docs/dataplane.md).

A small framed binary protocol over a unix socket or TCP for the SDK's hot
operations (Lookup, Get, Put, the shared-memory reserve/commit/acquire/
release). gRPC stays the contract: a session is opened by the
``OpenDataPlane`` RPC, which authenticates the caller and hands out a
single-use ticket; the client presents it in its first frame (HELLO).

Modules: ``frames`` (encode/decode, no I/O; shared with the SDK),
``tickets`` (the tickets OpenDataPlane issues), ``conn`` (a connection's
byte I/O: plain sockets or TLS), ``ops`` (one request → store calls → one
response), ``server`` (listeners, one task per connection).

The data plane sits at the edge like ``kvstore.server``: it calls the store
and the shared-memory broker with domain values and never imports the
generated protobuf code (the servicer converts OpenDataPlane's messages).
"""
