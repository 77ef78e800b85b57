"""The engine adapters name the extra to install when their engine is missing."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import pytest

ADAPTERS = [  # (adapter, the engine module it imports, what the message must name)
    ("vllm", "vllm", "pip install 'kvstore[vllm]'"),
    ("lmcache", "lmcache", "pip install 'kvstore[lmcache]'"),
    ("sglang", "sglang", "pip install 'kvstore[sglang]'"),
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
    assert info.value.name == name


def test_the_shared_link_imports_without_any_engine() -> None:
    importlib.import_module("kvstore.integrations.link")
