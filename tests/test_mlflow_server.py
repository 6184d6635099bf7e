"""Issue 14: a team's MLflow tracking server instead of the project's SQLite file.

A real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts served by the server from its own folder, a free port)
receives everything the stages log when MLFLOW_TRACKING_URI points at it: train, evaluate, report, a 2-trial sweep,
and `predict --model runs:/...` reads a checkpoint back from it. Nothing MLflow-related is written into the project.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean
from pipeline.data.split import split
from pipeline.io import md5_file
from tests.conftest import BIN, REPO, make_tiny_emoji, write_tiny_params

pytestmark = pytest.mark.slow  # about 1.5 minutes: a server and five stage processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` in its own session (one worker, no job runner: it answers in seconds), stopped through
    its process group so that no gunicorn/uvicorn child outlives the test."""
    home = tmp_path / "server"
    home.mkdir()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{home / 'mlflow.db'}",
            "--artifacts-destination",
            str(home / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=home,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "mlflow server did not answer: " + (home / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url, home
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _project(root: Path) -> Path:
    """acquire -> clean -> split on 6 emoji classes; one variant, a 2-trial sweep of 1 epoch."""
    data = make_tiny_emoji(root.parent / "emoji", n_classes=6)
    params_file = write_tiny_params(root, data)
    raw = yaml.safe_load(params_file.read_text())
    raw["variants"] = {"cnn": {}}
    raw["base"]["seeds"] = [42]
    raw["tune"].update(
        {"space": {"lr": ["grid", 1e-3, 3e-3]}, "num_samples": 1, "epochs": 1, "max_failures": 0, "scheduler": "fifo"}
    )
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(params_file)
    acquire(params.acquire, root, root / "data/raw")
    _, _, counts = clean(params.clean, root / "data/raw", root / "data/clean")
    df, split_counts = split(manifest.read(root / "data/clean"), params.split, params.base.seed)
    manifest.write(df, root / "data/split/manifest.parquet")
    (root / "metrics").mkdir()
    (root / "metrics/clean.json").write_text(json.dumps(counts))
    (root / "metrics/split.json").write_text(json.dumps(split_counts))
    return params_file


def _stage(root: Path, env: dict, script: str, *args: str) -> str:
    common = ["--params", str(root / "params.yaml"), "--split", "data/split/manifest.parquet", "--images", "data/clean"]
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / script), *common, *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{script}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _files(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _files(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_every_stage_logs_to_a_tracking_server_and_nothing_to_the_project(tmp_path, mlflow_server):
    url, server_home = mlflow_server
    root = tmp_path / "project"
    root.mkdir()
    _project(root)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(
        MLFLOW_TRACKING_URI=url,
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )

    _stage(
        root,
        env,
        "train.py",
        "--variant",
        "cnn",
        "--out",
        "models/cnn",
        "--metrics",
        "metrics/train/cnn.json",
        "--seed-metrics",
        "metrics/train/cnn",
        "--history",
        "plots/history/cnn",
        "--tuned",
        "best_params.yaml",
    )
    _stage(
        root,
        env,
        "evaluate.py",
        "--model",
        "models/cnn",
        "--metrics",
        "metrics/evaluate/cnn.json",
        "--seed-metrics",
        "metrics/evaluate/cnn",
        "--predictions",
        "plots/predictions/cnn",
        "--per-class",
        "plots/per_class/cnn",
        "--confused-pairs",
        "plots/confused_pairs/cnn",
        "--samples",
        "plots/samples/cnn",
    )
    _stage(
        root,
        env,
        "report.py",
        "--models",
        "models",
        "--metrics-dir",
        "metrics",
        "--plots",
        "plots",
        "--out",
        "reports",
        "--environment",
        "metrics/environment.json",
    )
    _stage(root, env, "tune.py", "--best", "best_params.yaml", "--metrics", "metrics/tune.json")

    client = MlflowClient(url)
    exp = client.get_experiment_by_name("anime-fgvc")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")  # served by the server

    # train + evaluate: one run with per-epoch and test metrics and their artifacts
    md5 = md5_file(root / "models/cnn/seed42/model.pt")
    runs = client.search_runs([exp.experiment_id], f"tags.model_md5 = '{md5}'")
    assert len(runs) == 1  # found as evaluate and report find it: by the checkpoint's md5
    run_id = runs[0].info.run_id
    run = client.get_run(run_id)
    assert run.info.experiment_id == exp.experiment_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_top1")] == [1, 2]
    test = json.loads((root / "metrics/evaluate/cnn/seed42.json").read_text())
    assert run.data.metrics["test_top1"] == pytest.approx(test["test_top1"])
    assert {
        "config.yaml",
        "model.pt",
        "train_history.csv",
        "train_metrics.json",
        "test_metrics.json",
        "per_class.csv",
        "confused_pairs.csv",
    } <= _files(client, run_id)

    # report: its run, headline metrics, the whole report folder
    reports = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'report'"
    )
    assert len(reports) == 1
    report = reports[0]
    assert report.data.tags["run.cnn"] == run_id
    assert report.data.metrics["cnn.test_top1"] == pytest.approx(test["test_top1"])
    assert {"report/report.md", "report/report.html"} <= _files(client, report.info.run_id)

    # sweep: the parent and both trials, each trial with its epoch metric and checkpoint
    parents = client.search_runs([exp.experiment_id], "tags.tune_role = 'parent'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert "best_params.yaml" in _files(client, parents[0].info.run_id)
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert {t.data.params["train.lr"] for t in trials} == {"0.001", "0.003"}
    for t in trials:
        assert [m.step for m in client.get_metric_history(t.info.run_id, "val_top1")] == [1]
        assert "model.pt" in _files(client, t.info.run_id)

    # the artifacts are files in the server's folder, uploaded over HTTP
    assert len(list((server_home / "artifacts").rglob("model.pt"))) == 3

    # predict reads a checkpoint back from the server
    img = next((root / "data/clean").rglob("*.png"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "predict",
            str(img),
            "--model",
            f"runs:/{run_id}/model.pt",
            "--params",
            str(root / "params.yaml"),
            "--json",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout.splitlines()[0])["top_k"]) >= 1

    # nothing MLflow-related in the project: no store, no local artifacts
    assert not (root / "mlflow").exists() and not (root / "mlruns").exists() and not (root / "mlartifacts").exists()
    assert not [p for p in root.rglob("*") if p.suffix == ".db" or p.name in ("mlruns", "mlartifacts")]
    assert not (tmp_path / "mlflow").exists()
