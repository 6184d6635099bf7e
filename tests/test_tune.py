"""Issue 7: hyperparameter sweeps with Ray Tune (the `tune` stage) on a tiny subset of the embedded data.

- params: tune.space is validated against the train section, errors name the exact key;
- a 2-trial sweep on a Ray head started with `ray start --head` (own ports, RAY_ADDRESS), one trial failing;
- a sweep SIGKILLed mid-way resumes without re-running its finished trials;
- the train stage trains with best_params.yaml when tune.apply is on.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
import yaml
from mlflow import MlflowClient

from pipeline.config import ParamsError, load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from tests.conftest import BIN, REPO, make_tiny_emoji, train_run, write_tiny_params

STYLE_SPLIT = {"noto": "train", "openmoji": "train", "emojione": "val", "twemoji": "test"}
SWEEP = {"epochs": 2, "num_samples": 1, "max_failures": 0}  # tiny and quick; failures are deterministic here


def _env() -> dict:
    """For stage processes: the project's own MLflow store (not one an in-process test exported), no cluster."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _project(root: Path, tune: dict) -> Path:
    """A project folder: 6 emoji classes acquired, split by artist, params with the given tune settings."""
    data = make_tiny_emoji(root / "emoji", n_classes=6)
    params_file = write_tiny_params(root, data)
    raw = yaml.safe_load(params_file.read_text())
    raw["tune"].update({**SWEEP, **tune})
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    df = acquire(load_params(params_file).acquire, root, root / "data/raw")
    manifest.write(
        df.with_columns(pl.col("group").replace_strict(STYLE_SPLIT).alias("split")),
        root / "data/split/manifest.parquet",
    )
    return params_file


def _mlflow(root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow/mlflow.db'}")
    return client, client.get_experiment_by_name("anime-fgvc").experiment_id


def _sweep_runs(root: Path) -> tuple[object, list]:
    """(the sweep's parent run, its trial runs)."""
    client, exp = _mlflow(root)
    parents = client.search_runs([exp], "tags.tune_role = 'parent'")
    assert len(parents) == 1
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], children


# ------------------------------------------------------------------------------------------------------------ params


def _params_file(tmp_path: Path, tune: dict) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["acquire"]["embedded"]["path"] = str(REPO / "datasets/emoji")
    raw["tune"].update(tune)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


BAD_TUNE = [  # (id, tune changes, key named in the message, fragment of the reason)
    ("unknown_key", {"space": {"lrr": ["choice", 0.1]}}, "tune.space.lrr", "train.lrr is not a key of the train"),
    ("section_prefix", {"space": {"train.lr": ["choice", 0.1]}}, "tune.space.train.lr", "write 'lr'"),
    ("budget_key", {"space": {"epochs": ["choice", 1, 2]}}, "tune.space.epochs", "cannot be searched"),
    ("distribution", {"space": {"lr": ["normal", 0.0, 1.0]}}, "tune.space.lr", "unknown distribution 'normal'"),
    ("log_low", {"space": {"lr": ["loguniform", 0.0, 0.1]}}, "tune.space.lr", "low must be > 0"),
    ("mapping_form", {"space": {"lr": {"loguniform": [1e-4, 1e-1]}}}, "tune.space.lr", "must be a list"),
    (
        "value_vs_train",
        {"space": {"label_smoothing": ["choice", 0.0, 1.5]}},
        "tune.space.label_smoothing",
        "1.5 gives an invalid train.label_smoothing",
    ),
    ("mode", {"metric": "val_loss", "mode": "max"}, "tune.mode", "losses: min"),
    ("grace", {"epochs": 2, "grace_period": 3}, "tune.grace_period", "above tune.epochs=2"),
    ("resources", {"resources": {"cpu": 0, "gpu": 0}}, "tune.resources.cpu", "greater than 0"),
]


@pytest.mark.parametrize("case_id,tune,key,reason", BAD_TUNE, ids=[b[0] for b in BAD_TUNE])
def test_bad_tune_params_name_the_key(tmp_path, case_id, tune, key, reason):
    with pytest.raises(ParamsError) as info:
        load_params(_params_file(tmp_path, tune))
    lines = [ln for ln in str(info.value).splitlines() if ln.strip().startswith(f"- {key}: ")]
    assert lines and reason in lines[0], str(info.value)


def test_missing_search_package_is_named(tmp_path):
    import importlib.util

    missing = [name for name in ("optuna", "hyperopt") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("both optional search packages are installed")
    with pytest.raises(ParamsError, match=rf"- tune.search: .*needs the {missing[0]} package"):
        load_params(_params_file(tmp_path, {"search": missing[0]}))


def test_valid_space_and_repo_defaults(tmp_path):
    p = load_params(
        _params_file(
            tmp_path,
            {
                "space": {
                    "img_size": ["grid", 32, 64],
                    "lr": ["uniform", 1e-3, 2e-3],
                    "optimizer": ["choice", "adamw", "sgd"],
                }
            },
        )
    )
    assert p.tune.space["img_size"] == ["grid", 32, 64]
    repo = load_params(REPO / "params.yaml").tune
    assert repo.scheduler == "asha" and repo.num_samples >= 4 and repo.grace_period == 1
    assert not repo.apply


# ----------------------------------------------------------------------------------------------- sweep on a cluster


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with its own ports and temp dir (parallel test processes never share one).

    `ray stop` is not used: it stops every Ray on the machine. The head runs with --block in its own session and is
    stopped through its process group, always."""
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets live below it
    # Ray >= 2.59 checks a token on `ray start` clusters; this one gets its own, passed to the driver too.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    gcs, node, objects, dashboard, agent, agent_grpc, metrics, runtime_env = _free_ports(8)
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            f"--node-manager-port={node}",
            f"--object-manager-port={objects}",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={runtime_env}",
            "--min-worker-port=0",
            "--max-worker-port=0",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**_env(), **auth},
        start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while "Ray runtime started" not in (temp / "head.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (temp / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"RAY_ADDRESS": f"127.0.0.1:{gcs}", **auth}, temp
    finally:
        _stop_group(proc)
        log.close()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the leader (`ray start --block` drains and stops its Ray processes; SIGTERM to all of them at once
    would leave it waiting 30 s for a GCS that is gone), then SIGKILL whatever is left of its process group."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_sweep_on_a_ray_head_records_every_trial_and_survives_a_failing_one(tmp_path, ray_head):
    """RAY_ADDRESS -> the stage's trials run on the head; one of the 2 trials raises (missing weights file): it is
    recorded as failed (Ray and MLflow) and the sweep still returns the other configuration as the best."""
    from pipeline.tuning.sweep import sweep_name

    cluster_env, temp = ray_head
    params_file = _project(tmp_path, {"space": {"weights": ["grid", "package:efficientnet_lite0", "file:missing.pth"]}})
    done = subprocess.run(
        _stage_cmd(tmp_path), cwd=tmp_path, env={**_env(), **cluster_env}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Connecting to existing Ray cluster" in done.stderr
    summary = json.loads((tmp_path / "metrics/tune.json").read_text())
    assert summary["trials"] == 2 and summary["failed"] == 1 and summary["completed"] == 1
    best = yaml.safe_load((tmp_path / "best_params.yaml").read_text())
    assert best == {"train": {"weights": "package:efficientnet_lite0"}}
    assert summary["best_epoch"] in (1, 2)

    # The trials ran on the head started above: their output is in its session logs, not in a private Ray.
    worker_logs = "".join(p.read_text(errors="replace") for p in temp.glob("session_*/logs/worker-*.out"))
    assert "epoch 2/2" in worker_logs

    parent, children = _sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["tune_sweep"] == sweep_name(
        load_params(params_file), tmp_path / "data/split/manifest.parquet"
    )
    assert parent.data.tags["best.train.weights"] == "package:efficientnet_lite0"
    by_weights = {r.data.params["train.weights"]: r for r in children}
    assert set(by_weights) == {"package:efficientnet_lite0", "file:missing.pth"}
    ok, failed = by_weights["package:efficientnet_lite0"], by_weights["file:missing.pth"]
    assert ok.info.status == "FINISHED" and ok.data.tags["tune_outcome"] == "completed"
    client, _ = _mlflow(tmp_path)
    assert [m.step for m in client.get_metric_history(ok.info.run_id, "val_top1")] == [1, 2]
    assert ok.data.params["train.epochs"] == "2"  # the sweep's budget, not train.epochs
    assert failed.info.status == "FAILED" and failed.data.tags["tune_outcome"] == "failed"
    assert "missing.pth" in failed.data.tags["tune_error"]
    # every trial wrote into its own folder, never into the stage outputs
    assert not (tmp_path / "models").exists()
    assert len(list((tmp_path / ".ray_results").glob("sweep-*/trials/*/model/config.yaml"))) == 1


# ----------------------------------------------------------------------------------------------- killed and resumed


def _stage_cmd(root: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "stages/tune.py"),
        "--params",
        str(root / "params.yaml"),
        "--split",
        str(root / "data/split/manifest.parquet"),
        "--images",
        str(root / "data/raw"),
        "--best",
        str(root / "best_params.yaml"),
        "--metrics",
        str(root / "metrics/tune.json"),
    ]


def _trial_states(root: Path) -> dict[str, str]:
    """trial id -> status, as Ray's experiment state on disk records it."""
    states = sorted(root.glob(".ray_results/sweep-*/experiment_state-*.json"))
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except ValueError:  # caught mid-write
        return {}
    out = {}
    for trial_json, _ in data["trial_data"]:
        trial = json.loads(trial_json)
        out[trial["trial_id"]] = trial["status"]
    return out


def test_sigkilled_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    """2 trials one after the other; SIGKILL the stage once the first has finished, run it again: the finished
    trial keeps its single MLflow run and its results, the other one is trained, the sweep completes."""
    _project(tmp_path, {"space": {"lr": ["grid", 1e-3, 3e-3]}, "max_concurrent": 1, "scheduler": "fifo"})
    env = _env()
    proc = subprocess.Popen(
        _stage_cmd(tmp_path),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while "TERMINATED" not in _trial_states(tmp_path).values():
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _stop_group(proc)  # Ray's own processes of the killed sweep, if any outlived it
    assert proc.returncode == -signal.SIGKILL
    states = _trial_states(tmp_path)
    finished = {t for t, s in states.items() if s == "TERMINATED"}
    assert len(finished) == 1 and not (tmp_path / "best_params.yaml").exists(), states
    client, exp = _mlflow(tmp_path)
    before = {t: client.search_runs([exp], f"tags.tune_trial_id = '{t}'") for t in finished}
    assert all(len(runs) == 1 for runs in before.values())

    resumed = subprocess.run(_stage_cmd(tmp_path), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "tune: resuming" in resumed.stdout
    assert list(_trial_states(tmp_path).values()) == ["TERMINATED", "TERMINATED"]
    for trial, runs in before.items():
        again = client.search_runs([exp], f"tags.tune_trial_id = '{trial}'")
        assert [r.info.run_id for r in again] == [runs[0].info.run_id], f"trial {trial} was trained again"
        assert len(client.get_metric_history(runs[0].info.run_id, "val_top1")) == 2
    parent, children = _sweep_runs(tmp_path)
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["tune_trial_id"] for r in children} == set(_trial_states(tmp_path))
    assert json.loads((tmp_path / "metrics/tune.json").read_text())["trials"] == 2
    assert yaml.safe_load((tmp_path / "best_params.yaml").read_text())["train"]["lr"] in (1e-3, 3e-3)


# ------------------------------------------------------------------------------------------- train with tuned values


def test_train_stage_uses_best_params_when_tune_apply_is_on(tmp_path, monkeypatch, capsys):
    import runpy

    params_file = _project(tmp_path, {"apply": True})
    raw = yaml.safe_load(params_file.read_text())
    raw["train"]["epochs"] = 1
    raw["base"]["seeds"] = [42]
    raw["variants"] = {"cnn": {}, "own-lr": {"lr": 0.0007}}
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "best_params.yaml").write_text("train:\n  lr: 0.0042\n  label_smoothing: 0.0\n")
    argv = [
        "--params",
        str(params_file),
        "--split",
        str(tmp_path / "data/split/manifest.parquet"),
        "--images",
        str(tmp_path / "data/raw"),
        "--out",
        str(tmp_path / "models"),
        "--metrics",
        str(tmp_path / "train.json"),
        "--seed-metrics",
        str(tmp_path / "seeds"),
        "--history",
        str(tmp_path / "history"),
        "--tuned",
        str(tmp_path / "best_params.yaml"),
    ]

    def stage(args: list[str]) -> int:
        monkeypatch.setattr(sys, "argv", ["stages/train.py", *args])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(REPO / "stages/train.py"), run_name="__main__")
        return info.value.code

    assert stage(argv) == 0
    config = yaml.safe_load((tmp_path / "models/seed42/config.yaml").read_text())
    assert config["train"]["lr"] == 0.0042 and config["train"]["label_smoothing"] == 0.0
    client, _ = _mlflow(tmp_path)
    run = train_run(tmp_path / "mlflow/mlflow.db", tmp_path / "models/seed42/model.pt")
    assert client.get_run(run.info.run_id).data.params["train.lr"] == "0.0042"

    # A variant inherits the tuned train section, but a key it sets itself keeps its own value.
    own = [*argv[:7], str(tmp_path / "models-own"), *argv[8:], "--variant", "own-lr"]
    assert stage(own) == 0
    config = yaml.safe_load((tmp_path / "models-own/seed42/config.yaml").read_text())
    assert config["train"]["lr"] == 0.0007 and config["train"]["label_smoothing"] == 0.0
    assert "variants" not in config

    # A tuned value is validated like params.yaml: the key is named, nothing is trained.
    capsys.readouterr()
    (tmp_path / "best_params.yaml").write_text("train:\n  lr: -1\n")
    (tmp_path / "models/seed42/config.yaml").unlink()
    assert stage(argv) == 2
    assert "- train.lr: Input should be greater than 0" in capsys.readouterr().err
    assert not (tmp_path / "models/seed42/config.yaml").exists()
