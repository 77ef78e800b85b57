from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the tests that only need a working one (fast)."""
    server = ServerProcess(tmp_path_factory.mktemp("shared-server"), l1_capacity="256MiB")
    with server:
        yield server
    assert server.proc is not None


@pytest.fixture(params=["tcp", "unix"])
def target(request: pytest.FixtureRequest, shared_server: ServerProcess) -> str:
    return shared_server.tcp if request.param == "tcp" else shared_server.unix_target


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[ServerProcess]]:
    started: list[ServerProcess] = []

    class Factory(ServerProcess):
        def __init__(self, *flags: str, data_dir: Path | None = None, **kw: object) -> None:
            super().__init__(data_dir or tmp_path / f"server{len(started)}", *flags, **kw)  # type: ignore[arg-type]
            started.append(self)

    yield Factory
    for s in started:
        s.kill()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``perf`` tests (timed soaks behind documented figures) run only when
    ``-m`` names them: not in the default run, not in the fast lane
    (``-m "not slow"``, which would otherwise let them in)."""
    if "perf" in (config.option.markexpr or ""):
        return
    perf = [item for item in items if item.get_closest_marker("perf") is not None]
    if perf:
        config.hook.pytest_deselected(items=perf)
        items[:] = [item for item in items if item.get_closest_marker("perf") is None]
