#!/usr/bin/env bash
# Packaging check: what installing kvstore gives a user, from the sdist (the way
# the README installs it: kvstore is not on PyPI, where the name is another project's).
#
#   1. build the sdist and check it holds the build inputs (native/, proto/);
#   2. in a fresh venv, build the wheel from the sdist (pip's isolated build,
#      as a user's pip does) and install it without extras;
#   3. smoke test with the installed CLI: kvstore serve (unix socket, temp data
#      dir, no L3), put, get, stop; L3 configured without the [l3] extra must
#      fail with one clear line;
#   4. install the declared floors of protobuf and grpcio (read from
#      pyproject.toml) and import the package and run the smoke test again.
#
# Usage: .ci/package-smoke.sh   (needs the dev venv: ./dev.sh setup)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEV_PY=${KVSTORE_VENV:-$ROOT/.venv}/bin/python
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1
T0=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvstore-pkg.XXXXXX")
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { echo "package-smoke [$((SECONDS - T0))s] $*" >&2; }
fail() { echo "package-smoke: FAILED: $*" >&2; exit 1; }

step "building the sdist"
# The dev venv already holds the build requirements, so no isolated env here;
# the wheel below is built the way a user's pip builds it (isolated).
"$DEV_PY" -m build --sdist --no-isolation --outdir "$WORK/dist" . >"$WORK/sdist.log" 2>&1 ||
  { cat "$WORK/sdist.log" >&2; fail "sdist build"; }
SDIST=$(ls "$WORK"/dist/kvstore-*.tar.gz)
tar -tzf "$SDIST" | sed 's|^[^/]*/||' | sort > "$WORK/sdist.txt"
for f in LICENSE README.md pyproject.toml setup.py native/_native.pyx native/kv_block.h \
         native/kv_crc32c.h proto/kvstore/v1/kvstore.proto kvstore/__init__.py kvstore/py.typed; do
  grep -qx "$f" "$WORK/sdist.txt" || fail "sdist lacks $f"
done
if grep -E '_pb2|\.so$|^native/_native\.c$' "$WORK/sdist.txt"; then
  fail "sdist holds build outputs (above)"
fi

step "fresh venv: building the wheel from the sdist (isolated) and installing it, no extras"
"$PY" -m venv "$WORK/venv"
VPY=$WORK/venv/bin/python
"$VPY" -m pip wheel -q --no-deps -w "$WORK/wheel" "$SDIST" >"$WORK/wheel.log" 2>&1 ||
  { cat "$WORK/wheel.log" >&2; fail "wheel build from the sdist"; }
WHEEL=$(ls "$WORK"/wheel/kvstore-*.whl)
"$VPY" - "$WHEEL" <<'PYEOF' || fail "wheel contents"
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ("kvstore/_native", "kvstore/v1/kvstore_pb2.py", "kvstore/v1/kvstore_pb2_grpc.py",
             "kvstore/py.typed", "licenses/LICENSE"):
    if not any(want in n for n in names):
        sys.exit(f"package-smoke: the wheel lacks {want}")
PYEOF
"$VPY" -m pip install -q "$WHEEL" >"$WORK/install.log" 2>&1 ||
  { cat "$WORK/install.log" >&2; fail "wheel install"; }
cd "$WORK"  # from here on nothing may import the checkout's sources
if "$VPY" -c 'import obstore' 2>/dev/null; then fail "obstore installed without the [l3] extra"; fi

smoke() {
  local data=$WORK/data-$1 sock=$WORK/kv-$1.sock
  mkdir -p "$data"
  "$WORK/venv/bin/kvstore" serve --data-dir "$data" --server-listen "" \
    --server-unix-socket "$sock" --l1-capacity 16MiB --l1-prefault false \
    --ready-file "$data/ready.json" >"$data/server.log" 2>&1 &
  SERVER_PID=$!
  local waited=0
  until [ -s "$data/ready.json" ]; do
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$data/server.log" >&2; fail "server exited ($1)"; }
    [ "$waited" -lt 600 ] || { cat "$data/server.log" >&2; fail "server not ready in 60 s ($1)"; }
    sleep 0.1; waited=$((waited + 1))
  done
  head -c 100000 /dev/urandom > "$data/block"
  "$WORK/venv/bin/kvstore" put --target "unix:$sock" -n smoke --ack local key-1 "$data/block"
  "$WORK/venv/bin/kvstore" get --target "unix:$sock" -n smoke key-1 -o "$data/back"
  cmp "$data/block" "$data/back" || fail "get returned other bytes than put ($1)"
  if "$WORK/venv/bin/kvstore" get --target "unix:$sock" -n smoke missing -o /dev/null 2>/dev/null
  then fail "get of a missing key succeeded ($1)"; fi
  kill -TERM "$SERVER_PID"
  wait "$SERVER_PID" || fail "server exit status $? after SIGTERM ($1)"
  SERVER_PID=""
}

step "smoke test: kvstore serve, put, get, stop (latest dependencies)"
smoke latest
"$VPY" -c 'import google.protobuf, grpc; print("  protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)'

step "L3 configured without the [l3] extra: one clear error"
rc=0
"$WORK/venv/bin/kvstore" serve --data-dir "$WORK/data-l3" --server-listen "" \
  --server-unix-socket "$WORK/kv-l3.sock" --l1-capacity 16MiB --l1-prefault false \
  --l3-url "file://$WORK/l3" >"$WORK/l3.log" 2>&1 || rc=$?
[ "$rc" -ne 0 ] || fail "serve with L3 and no obstore started"
grep -q "but obstore is not installed: pip install 'obstore>=0.6' (kvstore's l3 extra)" "$WORK/l3.log" ||
  { cat "$WORK/l3.log" >&2; fail "no clear error for the missing [l3] extra"; }
[ "$(wc -l < "$WORK/l3.log")" -eq 1 ] || { cat "$WORK/l3.log" >&2; fail "more than one line"; }
sed 's/^/  /' "$WORK/l3.log" >&2

FLOORS=$("$VPY" - "$ROOT/pyproject.toml" <<'PYEOF'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
wanted = {"protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection"}
for dep in deps:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", dep.replace(" ", ""))
    if m and m.group(1) in wanted:
        print(f"{m.group(1)}=={m.group(2)}")
PYEOF
)
step "declared floors: $(echo $FLOORS)"
# shellcheck disable=SC2086  # one requirement per word
"$VPY" -m pip install -q $FLOORS >"$WORK/floors.log" 2>&1 ||
  { cat "$WORK/floors.log" >&2; fail "installing the floors"; }
"$VPY" -m pip check >&2 || fail "pip check with the floors"
"$VPY" -W error -c 'import kvstore; from kvstore import Client, AsyncClient; import kvstore.server.app' ||
  fail "import with the floor versions"
smoke floors

step "passed in $((SECONDS - T0)) s"
