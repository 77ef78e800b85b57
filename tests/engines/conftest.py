"""Engine integration tests: the engines' own loaders and objects against a live kvstore.

They need the combined engines venv (vLLM, LMCache, SGLang), which ``./dev.sh
test-engines`` builds and runs them in. Anywhere else (the default ``./dev.sh
test``) the whole directory is skipped with one line saying so.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess

ENGINES = ("vllm", "lmcache", "sglang")
_MISSING = [name for name in ENGINES if importlib.util.find_spec(name) is None]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if _MISSING and collection_path.name.startswith("test_"):
        return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    if _MISSING:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"tests/engines skipped: the engines venv is absent (no "
                                f"{', '.join(_MISSING)}); run ./dev.sh test-engines")


# The engines warn at import and at run time about things that are theirs (no
# CUDA build here, deprecated torch calls): not kvstore's failures.
ENGINE_WARNINGS = ("ignore::UserWarning", "ignore::DeprecationWarning",
                   "ignore::FutureWarning", "ignore::RuntimeWarning", "ignore::ResourceWarning",
                   "ignore::pytest.PytestUnraisableExceptionWarning")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "engines" in item.path.parts:
            for spec in ENGINE_WARNINGS:
                item.add_marker(pytest.mark.filterwarnings(spec))


def quiet_import(name: str) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module(name)


@pytest.fixture
def shm_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a shared-memory arena and a unix socket (the same-host path)."""
    arena = f"/dev/shm/kvstore-engines-{tmp_path.name}"
    server = ServerProcess(tmp_path / "kv", "--l1-shm-path", arena, l1_capacity="256MiB")
    with server:
        yield server
