"""The contract as a client in another language sees it: a JavaScript client
built at run time from proto/kvstore/v1/kvstore.proto by @grpc/proto-loader
(tests/xlang/node/client.js; no kvstore code) against a real server on
127.0.0.1.

It puts two blocks (one of four chunks), looks them up with a miss, reads
them back byte-exact (one in several chunks) with a miss in between, and
sends two invalid requests, which get INVALID_ARGUMENT and the
``kvstore-error`` trailer. The Python SDK then reads what it stored.

Needs ``node`` and ``npm``; the two npm packages are installed once into a
cache directory (KVSTORE_NODE_CACHE, default ~/.cache/kvstore-tests). Skipped
with the reason when the toolchain is absent or the install fails (offline).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from serverproc import ServerProcess

from kvstore import Client

HERE = Path(__file__).resolve().parent / "node"
PROTO = Path(__file__).resolve().parents[2] / "proto" / "kvstore" / "v1" / "kvstore.proto"
NAMESPACE = "xlang-node"
INSTALL_TIMEOUT_S = 300


def block_bytes(seed: int, size: int) -> bytes:
    """The pattern of blockBytes in client.js."""
    return bytes((i * 131 + seed * 7 + (i >> 8)) & 0xFF for i in range(size))


def node_modules() -> Path:
    """The installed npm packages of node/package.json, installing them once."""
    for tool in ("node", "npm"):
        if shutil.which(tool) is None:
            pytest.skip(f"no `{tool}` on PATH: the second-language client needs Node.js and npm")
    manifest = (HERE / "package.json").read_bytes()
    cache = Path(os.environ.get("KVSTORE_NODE_CACHE", Path.home() / ".cache" / "kvstore-tests"))
    prefix = cache / f"node-{hashlib.sha256(manifest).hexdigest()[:16]}"
    modules = prefix / "node_modules"
    if (modules / "@grpc" / "grpc-js").is_dir() and (modules / "@grpc" / "proto-loader").is_dir():
        return modules
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "package.json").write_bytes(manifest)
    try:
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
                              cwd=prefix, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install of @grpc/grpc-js and @grpc/proto-loader took over "
                    f"{INSTALL_TIMEOUT_S} s (no registry?)")
    if done.returncode != 0:
        reason = next((line for line in done.stderr.splitlines() if "Error" in line),
                      done.stderr.strip()[:300])
        pytest.skip(f"npm install of @grpc/grpc-js and @grpc/proto-loader failed: {reason}")
    return modules


def run_node_client(target: str) -> dict:  # type: ignore[type-arg]
    env = {**os.environ, "NODE_PATH": str(node_modules())}
    done = subprocess.run(["node", str(HERE / "client.js"), str(PROTO), target, NAMESPACE],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_a_node_client_from_the_proto_round_trips_and_sees_the_error_contract(
        shared_server: ServerProcess) -> None:
    result = run_node_client(shared_server.tcp)

    assert result["put"] == {"reply": {"stored": 2, "bytes": str(200_000 + 1000)}}, result
    assert result["lookup"]["reply"]["found"] == 2
    assert result["lookup"]["reply"]["tiers"][2] == "TIER_UNSPECIFIED"
    assert all(t != "TIER_UNSPECIFIED" for t in result["lookup"]["reply"]["tiers"][:2])

    big, miss, small = result["get"]
    assert big["hit"] and big["exact"] and big["in_order"] and big["size"] == 200_000
    assert big["chunks"] == 4  # max_chunk_bytes = 64 KiB
    assert small["hit"] and small["exact"] and small["chunks"] == 1 and small["size"] == 1000
    assert miss == {"hit": False, "chunks": 1, "size": 0, "tier": "TIER_UNSPECIFIED",
                    "in_order": True, "length": 0, "exact": True}

    for name, error_class in [("invalid_namespace", "InvalidNamespace"),
                              ("empty_block", "MalformedRequest")]:
        error = result[name]["error"]
        assert error["code"] == "INVALID_ARGUMENT", (name, error)
        assert error["kvstore_error"] == [error_class], (name, error)
        assert len(error["details"]) < 200

    # What JavaScript stored, Python reads byte-exact.
    with Client(shared_server.tcp, namespace=NAMESPACE) as c:
        keys = [b"node-a", hashlib.sha256(b"node-b").digest(), b"node-empty"]
        assert c.get(keys) == [block_bytes(1, 200_000), block_bytes(2, 1000), None]
        c.delete(keys)
