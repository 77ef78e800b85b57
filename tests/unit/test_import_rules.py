"""The import rules: which parts of kvstore may import which.

docs/architecture.md draws the parts and the allowed edges; this test is the
same table, enforced. It reads every module under kvstore/ with ``ast`` (no
import runs) and collects every import: at module level,
inside functions (the lazy ones still tie the two modules together) and under
``TYPE_CHECKING`` (a type is a dependency too). ``importlib.import_module``
with a literal name counts as an import.

When a rule fails, move the code to the part that may hold it, or pass the
thing in from above (the store hands the policy what it needs; the server hands
the store domain values, never protobuf messages); change the rule only with
docs/architecture.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "kvstore"


@dataclass(frozen=True)
class Edge:
    importer: str  # dotted module name, e.g. "kvstore.store.index"
    imported: str  # the deepest kvstore module the statement names, or the outside module
    where: str  # "kvstore/store/index.py:12", for the failure message
    type_only: bool  # under `if TYPE_CHECKING:`: never runs

    def __str__(self) -> str:
        return f"{self.where}: {self.importer} imports {self.imported}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, Path]:
    """Every kvstore module written in Python (generated code included: it is a target)."""
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _known(name: str) -> bool:
    # The extension has no .py source; its stub names it.
    return name in _sources() or name == "kvstore._native"


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _names(importer: str, path: Path, node: ast.AST) -> Iterator[str]:
    """The modules one statement imports (``from pkg import mod`` names mod)."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        module = _resolve(importer, path.name == "__init__.py", node)
        for alias in node.names:
            sub = f"{module}.{alias.name}"
            # Outside kvstore the name is kept whole: ``from grpc_health.v1 import
            # health_pb2`` must still read as generated code.
            yield sub if _known(sub) or not _within(module, ["kvstore"]) else module
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "import_module" and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        yield node.args[0].value


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """The ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            inside.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return inside


@cache
def edges() -> tuple[Edge, ...]:
    found = []
    for importer, path in _sources().items():
        if importer == "kvstore.v1" or importer.startswith("kvstore.v1."):
            continue  # generated: its own imports are protoc's business
        rel = path.relative_to(PKG.parent).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        type_only = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            for name in _names(importer, path, node):
                found.append(Edge(importer, name, f"{rel}:{node.lineno}", id(node) in type_only))
    return tuple(found)


def kvstore_edges() -> list[Edge]:
    return [e for e in edges() if _within(e.imported, ["kvstore"])]


def _within(name: str, parts: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in parts)


def _offenders(importers: Iterable[str], forbidden: Iterable[str]) -> list[str]:
    importers, forbidden = tuple(importers), tuple(forbidden)
    return [str(e) for e in edges()
            if _within(e.importer, importers) and _within(e.imported, forbidden)]


# --- the reader sees the whole package -------------------------------------------------------

def test_the_reader_sees_every_part() -> None:
    # A guard for the rules below: an empty or partial graph would pass them all.
    importers = {e.importer for e in edges()}
    for part in ("kvstore.tiers.lmdb_tier", "kvstore.policy.session.policy", "kvstore.store.tiered",
                 "kvstore.server.servicer", "kvstore.client._convert", "kvstore.wire.pb",
                 "kvstore.dataplane.ops"):
        assert part in importers, part
    block_to_door = {e.type_only for e in edges()
                     if e.importer == "kvstore.block" and e.imported == "kvstore._impl"}
    assert block_to_door == {True, False}, \
        "imports under TYPE_CHECKING or inside functions are not being read"
    assert any(e.imported == "kvstore._native" for e in edges()), "import_module is not being read"


# --- who may import whom ------------------------------------------------------------------------

#: The edges: they speak to the outside (gRPC, the data plane's frames, the
#: command line) and call the store with domain values.
EDGE_PARTS = ("kvstore.server", "kvstore.client", "kvstore.wire", "kvstore.cli", "kvstore.__main__",
              "kvstore.dataplane")
#: The edges that may import generated protobuf code: the data plane speaks
#: its own frames (the servicer converts OpenDataPlane's messages).
PROTOBUF_EDGES = tuple(p for p in EDGE_PARTS if p != "kvstore.dataplane")


def test_tiers_are_mechanism() -> None:
    offenders = _offenders(["kvstore.tiers"], ["kvstore.store", "kvstore.policy", *EDGE_PARTS])
    assert not offenders, "a tier stores bytes under keys; it knows no store, policy or wire:\n" + \
        "\n".join(offenders)


def test_the_policy_is_pure() -> None:
    offenders = _offenders(["kvstore.policy"],
                           ["kvstore.tiers", "kvstore.store", *EDGE_PARTS])
    assert not offenders, "the policy decides from what it is told; it reaches no tier, store or " \
        "wire:\n" + "\n".join(offenders)


def test_the_store_knows_no_wire() -> None:
    offenders = _offenders(["kvstore.store"], EDGE_PARTS)
    assert not offenders, "the store is domain code; the server translates the wire for it:\n" + \
        "\n".join(offenders)


def _is_generated(name: str) -> bool:
    return (_within(name, ["kvstore.v1", "kvstore.wire.pb"])
            or name.rsplit(".", 1)[-1].endswith(("_pb2", "_pb2_grpc")))


def test_only_the_edges_import_generated_code() -> None:
    offenders = [str(e) for e in edges()
                 if _is_generated(e.imported) and not _within(e.importer, PROTOBUF_EDGES)]
    assert not offenders, "generated protobuf code stays at the edges (server, client, wire, " \
        "cli; not the data plane):\n" + "\n".join(offenders)


def test_the_data_plane_serves_the_store_and_no_other_edge() -> None:
    # The server starts the data plane; the data plane never reaches back
    # into the server, the SDK or the wire codecs.
    offenders = _offenders(["kvstore.dataplane"],
                           [p for p in EDGE_PARTS if p != "kvstore.dataplane"])
    assert not offenders, "the data plane is called by the server, not the other way " \
        "round:\n" + "\n".join(offenders)


def test_only_the_native_door_imports_the_extension() -> None:
    offenders = [str(e) for e in edges()
                 if e.imported == "kvstore._native" and e.importer != "kvstore._impl"]
    assert not offenders, "import native code through kvstore._impl:\n" + "\n".join(offenders)


def _reachable(start: str) -> dict[str, Edge | None]:
    """Every module ``start`` may load, each with the edge that first reached it."""
    seen: dict[str, Edge | None] = {start: None}
    todo = [start]
    while todo:
        current = todo.pop()
        for e in kvstore_edges():
            if e.importer == current and e.imported not in seen and not e.type_only:
                seen[e.imported] = e
                todo.append(e.imported)
    return seen


def test_the_server_never_loads_the_simulator_fast_paths() -> None:
    # Transitively: a server module importing a policy that imported policy.fast
    # would load the simulator's copy into the serving process.
    for entry in ("kvstore.server.app", "kvstore.cli"):
        reached = _reachable(entry)
        loaded = sorted(m for m in reached if _within(m, ["kvstore.policy.fast"]))
        if loaded:
            chain, module = [], loaded[0]
            while (edge := reached[module]) is not None:
                chain.append(str(edge))
                module = edge.importer
            raise AssertionError(f"{entry} loads {loaded[0]}:\n" + "\n".join(reversed(chain)))


# --- no cycles -----------------------------------------------------------------------------

def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first node repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


# The cycle checks read the imports that run (at import time or later, inside a
# function); an import under TYPE_CHECKING only names a type for mypy, and two
# modules may name each other's types.

def test_no_module_imports_itself_through_others() -> None:
    graph: dict[str, set[str]] = {}
    for e in kvstore_edges():
        if e.importer != e.imported and not e.type_only:
            graph.setdefault(e.importer, set()).add(e.imported)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


#: The part a module belongs to: its top-level subpackage, or the top-level
#: module itself. The native door serves the block format (it chooses between
#: kvstore.block.reference and the extension, and kvstore.block re-exports the
#: choice), so it counts as part of kvstore.block; the root package only
#: re-exports (lazily) and is left out.
def _part(module: str) -> str | None:
    if module == "kvstore":
        return None
    top = ".".join(module.split(".")[:2])
    return "kvstore.block" if top in ("kvstore._impl", "kvstore._native") else top


def test_no_part_imports_itself_through_others() -> None:
    graph: dict[str, set[str]] = {}
    for e in kvstore_edges():
        src, dst = _part(e.importer), _part(e.imported)
        if src and dst and src != dst and not e.type_only:
            graph.setdefault(src, set()).add(dst)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
