"""DVC sees every code change: each stage's deps cover every repository module its script imports (seeds issue)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from pipeline.stage_deps import code_closure, missing_deps, write_deps
from tests.conftest import REPO


def test_every_stage_lists_every_module_it_runs():
    """Fails when a stage imports (at any depth, inside functions too) a module its dvc.yaml deps omit."""
    assert missing_deps(REPO, REPO / "dvc.yaml") == {}


def test_data_stages_do_not_run_the_training_params():
    """A recipe or training default (pipeline/config.py) cannot change acquire..split outputs: they import only
    pipeline/data_config.py, so DVC does not re-run them when config.py changes."""
    for script in ("acquire", "faces", "clean", "split"):
        files = {p.relative_to(REPO).as_posix() for p in code_closure(REPO, REPO / f"stages/{script}.py")}
        assert "pipeline/data_config.py" in files and "pipeline/config.py" not in files, script
    train = {p.relative_to(REPO).as_posix() for p in code_closure(REPO, REPO / "stages/train.py")}
    assert {"pipeline/config.py", "pipeline/seeds.py", "pipeline/training/engine.py"} <= train


def _project(tmp_path: Path) -> Path:
    """stages/s.py imports pkg.a inside a function; pkg/a.py imports pkg.sub.b relatively; pkg/c.py is unused."""
    files = {
        "pipeline/__init__.py": "",
        "pipeline/a.py": "from .sub import b\n",
        "pipeline/sub/__init__.py": "X = 1\n",
        "pipeline/sub/b.py": "import json\n",
        "pipeline/sub/tables/t.csv": "a,b\n",
        "pipeline/c.py": "",
        "stages/s.py": "import sys\n\ndef main():\n    from pipeline import a\n",
        "dvc.yaml": textwrap.dedent("""\
            stages:
              s:
                cmd: python stages/s.py --out o
                deps:
                  - data/in  # the input data
                  - stages/s.py
                  - pipeline/c.py
                outs:
                  - o
            """),
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def test_closure_follows_function_level_and_relative_imports(tmp_path):
    root = _project(tmp_path)
    found = {p.relative_to(root).as_posix() for p in code_closure(root, root / "stages/s.py")}
    assert found == {
        "stages/s.py",
        "pipeline/__init__.py",
        "pipeline/a.py",
        "pipeline/sub/__init__.py",
        "pipeline/sub/b.py",
    }


def test_check_names_the_missing_modules_and_write_fixes_them(tmp_path):
    root = _project(tmp_path)
    assert missing_deps(root, root / "dvc.yaml") == {
        "s": [
            "pipeline/__init__.py",
            "pipeline/a.py",
            "pipeline/sub/__init__.py",
            "pipeline/sub/b.py",
            "pipeline/sub/tables",
        ]
    }
    check = subprocess.run(
        [sys.executable, "-m", "pipeline", "stage-deps", "--check", "--dvc-yaml", str(root / "dvc.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1 and "s: runs 5 module(s) not in its deps" in check.stderr

    assert write_deps(root, root / "dvc.yaml") == ["s"]
    text = (root / "dvc.yaml").read_text()
    deps = yaml.safe_load(text)["stages"]["s"]["deps"]
    # the unused module is dropped, the data dep and its comment stay, the package data folder is listed
    assert deps == [
        "data/in",
        "pipeline/__init__.py",
        "pipeline/a.py",
        "pipeline/sub/__init__.py",
        "pipeline/sub/b.py",
        "pipeline/sub/tables",
        "stages/s.py",
    ]
    assert "# the input data" in text
    assert missing_deps(root, root / "dvc.yaml") == {} and write_deps(root, root / "dvc.yaml") == []


def test_the_data_stages_know_every_training_section():
    """load_data_params skips exactly the sections pipeline/config.py adds: a new one must be listed there too, or
    the data stages would call it misspelt."""
    from pipeline.config import Params
    from pipeline.data_config import TRAINING_SECTIONS, DataParams

    assert set(Params.model_fields) == set(DataParams.model_fields) | set(TRAINING_SECTIONS)
