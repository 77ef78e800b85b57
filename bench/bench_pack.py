"""Block pack / unpack / verify / key hashing throughput.

    .venv/bin/python -m bench.bench_pack [--reps N] [--pure-reps N] [--out FILE]

For each block shape it times, interleaved round by round (medians reported):

* ``copy``: ``np.copyto`` of the block's payload bytes (one contiguous source)
  into a preallocated, pre-faulted buffer: the memory-bandwidth yardstick;
* ``native`` (kvstore._native, from kvstore._impl) and ``pure`` (kvstore.block.reference):
  ``pack`` into a pre-faulted ``out`` buffer (gather + CRC-32C), ``unpack_into``
  pre-faulted pages (scatter + CRC-32C check), ``verify`` (CRC-32C over the block);
* ``block_keys`` over a long prompt, native and pure.

GB/s are payload bytes (1 GB = 1e9 B) per second. JSON goes to stdout (and to
``--out`` when given). Targets (issue 3): native pack and unpack each at least
60% of the copy's bandwidth and 3x the reference. With ``KVSTORE_PURE=1`` the
native build is not used: only the copy and the reference are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from kvstore import _impl
from kvstore.block import reference as pure

#: The extension, through the one door that chooses it (None with KVSTORE_PURE=1).
native = _impl.native

SHAPES: dict[str, dict[str, int]] = {
    # Llama-3-8B: 32 layers, 8 KV heads, head dim 128; 256 tokens in fp16 = 32 MiB
    "llama3-8b_256tok_32MiB": dict(layers=32, kv_heads=8, head_dim=128, tokens=256,
                                   page_tokens=16, num_pages=64),
    # Llama-3.2-1B: 16 layers, 8 KV heads, head dim 64; 32 tokens in fp16 = 1 MiB
    "llama3.2-1b_32tok_1MiB": dict(layers=16, kv_heads=8, head_dim=64, tokens=32,
                                   page_tokens=16, num_pages=64),
}


def _median_s(samples: list[int]) -> float:
    return statistics.median(samples) / 1e9


def _time_ns(fn: Callable[[], Any]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def bench_shape(name: str, shape: dict[str, int], reps: int, pure_reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    layers, pt = shape["layers"], shape["page_tokens"]
    heads, dim = shape["kv_heads"], shape["head_dim"]
    tokens, num_pages = shape["tokens"], shape["num_pages"]
    pool = (num_pages, pt, heads, dim)

    def pages() -> list[np.ndarray]:
        return [rng.integers(0, 1 << 16, size=pool, dtype=np.uint16).view(np.float16)
                for _ in range(layers)]

    k, v = pages(), pages()
    n_ids = -(-tokens // pt)
    ids = [int(x) for x in rng.permutation(num_pages)[:n_ids]]  # scattered pages
    block = bytes((native or pure).pack(k, v, ids, tokens=tokens))
    payload = len(block) - 64
    out = np.ones(len(block), dtype=np.uint8)  # pre-faulted
    k2, v2 = pages(), pages()  # pre-faulted destinations
    src = np.frombuffer(block, dtype=np.uint8)[64:].copy()
    dst = np.ones(payload, dtype=np.uint8)

    ops: dict[str, Callable[[], Any]] = {"copy": lambda: np.copyto(dst, src)}
    if native is not None:
        ops |= {
            "native_pack": lambda: native.pack(k, v, ids, tokens=tokens, out=out),
            "native_unpack": lambda: native.unpack_into(block, k2, v2, ids),
            "native_verify": lambda: native.verify(block),
        }
        assert bytes(native.pack(k, v, ids, tokens=tokens, out=out)) == block
    samples: dict[str, list[int]] = {op: [] for op in ops}
    for fn in ops.values():  # warm up
        fn()
    for _ in range(reps):
        for op, fn in ops.items():
            samples[op].append(_time_ns(fn))
    pure_ops: dict[str, Callable[[], Any]] = {
        "pure_pack": lambda: pure.pack(k, v, ids, tokens=tokens, out=out),
        "pure_unpack": lambda: pure.unpack_into(block, k2, v2, ids),
        "pure_verify": lambda: pure.verify(block),
    }
    assert bytes(pure.pack(k, v, ids, tokens=tokens, out=out)) == block
    for op in pure_ops:
        samples[op] = []
    for _ in range(pure_reps):
        for op, fn in pure_ops.items():
            samples[op].append(_time_ns(fn))

    gbps = {op: payload / _median_s(s) / 1e9 for op, s in samples.items()}
    copy = gbps["copy"]
    result: dict[str, Any] = {
        "shape": shape | {"dtype": "f16", "kv_count": 2},
        "payload_bytes": payload,
        "pieces": layers * 2 * n_ids,
        "gbps": {op: round(x, 3) for op, x in gbps.items()},
        "median_us": {op: round(_median_s(s) * 1e6, 1) for op, s in samples.items()},
        "ratios": {},
    }
    if native is None:
        return result
    for op in ("pack", "unpack", "verify"):
        nat = gbps[f"native_{op}"]
        result["ratios"][op] = {
            "native_vs_copy": round(nat / copy, 3),
            "native_vs_pure": round(nat / gbps[f"pure_{op}"], 1),
        }
    result["targets_met"] = all(
        result["ratios"][op]["native_vs_copy"] >= 0.6
        and result["ratios"][op]["native_vs_pure"] >= 3
        for op in ("pack", "unpack")
    )
    return result


def bench_checksum(reps: int) -> dict[str, Any]:
    """CRC-32C speed of each implementation the CPU has, in cache and from memory."""
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, size=64 << 20, dtype=np.uint8)
    small = big[: 256 << 10]
    out: dict[str, Any] = {}
    if native is None:
        return out
    try:
        for impl in native.crc32c_implementations():
            native._use_crc32c(impl)
            row = {}
            for label, buf in (("256KiB_in_cache", small), ("64MiB_from_memory", big)):
                native.checksum(buf)
                n = max(3, reps if impl != "table" else 3)
                inner = max(1, (8 << 20) // buf.nbytes)
                s = [_time_ns(lambda b=buf, i=inner: [native.checksum(b) for _ in range(i)])
                     for _ in range(n)]
                row[label] = round(buf.nbytes * inner / _median_s(s) / 1e9, 2)
            out[impl] = row
    finally:
        native._use_crc32c(None)
    return out


def bench_keys(reps: int, pure_reps: int) -> dict[str, Any]:
    rng = np.random.default_rng(5)
    n_tokens, block_tokens = 32768, 16
    tokens = [int(t) for t in rng.integers(0, 128256, size=n_tokens)]
    salt = b"tenant-a/llama3-8b/tp0/f16"
    res: dict[str, Any] = {"tokens": n_tokens, "block_tokens": block_tokens}
    arr = np.array(tokens, dtype=np.int64)
    runs: list[tuple[str, Callable[[], Any], int]] = [
        ("pure_list", lambda: pure.block_keys(tokens, block_tokens, salt), pure_reps)]
    if native is not None:
        assert native.block_keys(tokens, block_tokens, salt) == \
            pure.block_keys(tokens, block_tokens, salt)
        runs += [
            ("native_list", lambda: native.block_keys(tokens, block_tokens, salt), reps),
            ("native_ndarray", lambda: native.block_keys(arr, block_tokens, salt), reps),
        ]
    for label, fn, n in runs:
        fn()
        t = _median_s([_time_ns(fn) for _ in range(n)])
        res[label] = {"ms": round(t * 1e3, 3), "mtokens_per_s": round(n_tokens / t / 1e6, 2),
                      "token_mb_per_s": round(4 * n_tokens / t / 1e6, 1)}
    if native is not None:
        res["native_vs_pure"] = round(res["pure_list"]["ms"] / res["native_list"]["ms"], 2)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=21, help="native/copy repetitions (median)")
    ap.add_argument("--pure-reps", type=int, default=3, help="reference repetitions (median)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--skip-checksum", action="store_true")
    args = ap.parse_args(argv)
    report: dict[str, Any] = {
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "implementation": _impl.IMPLEMENTATION,
        "crc32c_implementation": native.crc32c_implementation() if native else "pure",
        "reps": args.reps,
        "pure_reps": args.pure_reps,
        "blocks": {name: bench_shape(name, shape, args.reps, args.pure_reps)
                   for name, shape in SHAPES.items()},
        "block_keys": bench_keys(args.reps, args.pure_reps),
    }
    if not args.skip_checksum:
        report["checksum_gbps"] = bench_checksum(args.reps)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
