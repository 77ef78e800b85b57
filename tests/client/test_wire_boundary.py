"""The wire has one home: only kvstore.wire names the generated package, and
only the edges (server, SDK, CLI) import kvstore.wire."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kvstore"
EDGES = ("server/", "client/", "wire/", "cli.py", "__main__.py")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def _modules() -> list[tuple[str, set[str]]]:
    return [(p.relative_to(PKG).as_posix(), _imports(p)) for p in sorted(PKG.rglob("*.py"))
            if not p.relative_to(PKG).as_posix().startswith("v1/")]


def test_only_kvstore_wire_pb_imports_the_generated_package() -> None:
    offenders = [rel for rel, names in _modules() if rel != "wire/pb.py"
                 and any(n == "kvstore.v1" or n.startswith("kvstore.v1.") for n in names)]
    assert not offenders, f"import generated code through kvstore.wire.pb: {offenders}"


def test_domain_code_never_imports_the_wire() -> None:
    offenders = [rel for rel, names in _modules() if not rel.startswith(EDGES)
                 and any(n == "kvstore.wire" or n.startswith("kvstore.wire.") for n in names)]
    assert not offenders, f"domain modules importing kvstore.wire: {offenders}"


def test_the_wire_package_imports_nothing_generated_until_asked() -> None:
    import subprocess
    import sys

    code = ("import sys, kvstore.wire.codec, kvstore.wire.lookup; "
            "print(any(m.startswith('kvstore.v1') or m == 'grpc' for m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=PKG.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
