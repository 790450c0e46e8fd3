"""dirtyring.wire stays sans-IO: stdlib + numpy + dirtyring.errors, and no I/O or clock modules."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import dirtyring.wire

WIRE_DIR = Path(dirtyring.wire.__file__).resolve().parent
MODULES = sorted(WIRE_DIR.glob("*.py"))
FORBIDDEN = {"socket", "select", "selectors", "threading", "time", "asyncio", "multiprocessing",
             "subprocess", "ssl"}


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_all_modules_found() -> None:
    assert {p.stem for p in MODULES} >= {"__init__", "events", "codec", "pagecodec",
                                         "receivebuffer", "states", "connection"}


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_imports_only_stdlib_numpy_and_errors(path: Path) -> None:
    for name in imported(path):
        top = name.split(".")[0]
        assert top not in FORBIDDEN, f"{path.name} imports {name}"
        if top == "dirtyring":
            assert name == "dirtyring.errors", f"{path.name} imports {name}"
        else:
            assert top in sys.stdlib_module_names or top == "numpy", f"{path.name} imports {name}"


@pytest.mark.parametrize("path", MODULES, ids=[p.name for p in MODULES])
def test_future_annotations_and_size(path: Path) -> None:
    text = path.read_text()
    assert "from __future__ import annotations" in text
    assert text.count("\n") <= 400, f"{path.name} is over 400 lines"


def test_public_api_is_exported() -> None:
    for name in dirtyring.wire.__all__:
        assert hasattr(dirtyring.wire, name), name
