"""The repository code each DVC stage runs, from a static import walk, held against dvc.yaml's deps.

DVC re-runs a stage only when one of its listed deps changes, so a module the stage imports but does not list (a
recipe in config.py, a helper in io.py) can change the results while `dvc repro` says "up to date". This module
follows every `import` of a stage's script through the repository's own packages, imports inside functions included
(the stages import torch-heavy code lazily), and adds each package's `__init__.py` (Python runs it on the way in).

    python -m pipeline stage-deps            # the derived code deps of every stage
    python -m pipeline stage-deps --check    # exit 1 naming each module a stage runs but dvc.yaml omits
    python -m pipeline stage-deps --write    # rewrite dvc.yaml's code deps to the derived lists (comments kept)

Managed: Python files and folders under pipeline/ (packages, and the data folders inside them such as the papers'
tables). Everything else (tools/*.sh, weights, data) stays as listed.
A dynamic import (importlib) is invisible to the walk; pipeline/cli.py is the only user and no stage runs it.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("pipeline",)  # the repository's importable packages (stages/ are scripts, never imported)
_SCRIPT = re.compile(r"\bpython3?\s+(?:-m\s+([\w.]+)|(\S+\.py))")


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml as written (a foreach/matrix stage once, with its template body)."""

    name: str
    cmd: str
    deps: tuple[str, ...]


def module_file(root: Path, name: str) -> Path | None:
    """`pipeline.data.split` -> pipeline/data/split.py (or .../split/__init__.py); None outside the repository."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement anywhere in the tree may load (`from a import b`: a.b and a)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _package_inits(root: Path, path: Path) -> list[Path]:
    """The __init__.py of every package above a module: importing pipeline.data.x runs pipeline/__init__.py too."""
    out, folder = [], path.parent
    while folder != root and (folder / "__init__.py").is_file():
        out.append(folder / "__init__.py")
        folder = folder.parent
    return out


def code_closure(root: Path, script: Path) -> set[Path]:
    """The script and every repository module it imports, transitively, with their packages' __init__.py files."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for name in _imported_names(tree, package):
            found = module_file(root, name)
            if found is not None:
                todo.append(found)
                todo.extend(_package_inits(root, found))
    return seen


def stage_script(root: Path, cmd: str) -> Path | None:
    """The Python file a stage's command runs (`python stages/x.py ...` or `python -m pkg`), if any."""
    match = _SCRIPT.search(" ".join(cmd) if isinstance(cmd, list) else cmd)
    if match is None:
        return None
    if match.group(1):
        return module_file(root, f"{match.group(1)}.__main__") or module_file(root, match.group(1))
    return root / match.group(2)


def read_stages(dvc_yaml: Path) -> list[Stage]:
    import yaml

    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = []
    for name, body in stages.items():
        body = body.get("do", body)  # foreach: the template; matrix: the body itself
        deps = tuple(next(iter(d)) if isinstance(d, dict) else str(d) for d in body.get("deps", []))
        out.append(Stage(name, body.get("cmd", ""), deps))
    return out


def derived_deps(root: Path, stage: Stage) -> list[str]:
    """The stage's code deps from its script's import closure, as sorted repository-relative paths."""
    script = stage_script(root, stage.cmd)
    if script is None or not script.is_file():
        return []
    code = code_closure(root, script)
    return sorted(p.relative_to(root).as_posix() for p in code | _package_data(code))


def _package_data(code: set[Path]) -> set[Path]:
    """Data folders inside the packages the code comes from (pipeline/report/papers: the tables the report reads)."""
    folders = {p.parent for p in code if p.name == "__init__.py"}
    return {
        sub
        for folder in folders
        for sub in folder.iterdir()
        if sub.is_dir() and not (sub / "__init__.py").exists() and sub.name != "__pycache__"
    }


def _covers(dep: str, path: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def missing_deps(root: Path, dvc_yaml: Path) -> dict[str, list[str]]:
    """stage -> the modules it runs that none of its deps (a file or a folder above it) covers."""
    out = {}
    for stage in read_stages(dvc_yaml):
        lost = [p for p in derived_deps(root, stage) if not any(_covers(d, p) for d in stage.deps)]
        if lost:
            out[stage.name] = lost
    return out


def _managed(root: Path, dep: str) -> bool:
    """A dep this module owns: a Python file of the repository's code, or a package folder (all code)."""
    if not dep.startswith((*(f"{p}/" for p in PACKAGES), "stages/")):
        return False
    path = root / dep
    return dep.endswith(".py") or path.is_dir()  # a package, or a data folder inside one


def write_deps(root: Path, dvc_yaml: Path) -> list[str]:
    """Replace each stage's code deps by the derived ones, in place, keeping the other deps and the comments."""
    from ruamel.yaml import YAML

    yml = YAML()
    yml.preserve_quotes = True
    yml.width = 120
    yml.indent(mapping=2, sequence=4, offset=2)  # the file's "  - item" style
    doc = yml.load(dvc_yaml.read_text(encoding="utf-8"))
    changed = []
    for stage in read_stages(dvc_yaml):
        body = doc["stages"][stage.name]
        body = body.get("do", body)
        derived = derived_deps(root, stage)
        if not derived:
            continue
        if "deps" not in body:  # a stage with params only (check_params): its code becomes its first deps
            body.insert(list(body).index("cmd") + 1, "deps", [])
        deps = body["deps"]
        keys = [next(iter(d)) if isinstance(d, dict) else str(d) for d in deps]
        first = next((i for i, k in enumerate(keys) if _managed(root, k)), 0)
        kept = [(k, d) for k, d in zip(keys, deps) if not _managed(root, k)]
        if [k for k in keys if _managed(root, k)] == derived:
            continue
        new = [d for k, d in kept[:first]] + derived + [d for k, d in kept[first:]]
        notes = {keys[i]: c for i, c in deps.ca.items.items()}  # end-of-line comments, by entry
        deps.clear()
        deps.ca.items.clear()
        deps.extend(new)
        for i, d in enumerate(new):
            key = next(iter(d)) if isinstance(d, dict) else str(d)
            if key in notes:
                deps.ca.items[i] = notes[key]
        changed.append(stage.name)
    if changed:
        tmp = dvc_yaml.with_suffix(".yaml.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            yml.dump(doc, fh)
        tmp.replace(dvc_yaml)
    return changed


def add_stage_deps_parser(sub) -> None:
    p = sub.add_parser("stage-deps", help="each DVC stage's code deps from its import graph, against dvc.yaml")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 if a stage runs a module dvc.yaml omits")
    mode.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps to the derived lists")
    p.add_argument("--dvc-yaml", default="dvc.yaml")
    p.set_defaults(fn=_main)


def _main(args: argparse.Namespace) -> int:
    dvc_yaml = Path(args.dvc_yaml).resolve()
    root = dvc_yaml.parent
    if args.write:
        changed = write_deps(root, dvc_yaml)
        print(f"{args.dvc_yaml}: code deps rewritten for {', '.join(changed) or 'no stage (all up to date)'}")
        return 0
    if args.check:
        missing = missing_deps(root, dvc_yaml)
        for stage, paths in missing.items():
            print(f"{stage}: runs {len(paths)} module(s) not in its deps: {', '.join(paths)}", file=sys.stderr)
        if missing:
            print("fix: python -m pipeline stage-deps --write", file=sys.stderr)
        return 1 if missing else 0
    for stage in read_stages(dvc_yaml):
        print(f"{stage.name}:", *(f"  - {p}" for p in derived_deps(root, stage)), sep="\n")
    return 0
