"""Per-namespace L2 quotas (quota.l2): when L2 needs room, the blocks of
namespaces at or over their quota go first, so a tenant that floods L2 evicts
its own blocks and a quiet tenant's L2-resident working set survives."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import tenants

from kvstore import Client
from kvstore.config import load
from kvstore.store import TieredStore
from kvstore.types import AckLevel, TierName

BLOCK = 32 * 1024          # the 6 MiB L2 holds 192 blocks, the 2 MiB L1 64
QUIET_BLOCKS = 96          # the quiet tenant's working set: 3 MiB, more than L1 holds
NOISY_PER_ROUND = 192      # the flood per round: all of L2, never read again
ROUNDS = 8


def quiet_hit_rate(target: str, noisy: bool) -> float:
    return tenants.quiet_hit_rate(target, noisy, block=BLOCK, quiet_blocks=QUIET_BLOCKS,
                                  noisy_per_round=NOISY_PER_ROUND, rounds=ROUNDS, ack="local")


def serve(server_factory, compact: str, *flags: str):  # type: ignore[no-untyped-def]
    # No L3: a block evicted from L2 (and out of L1) is gone.
    return server_factory("--l2-capacity", "6MiB", "--l2-compact-index", compact,
                          "--policy-name", "lru", *flags, l1_capacity="2MiB")


@pytest.mark.parametrize("compact", ["true", "false"])
def test_quiet_tenant_keeps_its_l2_working_set_under_a_flood(server_factory,  # type: ignore[no-untyped-def]
                                                             compact: str) -> None:
    quota = ("--quota-l2", "noisy=2MiB")
    with serve(server_factory, compact, *quota) as server:
        alone = quiet_hit_rate(server.tcp, noisy=False)
    with serve(server_factory, compact, *quota) as server:
        flooded = quiet_hit_rate(server.tcp, noisy=True)
        with Client(server.tcp) as c:
            l2 = next(t for t in c.stats().tiers if t.tier.name == "L2")
            assert l2.evictions > 0 and l2.bytes <= 6 * 1024**2  # the flood was trimmed
            quiet_l2 = next(t for t in c.stats("quiet").tiers if t.tier.name == "L2")
            assert quiet_l2.blocks == QUIET_BLOCKS  # all of the quiet set is still in L2
    assert alone == 100.0
    assert abs(alone - flooded) <= 1.0, (alone, flooded)


def test_without_an_l2_quota_the_flood_evicts_the_quiet_tenant(server_factory) -> None:  # type: ignore[no-untyped-def]
    # The control: the same traffic without quotas costs the quiet tenant
    # its L2 working set (so the test above measures the quota, not the setup).
    with serve(server_factory, "true") as server:
        assert quiet_hit_rate(server.tcp, noisy=True) < 50.0


@pytest.mark.parametrize("compact", ["true", "false"])
def test_per_namespace_l2_bytes_match_a_recount(tmp_path: Path, compact: str) -> None:
    # The per-namespace L2 bytes the quota reads are kept as copies come and
    # go (writes, trims, overwrites, deletes, the rebuild at a restart): they
    # must always equal a scan of the index.
    env = {"KVSTORE_DATA_DIR": str(tmp_path / "data"), "KVSTORE_L1_CAPACITY": "1MiB",
           "KVSTORE_L1_PREFAULT": "false", "KVSTORE_L2_CAPACITY": "2MiB",
           "KVSTORE_L2_COMPACT_INDEX": compact, "KVSTORE_QUOTA_L2": "a=512KiB",
           "KVSTORE_SERVER_LISTEN": "127.0.0.1:0"}
    namespaces = ("a", "b", "c")

    async def check(store: TieredStore) -> None:
        recount = {ns: (await store.index.namespace_held(ns))[TierName.L2][1]
                   for ns in namespaces}
        kept = {ns: store.index.l2_namespace_bytes.get(ns, 0) for ns in namespaces}
        assert kept == recount
        assert sum(kept.values()) == store.index.l2_bytes

    async def go() -> None:
        rng = random.Random(5)
        store = TieredStore(load(env=env))
        await store.start()
        keys = [f"k{i:03}".encode() for i in range(60)]
        for step in range(400):
            ns, key = rng.choice(namespaces), rng.choice(keys)
            if rng.random() < 0.8:
                data = rng.randbytes(rng.choice([3000, 40_000]))
                await store.put_bytes(ns, key, data, ack=AckLevel.LOCAL)
            else:
                await store.delete(ns, [key])
            if step % 50 == 49:
                await check(store)
        assert store.l2 is not None
        await asyncio.get_running_loop().run_in_executor(None, store.l2.flush_sync)
        await check(store)
        # The flood's namespace "a" gave up its own blocks first.
        assert store.index.l2_namespace_bytes.get("a", 0) <= 512 * 1024 + 40_000
        await store.close()
        again = TieredStore(load(env=env))
        await again.start()
        await check(again)
        await again.close()

    asyncio.run(go())


def test_l2_quota_tables_in_toml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_text('[quota]\nl2_per_namespace = "1GiB"\n[quota.l2]\nchat = "20GiB"\n')
    cfg = load(file=path, env={})
    assert cfg.quota.l2_limit("chat") == 20 * 1024**3
    assert cfg.quota.l2_limit("other") == 1024**3
    assert cfg.quota.l2_enabled and not cfg.quota.enabled  # L1 quotas stay off
    cfg = load(env={"KVSTORE_QUOTA_L2": "a=1MiB"})
    assert (cfg.quota.l2_limit("a"), cfg.quota.l2_limit("b")) == (1024**2, 0)
    assert not load(env={}).quota.l2_enabled
