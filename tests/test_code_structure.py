"""Rules of the code base that a test keeps: no private name is imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _private_imports(tree: ast.AST) -> list[tuple[int, str]]:
    return [(node.lineno, f"{node.module}.{alias.name}") for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("segkit", "segkit_plugins")
            for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]


def test_no_private_name_is_imported_from_another_module():
    files = [p for folder in ("segkit", "plugins") for p in (ROOT / folder).rglob("*.py")]
    found = [f"{p.relative_to(ROOT)}:{line}: {name}" for p in files
             for line, name in _private_imports(ast.parse(p.read_text()))]
    assert not found, "make these public where they are an API, or move them:\n" + "\n".join(found)
    planted = ast.parse("from segkit.data.coco import read_coco, _helper\nfrom os import _exit")
    assert _private_imports(planted) == [(1, "segkit.data.coco._helper")]  # the check sees one
