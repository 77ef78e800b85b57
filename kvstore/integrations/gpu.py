"""GPU-adjacent copies: GPU KV pages <-> kvstore's shared-memory arena, no bounce buffer.

When ``torch.cuda`` is available, :class:`GpuArena` registers the ShmClient's
mapping of the arena as pinned (page-locked) host memory
(``cudaHostRegister``), so ``copy_(non_blocking=True)`` between a GPU tensor
and a slot or lease of the arena is a DMA on a CUDA stream: Put reserves slots,
copies each GPU block into its slot, waits for the stream, checksums and
commits; Get leases the blocks, copies them to the GPU tensors, waits, releases.

All three engines hand their storage backends host memory (LMCache's local CPU
buffer, SGLang's host pool, vLLM's primary CPU tier), so the adapters move
bytes host-to-arena; this path is for a connector whose objects are on the GPU
and is what ``bench/_engines/gpu_check.py`` measures on a GPU machine.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from kvstore.block import checksum
from kvstore.client.shm import ShmClient
from kvstore.integrations import engine_missing

try:
    import torch  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:
    raise engine_missing("gpu", "PyTorch", "torch (or an engine that brings it: kvstore's "
                         "vllm, sglang or lmcache extra)") from exc

_CUDA_HOST_REGISTER_PORTABLE = 1


def available() -> bool:
    return torch.cuda.is_available()


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class GpuArena:
    """A ShmClient whose arena is pinned for CUDA copies (one per client)."""

    def __init__(self, client: ShmClient, device: Any = None) -> None:
        if not available():
            raise RuntimeError("GpuArena needs torch.cuda")
        self.client = client
        self.device = torch.device(device or "cuda")
        self.stream = torch.cuda.Stream(self.device)
        self._base = 0
        self.size = len(client._arena)  # the mapping (the file has a marker page past it)
        # The whole arena, once, now: a get before any put copied from
        # pageable memory (the pin used to come with the first put's slot).
        self._pin(client._arena, 0)

    def _pin(self, view: memoryview, offset: int) -> None:
        if self._base:
            return
        self._base = _address(view) - offset
        err = torch.cuda.cudart().cudaHostRegister(self._base, self.size,
                                                   _CUDA_HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of the arena failed ({err})")

    def close(self) -> None:
        if self._base:
            torch.cuda.cudart().cudaHostUnregister(self._base)
            self._base = 0

    def put(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], *,
            session_id: str | None = None, ack: str = "memory") -> int:
        """Store each GPU tensor's bytes under its key; returns blocks stored."""
        flats = [t.contiguous().view(torch.uint8).reshape(-1) for t in tensors]
        slots = self.client.reserve([(k, f.numel()) for k, f in zip(keys, flats, strict=True)],
                                    session_id=session_id)
        try:
            if slots:
                self._pin(slots[0].view, slots[0].offset)
            with torch.cuda.stream(self.stream):
                for slot, flat in zip(slots, flats, strict=True):
                    host = torch.frombuffer(slot.view, dtype=torch.uint8)
                    host.copy_(flat, non_blocking=True)
            self.stream.synchronize()
            crcs = [checksum(s.view) for s in slots]
        except BaseException:
            self.client.commit([], [], abandon=slots)
            raise
        return self.client.commit(slots, crcs, ack=ack).stored

    def get(self, keys: Sequence[bytes], tensors: Sequence[torch.Tensor], *,
            session_id: str | None = None) -> list[bool]:
        """Fill each GPU tensor with its block; False for a miss or a size mismatch."""
        out: list[bool] = []
        with self.client.leased(list(keys), session_id=session_id) as leases:
            with torch.cuda.stream(self.stream):
                for lease, t in zip(leases, tensors, strict=True):
                    flat = t.view(torch.uint8).reshape(-1)
                    if lease is None or lease.size != flat.numel():
                        out.append(False)
                        continue
                    if checksum(lease.view) != lease.crc32c:
                        out.append(False)
                        continue
                    flat.copy_(torch.frombuffer(lease.view, dtype=torch.uint8),
                               non_blocking=True)
                    out.append(True)
            self.stream.synchronize()
        return out
