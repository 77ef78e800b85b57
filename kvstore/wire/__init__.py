"""Everything about kvstore.v1 on the wire, in one package.

* :mod:`kvstore.wire.codec`: the hand-written codec of the bulk messages
  (``PutChunk``, ``GetChunk``) and the field walker the other codecs use;
* :mod:`kvstore.wire.lookup`: the hand-written ``Lookup`` codec (tier codes);
* :mod:`kvstore.wire.pb`: the generated protobuf / gRPC modules (built by
  setup.py into ``kvstore/v1/``, the proto's package path).

The server and the SDK import generated code only through
:mod:`kvstore.wire.pb`; domain code (the store, the tiers, the policies) never
imports this package. Importing it imports nothing: each module loads on use.
"""
