"""The guide cannot drift from the code: every event the long-running commands emit is
documented in the event schema, every public name is in the API reference, and every page the
navigation names exists. (``mkdocs build --strict`` in .ci/run checks links and API paths.)"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import dirtyring

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "src" / "dirtyring"
DOCS = ROOT / "docs"
#: Where the events of protect, standby, migrate and receive come from.
EVENT_SOURCES = ["replication/primary.py", "replication/standby.py", "replication/reprotect.py",
                 "migration/source.py", "migration/link.py", "cli/replication.py",
                 "cli/migration.py"]


def _emitted(path: Path) -> set[str]:
    """Event names: ``self._emit("name", ...)`` and dict literals ``{"event": "name", ...}``."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "_emit" and node.args):
            a = node.args[0]
            if isinstance(a, ast.Constant) and isinstance(a.value, str):
                names.add(a.value)
            elif isinstance(a, ast.IfExp):  # "a" if cond else "b"
                names |= {x.value for x in (a.body, a.orelse) if isinstance(x, ast.Constant)}
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if (isinstance(k, ast.Constant) and k.value == "event"
                        and isinstance(v, ast.Constant) and isinstance(v.value, str)):
                    names.add(v.value)
    return names


def test_every_emitted_event_is_in_the_schema() -> None:
    doc = (DOCS / "operations" / "events.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", doc))
    emitted = set().union(*(_emitted(PKG / p) for p in EVENT_SOURCES))
    assert len(emitted) > 30  # the walk found them
    missing = sorted(emitted - documented)
    assert not missing, f"events not in docs/operations/events.md: {missing}"


def test_every_public_name_is_in_the_api_reference() -> None:
    ref = "\n".join(p.read_text() for p in (DOCS / "reference").glob("*.md"))
    missing = [n for n in dirtyring.__all__ if not re.search(rf"\b{n}\b", ref)]
    assert not missing, f"not in docs/reference/: {missing}"


def test_every_page_in_the_navigation_exists() -> None:
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert nav and all((DOCS / p).is_file() for p in nav), nav
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == set(nav), f"pages outside the navigation: {sorted(pages - set(nav))}"
