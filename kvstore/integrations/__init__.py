"""Adapters that plug kvstore into inference engines through their own plugin slots.

- :mod:`kvstore.integrations.lmcache`: an LMCache ``RemoteConnector`` (``remote_storage_plugins``);
  vLLM reaches it too, through vLLM's ``LMCacheConnectorV1``.
- :mod:`kvstore.integrations.sglang`: an SGLang HiCache storage backend
  (``--hicache-storage-backend dynamic``).
- :mod:`kvstore.integrations.vllm`: a secondary tier under vLLM's ``TieringOffloadingSpec``.

Each module imports its engine, so each is importable only where that engine is
installed (kvstore's ``lmcache``, ``sglang`` or ``vllm`` extra: ``pip install '.[vllm]'``
from a kvstore checkout, or the engine's pinned release, e.g. ``pip install
'vllm==0.33.0'``; not ``kvstore[...]`` from PyPI, where ``kvstore`` is another
project). The shared part, :mod:`kvstore.integrations.link`, uses the public SDK
only: the same-host shared-memory client when the server is on this host, gRPC
otherwise. See docs/engines.md.
"""


def engine_missing(module: str, needs: str, install: str) -> ModuleNotFoundError:
    """The error an adapter raises when its engine is not installed: which adapter,
    what it needs and the command that installs it (the bare ``No module named ...``
    names neither the adapter nor the extra)."""
    return ModuleNotFoundError(f"kvstore.integrations.{module} needs {needs}: "
                               f"pip install {install}", name=f"kvstore.integrations.{module}")
