"""L3 throughput: ObjectTier (obstore) with 1, 8 and 32 requests in flight,
next to a single-threaded boto3 loop that moves the same objects, in the same
run, against the same local S3 server (``rclone serve s3`` on 127.0.0.1).

    python -m bench.bench_l3 [--size 2MiB] [--objects 64] [--repeats 5]
                             [--in-flight 1,8,32] [--out results.json]

Each repeat runs every variant once, interleaved (boto3, then the tier at each
in-flight count), so that noise on a shared machine falls on all of them; the
JSON on stdout holds every run and the medians. Each variant PUTs ``objects``
objects of ``size`` random bytes and then GETs them all back (lengths are
checked, contents once per variant). boto3 is optional (``pip install boto3``):
without it only the tier runs and the ratios are null.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvstore.config import parse_size
from kvstore.tiers.base import BlockMeta
from kvstore.tiers.object import ObjectTier

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from s3server import S3Server  # noqa: E402

MiB = 1024**2


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def tier_round(server: S3Server, in_flight: int, payload: bytes, n: int,
                     verify: bool) -> dict[str, float]:
    tier = ObjectTier(server.url(f"bench/tier{in_flight}"), endpoint=server.endpoint,
                      access_key_id=server.access_key, secret_access_key=server.secret_key,
                      concurrency=in_flight, timeout_s=60.0, retries=3)
    meta = BlockMeta(len(payload), 0, time.time())
    blocks = [("bench", i.to_bytes(4, "big")) for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.gather(*(tier.put(b, payload, meta) for b in blocks))
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = await asyncio.gather(*(tier.get(b) for b in blocks))
    t_get = time.perf_counter() - t0
    assert all(g is not None and len(g) == len(payload) for g in got)
    if verify:
        assert bytes(got[0] or b"") == payload
    await tier.close()
    return {"put_s": t_put, "get_s": t_get}


def boto3_client(server: S3Server) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3},
                      # plain PUTs, like obstore (no aws-chunked CRC trailers)
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def boto3_round(client: Any, server: S3Server, payload: bytes, n: int,
                verify: bool) -> dict[str, float]:
    keys = [f"bench/boto3/bench/{i.to_bytes(4, 'big').hex()}" for i in range(n)]
    t0 = time.perf_counter()
    for key in keys:
        client.put_object(Bucket=server.bucket, Key=key, Body=payload)
    t_put = time.perf_counter() - t0
    t0 = time.perf_counter()
    first = b""
    for i, key in enumerate(keys):
        body = client.get_object(Bucket=server.bucket, Key=key)["Body"].read()
        assert len(body) == len(payload)
        if i == 0:
            first = body
    t_get = time.perf_counter() - t0
    if verify:
        assert first == payload
    return {"put_s": t_put, "get_s": t_get}


def summarize(runs: list[dict[str, float]], nbytes: int, n: int) -> dict[str, Any]:
    put = statistics.median(r["put_s"] for r in runs)
    get = statistics.median(r["get_s"] for r in runs)
    return {
        "put_mib_s": round(nbytes / put / MiB, 1),
        "get_mib_s": round(nbytes / get / MiB, 1),
        "put_ops_s": round(n / put, 1),
        "get_ops_s": round(n / get, 1),
        "put_s_median": round(put, 4),
        "get_s_median": round(get, 4),
        "runs": [{k: round(v, 4) for k, v in r.items()} for r in runs],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--size", default="2MiB", help="object payload size (default 2MiB)")
    ap.add_argument("--objects", type=int, default=64, help="objects per round (default 64)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds per variant (default 5)")
    ap.add_argument("--in-flight", default="1,8,32", help="tier concurrency levels")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    size = parse_size(args.size)
    levels = [int(x) for x in args.in_flight.split(",") if x.strip()]
    payload = os.urandom(size)
    total = size * args.objects

    try:
        import boto3  # noqa: F401
        have_boto3 = True
    except ImportError:
        have_boto3 = False
        log("boto3 is not installed (pip install boto3): skipping the boto3 baseline")

    with S3Server() as server:
        version = subprocess.run([server.binary, "version"], capture_output=True,
                                 text=True).stdout.splitlines()[0]
        client = boto3_client(server) if have_boto3 else None
        tier_runs: dict[int, list[dict[str, float]]] = {k: [] for k in levels}
        boto_runs: list[dict[str, float]] = []
        # One untimed warm-up round of each (connections, page cache, rclone dirs).
        for k in levels:
            asyncio.run(tier_round(server, k, payload, min(args.objects, 8), True))
        if client is not None:
            boto3_round(client, server, payload, min(args.objects, 8), True)
        for rep in range(args.repeats):
            verify = rep == 0
            if client is not None:
                boto_runs.append(boto3_round(client, server, payload, args.objects, verify))
            for k in levels:
                tier_runs[k].append(asyncio.run(
                    tier_round(server, k, payload, args.objects, verify)))
            log(f"repeat {rep + 1}/{args.repeats} done")

    tier = {str(k): summarize(v, total, args.objects) for k, v in tier_runs.items()}
    boto = summarize(boto_runs, total, args.objects) if boto_runs else None
    ratios: dict[str, Any] = {"put": None, "get": None}
    if boto is not None:
        for op in ("put", "get"):
            ratios[op] = {k: round(v[f"{op}_mib_s"] / boto[f"{op}_mib_s"], 2)
                          for k, v in tier.items()}
    doc = {
        "bench": "bench_l3",
        "what": "ObjectTier (obstore) put/get throughput vs a single-threaded boto3 loop",
        "server": f"{version} serve s3, 127.0.0.1, local disk",
        "object_bytes": size,
        "objects_per_round": args.objects,
        "repeats": args.repeats,
        "statistic": "median over repeats",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "obstore_tier": tier,
        "boto3_single_thread": boto,
        "ratio_tier_over_boto3": ratios,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    log("")
    log(f"{'variant':<16}{'put MiB/s':>12}{'get MiB/s':>12}{'put x boto3':>13}"
        f"{'get x boto3':>13}")
    if boto is not None:
        log(f"{'boto3 (1 thr)':<16}{boto['put_mib_s']:>12}{boto['get_mib_s']:>12}"
            f"{'1.00':>13}{'1.00':>13}")
    for k, v in tier.items():
        rp = ratios["put"][k] if ratios["put"] else "-"
        rg = ratios["get"][k] if ratios["get"] else "-"
        log(f"{'tier x' + k:<16}{v['put_mib_s']:>12}{v['get_mib_s']:>12}{rp:>13}{rg:>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
