"""Provenance on every MLflow run (issue 22): dvc.lock dependency hashes, data version, machine, versions, git commit
+ dirty flag; `predict` says which run and data version its model came from. Real DVC, real git, a real MLflow
SQLite store in a temporary project."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
import timm
import torch

from pipeline.cli import main as cli
from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean
from pipeline.data.split import split
from pipeline.provenance import dvc_deps
from pipeline.training.engine import TrainOutputs, train
from pipeline.training.evaluate import EvalOutputs, evaluate
from tests.conftest import run_cmd, train_run, write_tiny_params


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def _git_project(root: Path) -> None:
    _git(root, "init", "-q")
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "start")


def test_deps_hash_agrees_with_what_dvc_itself_recorded(tmp_path):
    """DVC writes dvc.lock; our hashes of the same files and folders agree until a dependency changes."""
    _git_project(tmp_path)
    (tmp_path / "code.py").write_text("print('v1')\n")
    (tmp_path / "data").mkdir()
    for i in range(3):
        (tmp_path / "data" / f"{i}.txt").write_text(f"row {i}\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: mkdir -p out && cp data/0.txt out/a.txt\n"
        "    deps: [code.py, data]\n    outs: [out]\n"
        "  use:\n    cmd: cat out/a.txt > used.txt\n    deps: [out, code.py]\n"
        "    outs: [used.txt]\n"
    )
    assert run_cmd(["dvc", "init", "-q"], tmp_path).returncode == 0
    done = run_cmd(["dvc", "repro", "-q"], tmp_path)
    assert done.returncode == 0, done.stderr
    for stage in ("make", "use"):  # a plain folder (data) and a stage's output folder (out)
        tags = dvc_deps(tmp_path, stage)
        assert tags["dvc_lock_current"] == "true" and tags["deps_md5"] == tags["dvc_lock_deps_md5"]
    (tmp_path / "data" / "1.txt").write_text("row 1, edited\n")
    tags = dvc_deps(tmp_path, "make")
    assert tags["dvc_lock_current"] == "false (1 changed: data)" and tags["deps_md5"] != tags["dvc_lock_deps_md5"]
    assert dvc_deps(tmp_path, "train@x")["deps_md5"] == "unknown (no train@x entry in dvc.lock yet)"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_emoji) -> dict:
    """A git project with a dvc.lock entry for train@cnn, trained and evaluated into its MLflow store."""
    root = tmp_path_factory.mktemp("prov")
    _git_project(root)
    params = load_params(write_tiny_params(root, tiny_emoji)).with_variant("cnn")
    acquire(params.acquire, root, root / "data/raw")
    clean(params.clean, root / "data/raw", root / "data/clean")
    split_file = root / "data/split/manifest.parquet"
    df, _ = split(manifest.read(root / "data/clean"), params.split, params.base.seed)
    manifest.write(df, split_file)
    md5 = hashlib.md5(split_file.read_bytes()).hexdigest()
    (root / "dvc.lock").write_text(
        f"schema: '2.0'\nstages:\n  train@cnn:\n    cmd: x\n    deps:\n"
        f"    - path: data/split/manifest.parquet\n      hash: md5\n      md5: {md5}\n"
    )
    model_dir = root / "models/cnn"
    train(
        params,
        split_file,
        root / "data/clean",
        TrainOutputs(model_dir, root / "m.json", root / "h.csv"),
        root,
        tags={"variant": "cnn"},
    )
    evaluate(
        params, split_file, root / "data/clean", model_dir, EvalOutputs.in_folder(root / "e.json", root / "ev"), root
    )
    run = train_run(root / "mlflow/mlflow.db", model_dir / "model.pt")
    return {"root": root, "run": run, "md5": md5, "model": model_dir / "model.pt", "data": tiny_emoji}


def test_train_run_carries_data_code_machine_and_git_provenance(trained):
    tags = trained["run"].data.tags
    assert tags["data_version"] == trained["md5"]  # the split manifest's md5, as DVC hashes it
    assert tags["dvc_stage"] == "train@cnn" and tags["dvc_lock_current"] == "true"
    assert tags["deps_md5"] == tags["dvc_lock_deps_md5"]
    assert tags["git_commit"] == _git(trained["root"], "rev-parse", "HEAD") and tags["git_dirty"] == "false"
    assert tags["torch"] == torch.__version__ and tags["timm"] == timm.__version__
    assert tags["cuda"] == (torch.version.cuda or "none (CPU build of torch)")
    assert tags["cpu"] and tags["gpu"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
    # evaluate adds its own, namespaced, to the train run
    assert tags["evaluate.dvc_stage"] == "evaluate@cnn" and tags["evaluate.data_version"] == trained["md5"]


def test_predict_prints_the_run_and_data_version_of_its_model(trained, capsys, monkeypatch):
    root = trained["root"]
    monkeypatch.chdir(root)
    image = next((trained["data"] / "images").rglob("*.png"))
    assert cli(["predict", str(image), "--model", str(trained["model"]), "--params", str(root / "params.yaml")]) == 0
    err = capsys.readouterr().err
    run_id = trained["run"].info.run_id
    assert f"from MLflow run {run_id}" in err and f"data version {trained['md5']}" in err
    assert (
        cli(["predict", str(image), "--model", f"runs:/{run_id}/model.pt", "--params", str(root / "params.yaml")]) == 0
    )
    assert f"from MLflow run {run_id}" in capsys.readouterr().err


def test_predict_says_when_no_run_is_known(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = next((trained["data"] / "images").rglob("*.png"))
    assert cli(["predict", str(image), "--model", str(trained["model"])]) == 0
    assert "no MLflow train run" in capsys.readouterr().err
    assert not (tmp_path / "mlflow").exists()  # looking does not create a store


def test_a_dirty_tree_is_flagged(trained):
    from pipeline.provenance import git_state

    root = trained["root"]
    (root / "tracked.txt").write_text("a\n")
    _git(root, "add", "tracked.txt")
    assert git_state(root)["git_dirty"] == "true"  # staged, not committed
    _git(root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "b")
    assert git_state(root)["git_dirty"] == "false"
