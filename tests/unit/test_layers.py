"""Imports only point down: bindings -> tracking -> machine -> linux (the process
personality) -> the products (replication, migration, snapshots) -> cli/bench.

``wire`` sits beside ``tracking`` and may use nothing of dirtyring but ``errors``, and never
sockets, clocks or threads; ``guests`` is data and tooling for the machine layer and imports
nothing above ``errors``. Among the products, only migration may use replication (a migration is
replication that ends with a switchover: same transport, a standby that never fails over by
itself); snapshots and replication use no other product.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "src" / "dirtyring"

PRODUCTS = ("replication", "migration", "snapshots")

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_bindings": {"errors"},
    "guests": {"errors"},
    "wire": {"errors"},
    "tracking": {"errors", "_bindings"},
    "machine": {"errors", "_bindings", "tracking", "guests"},
    "linux": {"errors", "_bindings", "tracking", "guests", "machine"},
    "replication": {"errors", "_bindings", "tracking", "guests", "machine", "linux", "wire"},
    "migration": {"errors", "_bindings", "tracking", "guests", "machine", "linux", "wire",
                  "replication"},
    "snapshots": {"errors", "_bindings", "tracking", "guests", "machine", "linux", "wire"},
    "bench": {"errors", "_bindings", "tracking", "guests", "machine", "linux", "wire", *PRODUCTS,
              "cli"},
    "cli": {"errors", "_bindings", "tracking", "guests", "machine", "linux", "wire", *PRODUCTS,
            "bench"},
}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Top-level dirtyring subpackages a module imports (absolute or relative)."""
    tree = ast.parse(path.read_text())
    depth_pkg = path.relative_to(PKG).parts[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(depth_pkg[:len(depth_pkg) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from .. import x" at the package root
                    parts = [a.name for a in node.names]
                out.add(parts[0])
            elif node.module and node.module.startswith("dirtyring."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("dirtyring."):
                    out.add(a.name.split(".")[1])
    return out


MODULES = sorted(p for p in PKG.rglob("*.py") if p.name != "__init__.py" or p.parent != PKG)


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PKG)) for p in MODULES])
def test_imports_point_down(path: Path) -> None:
    pkg = _package_of(path)
    if pkg not in ALLOWED:
        pytest.fail(f"{path.relative_to(PKG)} is in no known layer")
    bad = {m for m in _imports(path) if m != pkg and m not in ALLOWED[pkg]}
    assert not bad, f"{path.relative_to(PKG)} ({pkg}) imports {sorted(bad)}"


#: What the wire layer must never touch: it is sans-IO.
IO_MODULES = {"socket", "select", "selectors", "threading", "time", "asyncio", "subprocess"}


@pytest.mark.parametrize("path", sorted((PKG / "wire").glob("*.py")), ids=lambda p: p.name)
def test_wire_is_sans_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            used |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            used.add(node.module.split(".")[0])
    assert not used & IO_MODULES, f"wire/{path.name} imports {sorted(used & IO_MODULES)}"


def test_the_products_have_their_own_packages() -> None:
    assert not (PKG / "products").exists()
    for name in PRODUCTS:
        assert (PKG / name / "__init__.py").is_file(), name
