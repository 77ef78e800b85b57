"""The engine adapters name what to install when their engine is missing: the
engine at the pin of kvstore's extra for it (pyproject.toml), never
``kvstore[...]`` from PyPI, where ``kvstore`` is another project."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

EXTRAS = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
                       )["project"]["optional-dependencies"]

ADAPTERS = [  # (adapter, the engine module it imports, what the message must name)
    ("vllm", "vllm", f"pip install '{EXTRAS['vllm'][0]}' (kvstore's vllm extra)"),
    ("lmcache", "lmcache", f"pip install '{EXTRAS['lmcache'][0]}' (kvstore's lmcache extra)"),
    ("sglang", "sglang", f"pip install '{EXTRAS['sglang'][0]}' (kvstore's sglang extra)"),
    ("gpu", "torch", "pip install torch"),
]


@pytest.mark.parametrize(("adapter", "engine", "hint"), ADAPTERS)
def test_an_adapter_without_its_engine_names_the_extra(adapter: str, engine: str,
                                                        hint: str) -> None:
    if importlib.util.find_spec(engine) is not None:
        pytest.skip(f"{engine} is installed here (the engine lane imports the adapter)")
    name = f"kvstore.integrations.{adapter}"
    sys.modules.pop(name, None)
    with pytest.raises(ModuleNotFoundError) as info:
        importlib.import_module(name)
    assert str(info.value).startswith(f"{name} needs ")
    assert hint in str(info.value)
    assert "kvstore[" not in str(info.value)
    assert info.value.name == name


def test_the_shared_link_imports_without_any_engine() -> None:
    importlib.import_module("kvstore.integrations.link")
