"""The GPU-adjacent path: GPU tensors <-> the pinned arena (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import quiet_import
from serverproc import ServerProcess

torch: Any = quiet_import("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def test_gpu_tensors_round_trip_through_the_pinned_arena(shm_server: ServerProcess) -> None:
    from kvstore.client.shm import ShmClient
    from kvstore.integrations.gpu import GpuArena

    with ShmClient(shm_server.unix_target, namespace="gpu") as client:
        arena = GpuArena(client)
        src = [torch.randint(0, 255, (1 << 20,), dtype=torch.uint8, device="cuda")
               for _ in range(4)]
        dst = [torch.empty_like(t) for t in src]
        keys = [f"g{i}".encode() for i in range(4)]
        assert arena.put(keys, src) == 4
        assert arena.get([*keys, b"absent"], [*dst, torch.empty_like(src[0])]) == \
            [True] * 4 + [False]
        assert all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
        arena.close()
