"""Imports point down: no two subpackages of pipeline/ import each other (issue 19)."""

from __future__ import annotations

import ast
from collections import defaultdict

from tests.conftest import REPO


def _subpackage_edges() -> dict[str, set[str]]:
    """pipeline.<sub> -> the other pipeline.<sub> packages its modules import (function-level imports included)."""
    subs = {p.name for p in (REPO / "pipeline").iterdir() if (p / "__init__.py").is_file()}
    edges: dict[str, set[str]] = defaultdict(set)
    for path in (REPO / "pipeline").rglob("*.py"):
        parts = path.relative_to(REPO / "pipeline").parts
        if len(parts) < 2 or parts[0] not in subs:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [])
            for name in names:
                bits = name.split(".")
                if bits[0] == "pipeline" and len(bits) > 1 and bits[1] in subs and bits[1] != parts[0]:
                    edges[parts[0]].add(bits[1])
    return edges


def test_no_two_subpackages_import_each_other():
    edges = _subpackage_edges()
    loops = sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))
    assert loops == [], f"package import loops: {loops}"
