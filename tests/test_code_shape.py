"""House rule: every function in the library fits on a screen (under 60 lines, its signature and docstring included,
as `ruff format` lays it out)."""

from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "pipeline"
MAX_LINES = 59


def function_lengths(folder: Path) -> list[tuple[int, str]]:
    """(lines, 'file:line name') of every function and method under folder, longest first."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(folder.parent)}:{node.lineno} {node.name}"
                found.append((node.end_lineno - node.lineno + 1, where))
    return sorted(found, reverse=True)


def test_no_library_function_reaches_60_lines() -> None:
    too_long = [f"{where} ({n} lines)" for n, where in function_lengths(LIBRARY) if n > MAX_LINES]
    assert not too_long, "split these functions: " + "; ".join(too_long)


def test_the_measure_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(70))
    (tmp_path / "long.py").write_text(f"def long():\n{body}\n\n\ndef short():\n    return 1\n")
    lengths = function_lengths(tmp_path)
    assert [n for n, _ in lengths] == [71, 2] and lengths[0][1].endswith("long.py:1 long")
