"""kvstore Python SDK: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

>>> from kvstore import Client
>>> with Client("127.0.0.1:50051", namespace="llama-70b:tp0") as kv:
...     kv.put({key: block})
...     [data] = kv.get([key])
"""

from kvstore.client._base import TLS
from kvstore.client._common import DEFAULT_CHUNK_BYTES, DEFAULT_TARGET, PutResult, parse_target
from kvstore.client._errors import InvalidBuffer, ProtocolError
from kvstore.client.aio import AsyncClient
from kvstore.client.sync import Client

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_TARGET",
    "TLS",
    "AsyncClient",
    "Client",
    "InvalidBuffer",
    "ProtocolError",
    "PutResult",
    "parse_target",
]
