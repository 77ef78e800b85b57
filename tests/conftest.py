from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT.parent / "shared" / "traces"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serverproc import ServerProcess  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """``KVSTORE_TEST_LOOP=uvloop``: every event loop the tests start
    (``asyncio.run``, the sync Client's Put loop, in-process servers without
    busy poll) is a uvloop loop, as in vLLM and SGLang; needs uvloop."""
    loop = os.environ.get("KVSTORE_TEST_LOOP", "asyncio")
    if loop == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    elif loop != "asyncio":
        raise pytest.UsageError(f"KVSTORE_TEST_LOOP={loop!r}: asyncio or uvloop")


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


#: The slow tests (seconds each: benchmark and replay smoke runs, servers
#: killed or restarted, fault injection, expiring leases), marked ``slow`` here
#: in one list rather than file by file: ``./dev.sh test -m "not slow"`` (the
#: fast lane) leaves them out, the default run keeps them. A file, or a test in
#: it (every parametrisation). Found with ``pytest --durations=40``; an entry
#: that no longer names a test fails the collection.
SLOW = (
    "tests/bench/test_bench_smoke.py",
    "tests/e2e/test_stalled_get.py",
    "tests/bench/test_bench_peers_dataplane.py",
    "tests/e2e/test_dataplane_sdk.py::test_a_call_in_flight_when_the_server_dies_gets_a_clear_error",
    "tests/client/test_aio_dataplane.py::test_a_call_in_flight_when_the_server_dies",
    "tests/client/test_aio_uvloop.py::test_a_call_in_flight_when_the_server_dies",
    "tests/policy/test_live.py",
    "tests/policy/test_replay.py",
    "tests/policy/test_tiered.py",
    "tests/policy/test_session.py::test_fill_fast_path_makes_the_same_decisions",
    "tests/block/test_block_pack.py::test_ml_dtypes_bfloat16_is_recognised",
    "tests/deploy/test_deploy.py",
    "tests/e2e/test_tls_renewal.py",
    "tests/e2e/test_l2_disk_full.py",
    "tests/e2e/test_power_loss.py",
    "tests/e2e/test_client_settings.py::test_keepalive_pings_every_second_keep_streams_and_channels",
    "tests/e2e/test_slow_handshake.py",
    "tests/deploy/test_health_cli.py::test_a_running_kvstore_server_is_serving",
    "tests/deploy/test_health_cli.py::test_not_serving_exits_1",
    "tests/e2e/test_compact_index.py",
    "tests/e2e/test_cross_host.py",
    "tests/e2e/test_dataplane_reach.py::test_a_data_plane_out_of_reach_costs_one_bounded_try",
    "tests/e2e/test_edge_startup.py",
    "tests/e2e/test_l3.py",
    "tests/e2e/test_memory.py",
    "tests/e2e/test_metrics_bench.py",
    "tests/e2e/test_restart.py",
    "tests/e2e/test_bad_input.py::test_lmdb_map_full_grows_silently",
    "tests/shm/test_shm.py::test_killed_client_leases_expire_and_server_keeps_serving",
    "tests/shm/test_shm.py::test_slow_copy_is_released_at_once_and_checked",
    "tests/shm/test_shm.py::test_expired_lease_is_reported_stale",
    "tests/shm/test_shm.py::test_concurrent_writers_and_readers_see_nothing_torn_or_stale",
    # Servers restarted, outages, floods, fuzzing, another language's toolchain:
    "tests/e2e/test_l1_verify.py",
    "tests/e2e/test_l2_damage.py",
    "tests/e2e/test_l3_drain.py",
    "tests/e2e/test_l3_nodes.py",
    "tests/e2e/test_l3_session_end.py",
    "tests/e2e/test_l3_races.py",
    "tests/e2e/test_metrics_prometheus.py",
    "tests/e2e/test_quota.py",
    "tests/e2e/test_quota_l2.py",
    "tests/fuzz/test_fuzz_requests.py",
    # issue 14 data plane: a slow reader, ticket expiry, a live fuzz, TLS keys
    "tests/dataplane/test_faults.py::test_a_reader_that_stops_reading_stalls_only_itself_and_is_dropped",
    "tests/dataplane/test_conformance.py::test_an_expired_ticket_is_refused",
    "tests/dataplane/test_fuzz.py::test_a_live_server_survives_mutated_frames",
    "tests/dataplane/test_tls.py",
    "tests/packaging/test_optional_l3.py",
    "tests/xlang/test_node_client.py",
    "tests/e2e/test_auth.py::test_a_client_certificate_maps_to_an_identity",
    "tests/e2e/test_ops.py::test_cli_ls_stats_and_flush",
    "tests/e2e/test_ops.py::test_flush_removes_the_namespaces_l3_objects_put_by_another_node",
    "tests/e2e/test_ops.py::test_l2_only_blocks_after_restart_are_listed_and_flushed",
    "tests/shm/test_shm_hardening.py::test_slots_of_one_reserve_never_overlap_while_it_waits_for_room",
    "tests/shm/test_shm_hardening.py::test_late_writer_never_corrupts_what_get_serves",
)


def _mark_slow(items: list[pytest.Item]) -> None:
    modules: dict[str, object] = {}
    for item in items:
        path, _, rest = item.nodeid.partition("::")
        test = f"{path}::{rest.split('[')[0]}"
        if path not in modules and (module := item.getparent(pytest.Module)) is not None:
            modules[path] = module.obj
        if path in SLOW or test in SLOW:
            item.add_marker(pytest.mark.slow)
    stale = [e for e in SLOW if "::" in e and (path := e.split("::")[0]) in modules
             and not hasattr(modules[path], e.split("::")[1])]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names no test: {stale}")


@pytest.hookimpl(tryfirst=True)  # before -m reads the marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Marks the ``SLOW`` tests; deselects ``perf`` tests (timed soaks behind
    documented figures) unless ``-m`` names them: they stay out of the default
    run and of the fast lane (``-m "not slow"``, which alone would let them in)."""
    _mark_slow(items)
    if "perf" in (config.option.markexpr or ""):
        return
    perf = [item for item in items if item.get_closest_marker("perf") is not None]
    if perf:
        config.hook.pytest_deselected(items=perf)
        items[:] = [item for item in items if item.get_closest_marker("perf") is None]
