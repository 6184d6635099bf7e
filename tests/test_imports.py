"""Imports point down (issue 19): every module of pipeline/ sits on a layer and imports only lower layers; no two
subpackages import each other; no private name (`_x`) is imported across packages, by the library or the tests."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from tests.conftest import REPO

PIPELINE = REPO / "pipeline"

# Lowest first. A unit is a top-level module (`runtime`) or a subpackage (`data`); a new one must be placed here.
LAYERS = [
    {"io", "progress", "runtime", "numerics", "fonts", "search_space", "outdir", "methods"},  # no params; the registry
    {"data_config", "provenance", "dvcparams"},  # the base and data params, what a run was made from
    {"config", "tracking", "stage_runner"},  # all params; MLflow; the stages' entry plumbing
    {"seeds", "data", "models"},  # data stages and datasets; models by name
    {"inference", "pretrain"},  # predicting, exporting and explaining a checkpoint; the distilled ViT
    {"training"},  # train, evaluate, bench
    {"tuning", "report"},  # sweeps over the trainer; the report over every stage's outputs
    {"verify", "stage_deps", "gpu_check"},  # commands over the whole pipeline
    {"cli", "__init__"},  # the commands of `python -m pipeline`
    {"__main__"},
]
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(path: Path) -> str:
    return path.relative_to(PIPELINE).parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every absolute import in the file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, [a.name for a in node.names]))
    return found


def _targets(module: str, names: list[str]) -> list[str]:
    """The pipeline units an import reaches: `from pipeline import tracking` reaches `tracking`."""
    bits = module.split(".")
    if bits[0] != "pipeline":
        return []
    if len(bits) > 1:
        return [bits[1]]
    return [n for n in names if (PIPELINE / f"{n}.py").is_file() or (PIPELINE / n).is_dir()]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PIPELINE.rglob("*.py"):
        unit = _unit(path)
        for module, names in _imports(path):
            edges[unit] |= {t for t in _targets(module, names) if t != unit}
    return edges


def test_every_module_has_a_layer():
    units = {_unit(p) for p in PIPELINE.rglob("*.py")}
    assert sorted(units - set(LAYER)) == [], "place the new module in tests/test_imports.py LAYERS"


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{a} (layer {LAYER[a]}) imports {b} (layer {LAYER[b]})"
        for a, targets in _edges().items()
        for b in targets
        if LAYER[b] >= LAYER[a]
    )
    assert upward == []


def test_no_two_subpackages_import_each_other():
    edges = _edges()
    loops = sorted((a, b) for a in edges for b in edges[a] if a < b and a in edges.get(b, set()))
    assert loops == [], f"package import loops: {loops}"


def test_no_private_name_is_imported_across_packages():
    """`from pipeline.x.y import _helper` couples the importer to an implementation detail: make it public."""
    found = []
    for path in [*PIPELINE.rglob("*.py"), *(REPO / "tests").rglob("*.py"), *(REPO / "stages").rglob("*.py")]:
        here = path.relative_to(REPO).parent.as_posix().replace("/", ".")
        for module, names in _imports(path):
            package = module.rsplit(".", 1)[0]
            if module.startswith("pipeline") and package != here:
                found += [
                    f"{path.relative_to(REPO)}: {module}.{n}"
                    for n in names
                    if n.startswith("_") and not n.startswith("__")
                ]
    assert found == []
