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

# -- ./dev.sh test-engines [pytest args]: the engine integrations against the real engines --
# One cached venv outside the repo (KVSTORE_ENGINES_VENV) with the pinned engines,
# in this order: vLLM (it pins torch), LMCache, SGLang without its dependencies plus
# the few small packages its imports need; kvstore is built into it from a copy of
# the tree (its protobuf modules must match that venv's protobuf, not .venv's).
ENGINE_PINS="vllm==0.33.0 lmcache==0.5.6 sglang==0.5.23"
engines_venv() {
  local ev=${KVSTORE_ENGINES_VENV:-$HOME/.cache/kvstore/engines-venv} py
  py="$ev/bin/python"
  if [ "$(cat "$ev/.engines-installed" 2>/dev/null)" != "$ENGINE_PINS" ]; then
    echo "kvstore: building the engines venv at $ev ($ENGINE_PINS; ~10 GB)..." >&2
    rm -rf "$ev" && "$PY" -m venv "$ev"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q vllm==0.33.0
    "$py" -m pip install -q lmcache==0.5.6
    "$py" -m pip install -q --no-deps sglang==0.5.23
    "$py" -m pip install -q IPython gguf matplotlib
    "$py" -m pip install -q "cython>=3.0" wheel \
      "grpcio-tools==$("$py" -c 'import grpc; print(grpc.__version__)')"
    echo "$ENGINE_PINS" > "$ev/.engines-installed"
  fi
  local src="$ev/kvstore-src" inputs
  inputs=$(git ls-files -co --exclude-standard kvstore native proto setup.py pyproject.toml \
           README.md | grep -v '_pb2' | sort | xargs cat | sha1sum | cut -c1-40)
  if [ "$(cat "$ev/.kvstore-installed" 2>/dev/null)" != "$inputs" ]; then
    echo "kvstore: installing kvstore into the engines venv..." >&2
    rm -rf "$src" && mkdir -p "$src"
    git ls-files -co --exclude-standard kvstore native proto setup.py pyproject.toml \
      README.md | grep -v '_pb2' | tar -cf - -T - | tar -xf - -C "$src"
    (cd "$src" && "$py" -m pip install -q --no-build-isolation ".[test]")
    echo "$inputs" > "$ev/.kvstore-installed"
  fi
  # Commands run from here, outside the tree, so that the venv's kvstore is the one
  # imported; bench/ comes along for `python -m bench.engines`.
  ENGINES_RUN="$ev/run"
  rm -rf "$ENGINES_RUN" && mkdir -p "$ENGINES_RUN" && cp -r bench "$ENGINES_RUN/"
  ENGINES_PY=$py
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
  test-engines)
    engines_venv
    cd "$ENGINES_RUN" && exec "$ENGINES_PY" -m pytest -c "$ROOT/pyproject.toml" \
      --rootdir "$ROOT" -p no:cacheprovider -W ignore::ResourceWarning \
      -W ignore::pytest.PytestUnraisableExceptionWarning "$ROOT/tests/engines" "$@" ;;
  bench-engines)
    engines_venv
    cd "$ENGINES_RUN" && exec "$ENGINES_PY" -m bench.engines --out "$ROOT/bench/results" "$@" ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
