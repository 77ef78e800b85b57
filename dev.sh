#!/usr/bin/env bash
# kvstore developer entry point. Every command sets itself up: it creates
# .venv (if missing), installs kvstore with its test tools and builds the
# Cython extension and the protobuf modules, then does its job.
#
#   ./dev.sh serve [kvstore serve flags]   start the service on embedded defaults
#   ./dev.sh test  [pytest args]           run the whole test suite (native and pure)
#   ./dev.sh bench [name]                  run a benchmark from bench/
#   ./dev.sh lint                          ruff + mypy
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${KVSTORE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp="$VENV/.kvstore-installed"
  # Reinstall when the build inputs changed since the last install.
  local inputs
  inputs=$(shopt -s nullglob; cat pyproject.toml setup.py proto/kvstore/v1/*.proto native/*.pyx native/*.pxd native/*.h native/*.c | sha1sum | cut -c1-40)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$inputs" ] || [ ! -f kvstore/v1/kvstore_pb2.py ]; then
    echo "kvstore: setting up $VENV (dependencies, protobuf modules, Cython extension)..." >&2
    local log="$VENV/setup.log"
    if ! { "$VENV/bin/python" -m pip install -q --upgrade pip &&
           "$VENV/bin/python" -m pip install -q "setuptools>=69" wheel "cython>=3.0" \
             "grpcio-tools>=1.60" "numpy>=1.26" &&
           "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev]"; } >"$log" 2>&1; then
      cat "$log" >&2
      echo "kvstore: set-up failed (log: $log)" >&2
      exit 1
    fi
    echo "$inputs" > "$stamp"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup)
    setup ;;
  serve)
    setup
    exec "$VENV/bin/kvstore" serve "$@" ;;
  test)
    setup
    if [ "$#" -eq 0 ]; then
      # The pure-Python reference (KVSTORE_PURE=1) over the block-format and
      # key tests first, then the whole suite on the native build.
      KVSTORE_PURE=1 "$VENV/bin/python" -m pytest -q -m "not perf" tests/block
    fi
    "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    setup
    name=${1:-throughput}; shift || true
    exec "$VENV/bin/python" -m "bench.$name" "$@" ;;
  lint)
    setup
    "$VENV/bin/ruff" check kvstore tests bench
    "$VENV/bin/mypy" kvstore ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
