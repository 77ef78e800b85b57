#!/usr/bin/env bash
# kvstore developer entry point. Every command sets itself up in .venv (created
# if missing), then does its job. `serve` needs only the runtime: kvstore and its
# dependencies (the build tools stay in pip's throw-away build environment).
# The other commands need the dev tools: the build tools from pyproject.toml's
# [build-system] requires, then kvstore[dev] (test tools, ruff, mypy), editable.
# Either install builds the Cython extension and the protobuf modules; it is
# redone only when a build input (pyproject.toml, setup.py, proto/, native/)
# changed.
#
#   ./dev.sh serve [kvstore serve flags]   start the service on embedded defaults
#   ./dev.sh test  [pytest args]           run the whole test suite (native and pure);
#                                          -m "not slow": the fast lane
#   ./dev.sh bench [name]                  run a benchmark from bench/
#   ./dev.sh lint                          ruff + mypy
#   ./dev.sh setup                         only set up (the dev tools)
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV=${KVSTORE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

# A digest of the build inputs: the sources only, never what a build writes
# (native/_native.c is Cython's output).
build_inputs_digest() {
  (
    shopt -s nullglob
    local c sources=()
    for c in native/*.c; do [ "$c" = native/_native.c ] || sources+=("$c"); done
    cat pyproject.toml setup.py proto/kvstore/v1/*.proto native/*.pyx native/*.pxd \
      native/*.h "${sources[@]}" | sha1sum | cut -c1-40
  )
}

# setup runtime|dev: make $VENV hold at least that level. The stamp file records
# "<level> <digest>"; a dev venv also serves, so it is never downgraded.
setup() {
  local want=$1 stamp="$VENV/.kvstore-installed" have="" digest level have_digest
  digest=$(build_inputs_digest)
  if [ -f "$stamp" ] && [ -f kvstore/v1/kvstore_pb2.py ]; then
    read -r level have_digest < "$stamp" || true
    if [ "${have_digest:-}" = "$digest" ]; then have=$level; fi
  fi
  case "$want:$have" in
    runtime:runtime|runtime:dev|dev:dev) return 0 ;;
  esac
  # Rebuilding a dev venv keeps it dev.
  if [ -f "$stamp" ] && [ "$(cut -d' ' -f1 "$stamp")" = dev ]; then want=dev; fi
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  echo "kvstore: setting up $VENV ($want: dependencies, protobuf modules, Cython extension)..." >&2
  local log="$VENV/setup.log" ok=0
  if [ "$want" = runtime ]; then
    { "$VENV/bin/python" -m pip install -q --upgrade pip &&
      "$VENV/bin/python" -m pip install -q -e .; } >"$log" 2>&1 || ok=$?
  else
    local build_requires
    build_requires=$("$VENV/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
    { "$VENV/bin/python" -m pip install -q --upgrade pip &&
      # shellcheck disable=SC2086  # one requirement per line, none with spaces
      "$VENV/bin/python" -m pip install -q $build_requires &&
      # The build requirements again, so that the resolver keeps to their pins
      # (grpcio-tools caps protobuf) while it picks the dev tools.
      # shellcheck disable=SC2086
      "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[dev]" $build_requires &&
      "$VENV/bin/python" -m pip check; } >"$log" 2>&1 || ok=$?
  fi
  if [ "$ok" -ne 0 ]; then
    cat "$log" >&2
    echo "kvstore: set-up failed (log: $log)" >&2
    exit 1
  fi
  echo "$want $digest" > "$stamp"
}

cmd=${1:-help}
shift || true
case "$cmd" in
  setup)
    setup dev ;;
  serve)
    setup runtime
    exec "$VENV/bin/kvstore" serve "$@" ;;
  test)
    setup dev
    # The pure-Python reference (KVSTORE_PURE=1) over the block-format and key
    # tests first, then the suite on the native build. Options alone (-x, -q,
    # -m "not slow", -k ...) apply to both passes; arguments that name what to
    # run (a path, or path::test) run only that, on the native build.
    pure=1
    for arg in "$@"; do
      if [ -e "${arg%%::*}" ]; then pure=0; fi
    done
    if [ "$pure" -eq 1 ]; then
      rc=0
      KVSTORE_PURE=1 "$VENV/bin/python" -m pytest -q "$@" tests/block || rc=$?
      # 5: the options selected no block test (e.g. -k restart): nothing to run.
      if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
    fi
    "$VENV/bin/python" -m pytest "$@" ;;
  bench)
    setup dev
    name=${1:-throughput}; shift || true
    exec "$VENV/bin/python" -m "bench.$name" "$@" ;;
  lint)
    setup dev
    "$VENV/bin/ruff" check kvstore tests bench
    "$VENV/bin/mypy" kvstore ;;
  *)
    sed -n '2,16p' "$0"; exit 2 ;;
esac
