"""The implementation switch (kvstore._impl) and the kvstore.block exports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import kvstore.block as block
from kvstore import _impl
from kvstore.block import reference
from tests.block.blockcases import PURE, ROOT

EXPORTS = ["pack", "unpack_into", "verify", "parse_header", "block_keys", "checksum",
           "copy_and_checksum", "BlockHeader", "DType", "IMPLEMENTATION", "block_size"]


def test_exports() -> None:
    for name in EXPORTS:
        assert hasattr(block, name), name
    assert set(block.__all__) >= set(EXPORTS)
    from kvstore.block import pack, verify  # noqa: F401  (the lazy names import)


def test_implementation_follows_kvstore_pure() -> None:
    if PURE:
        assert block.IMPLEMENTATION == _impl.IMPLEMENTATION == "pure"
        assert block.pack is reference.pack and block.checksum is reference.checksum
    else:
        native = _impl.native
        assert native is not None
        assert block.IMPLEMENTATION == _impl.IMPLEMENTATION == native.IMPLEMENTATION == "native"
        assert block.pack is native.pack and block.block_keys is native.block_keys


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "KVSTORE_PURE"} | env
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("first", ["kvstore._impl", "kvstore.checksum", "kvstore.block",
                                   "kvstore.block.reference", "kvstore._native"])
def test_any_import_order_works(first: str) -> None:
    if first == "kvstore._native" and PURE:
        pytest.skip("native module not needed in pure mode")
    code = (f"import {first}, kvstore.block as b, kvstore.checksum as c; "
            "print(b.IMPLEMENTATION, b.verify(b.pack([__import__('numpy').zeros((1,1,1,1),"
            "'float16')], None, [0])).tokens, c.checksum(b'123456789'))")
    env = {"KVSTORE_PURE": "1"} if PURE else {}
    res = _python(code, **env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["pure" if PURE else "native", "1", str(0xE3069283)]


def test_pure_switch_in_a_fresh_process() -> None:
    res = _python("import kvstore.block as b; print(b.IMPLEMENTATION)", KVSTORE_PURE="1")
    assert res.returncode == 0 and res.stdout.strip() == "pure", res.stderr


def test_bad_switch_value_fails_loudly() -> None:
    res = _python("import kvstore.block as b; b.pack", KVSTORE_PURE="yes")
    assert res.returncode != 0 and "KVSTORE_PURE must be 0 or 1" in res.stderr


def test_the_door_is_the_only_importer_of_the_extension() -> None:
    importers = []
    for path in sorted([*(ROOT / "kvstore").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]):
        if path.name != "_impl.py" and "_native" in _imported_names(path.read_text()):
            importers.append(path.relative_to(ROOT).as_posix())
    assert not importers, f"modules importing kvstore._native besides kvstore/_impl.py: " \
        f"{importers}"


def _imported_names(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(part for a in node.names for part in a.name.split("."))
        elif isinstance(node, ast.ImportFrom):
            names.update((node.module or "").split("."))
            names.update(a.name for a in node.names)
    return names


def test_missing_native_build_fails_loudly() -> None:
    code = ("import sys; sys.modules['kvstore._native'] = None\n"
            "import kvstore._impl")
    res = _python(code)
    assert res.returncode != 0
    assert "kvstore._native cannot be imported" in res.stderr and "KVSTORE_PURE=1" in res.stderr
    res = _python(code, KVSTORE_PURE="1")  # the reference needs no build
    assert res.returncode == 0, res.stderr


def test_a_checkout_hiding_the_installed_package_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by a review: Python run in the checkout after `pip install .`
    imports the checkout's kvstore/ (no extension there), and the advice was
    to build in place, which the venv's missing build tools refuse."""
    import importlib.metadata

    installed = tmp_path / "site-packages" / "kvstore"
    installed.mkdir(parents=True)
    (installed / "__init__.py").write_text("")

    class Installed:
        def locate_file(self, name: str) -> Path:
            return tmp_path / "site-packages" / name

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Installed())
    advice = _impl._how_to_get_native()
    assert f"hides the one installed in {tmp_path / 'site-packages'}" in advice
    assert "run from another directory" in advice


def test_the_cli_refuses_a_bad_switch_value_in_one_line() -> None:
    res = subprocess.run([sys.executable, "-m", "kvstore", "--version"], capture_output=True,
                         text=True, env={**os.environ, "KVSTORE_PURE": "true"}, timeout=60)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == ("kvstore: KVSTORE_PURE must be 0 or 1 (1: the pure-Python "
                                  "block packer), not 'true'")
