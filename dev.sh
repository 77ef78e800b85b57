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
#   ./dev.sh test  [pytest args]           run the whole test suite (native and pure),
#                                          one worker per CPU (KVSTORE_TEST_WORKERS);
#                                          -m "not slow": the fast lane
#   ./dev.sh bench [name]                  run a benchmark from bench/
#   ./dev.sh lint                          ruff + mypy
#   ./dev.sh setup                         only set up (the dev tools)
#   ./dev.sh engines-setup                 set up the engine venv ($KVSTORE_ENGINES_VENV)
#   ./dev.sh test-engines [pytest args]    the engine lane (tests/engines) in that venv
#   ./dev.sh bench-engines [args]          the engine benchmark (bench/engines.py)
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
    { cat pyproject.toml setup.py proto/kvstore/v1/*.proto native/*.pyx native/*.pxd \
        native/*.h "${sources[@]}"; echo "KVSTORE_DEBUG_BUILD=${KVSTORE_DEBUG_BUILD:-}"; } |
      sha1sum | cut -c1-40
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
    # Each step must succeed (also when called as an `if` condition, where
    # set -e is off): a half-built venv is never stamped.
    { rm -rf "$ev" && "$PY" -m venv "$ev" &&
      "$py" -m pip install -q --upgrade pip &&
      "$py" -m pip install -q vllm==0.33.0 &&
      "$py" -m pip install -q lmcache==0.5.6 &&
      "$py" -m pip install -q --no-deps sglang==0.5.23 &&
      "$py" -m pip install -q IPython gguf matplotlib &&
      "$py" -m pip install -q "cython>=3.0" wheel \
        "grpcio-tools==$("$py" -c 'import grpc; print(grpc.__version__)')"; } ||
      { echo "kvstore: building the engines venv failed" >&2; return 1; }
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
    (cd "$src" && "$py" -m pip install -q --no-build-isolation ".[test]") || return 1
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
# one_process ARGS...: whether these pytest arguments ask for the tests in
# this process: workers chosen already (-n, --numprocesses, --dist), xdist
# off (-p no:xdist), or a debugger or uncaptured output (--pdb, --trace, -s
# alone or in a cluster such as -vs, --capture=no or --capture no).
one_process() {
  local arg prev=""
  for arg in "$@"; do
    case "$arg" in
      -n|-n[0-9]*|-nauto|--numprocesses*|--dist*|*no:xdist|--pdb|--trace|--capture=no) return 0 ;;
      no) [ "$prev" = --capture ] && return 0 ;;
      --*|-r*|-[kmcWop]) ;;  # (long options; -r's letters; options whose value follows)
      -*s*) [ "${prev}" != -k ] && [ "${prev}" != -m ] && return 0 ;;
    esac
    prev=$arg
  done
  return 1
}

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
    # The suite runs on one pytest-xdist worker per CPU (at most 4): a test
    # spends most of its time waiting on the servers it started, so 2 workers
    # on 2 cores take ~0.6 of the serial time. KVSTORE_TEST_WORKERS=N sets the
    # count (1: one process; auto: xdist's own choice); see one_process below
    # for the options that win.
    workers=()
    # shellcheck disable=SC2086  # PYTEST_ADDOPTS: words, as pytest splits it
    if ! one_process "$@" ${PYTEST_ADDOPTS:-}; then
      if [ -n "${KVSTORE_TEST_WORKERS:-}" ]; then
        n=$KVSTORE_TEST_WORKERS
        if ! [[ "$n" =~ ^([0-9]{1,3}|auto)$ ]]; then
          echo "dev.sh: KVSTORE_TEST_WORKERS must be a number of workers or 'auto', not '$n'" >&2
          exit 2
        fi
      else
        n=$(nproc 2>/dev/null || echo 1)
        if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "${#n}" -gt 1 ] || [ "$n" -gt 4 ]; then n=4; fi
      fi
      if [ "$n" = auto ] || [ "$((10#$n))" -gt 1 ]; then workers=(-n "$n"); fi
    fi
    "$VENV/bin/python" -m pytest ${workers[@]+"${workers[@]}"} "$@" ;;
  bench)
    setup dev
    # The peers' clients the baselines need (the `bench` extra: redis-py,
    # boto3, matplotlib), once: without them a baseline was left out.
    if ! "$VENV/bin/python" -c 'import redis, boto3, matplotlib' 2>/dev/null; then
      # shellcheck disable=SC2046  # one requirement per line, none with spaces
      "$VENV/bin/python" -m pip install -q $("$VENV/bin/python" -c 'import tomllib
print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["bench"]))')
    fi
    name=${1:-throughput}; shift || true
    exec "$VENV/bin/python" -m "bench.$name" "$@" ;;
  lint)
    setup dev
    "$VENV/bin/ruff" check kvstore tests bench
    "$VENV/bin/mypy" kvstore ;;
  engines-setup)
    engines_venv ;;
  test-engines)
    engines_venv
    cd "$ENGINES_RUN" && exec "$ENGINES_PY" -m pytest -c "$ROOT/pyproject.toml" \
      --rootdir "$ROOT" -p no:cacheprovider -W ignore::ResourceWarning \
      -W ignore::pytest.PytestUnraisableExceptionWarning "$ROOT/tests/engines" "$@" ;;
  bench-engines)
    engines_venv
    cd "$ENGINES_RUN" && exec "$ENGINES_PY" -m bench.engines --out "$ROOT/bench/results" "$@" ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
