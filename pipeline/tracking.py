"""MLflow set-up: a SQLite store at an absolute path inside the project unless MLFLOW_TRACKING_URI is set.

Absolute, because Ray workers and `dvc exp run` change the working directory. The store is a side effect of runs,
never a DVC output (DVC deletes outputs before re-running a stage).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from pipeline.config import BaseParams

# mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI to the environment (so that child processes inherit it). A
# value we exported ourselves is remembered here, so that it is not mistaken for the user's choice by the next setup()
# in the same process (another project root, e.g. in tests) or by its children.
_SET_BY_US = "PIPELINE_MLFLOW_URI_SET"


def _user_uri() -> str | None:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    return env if env and env != os.environ.get(_SET_BY_US) else None


def local_db(base: BaseParams, root: Path) -> Path | None:
    """The project's SQLite store file, or None when the user points MLflow elsewhere (MLFLOW_TRACKING_URI)."""
    return None if _user_uri() else (root / base.mlflow_dir).resolve() / "mlflow.db"


def tracking_uri(base: BaseParams, root: Path) -> str:
    db = local_db(base, root)
    if db is None:
        return _user_uri()
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def setup(base: BaseParams, root: Path) -> str:
    """Point MLflow at the store and return the experiment id (created once, artifacts beside the database)."""
    import mlflow

    from_env = _user_uri() is not None
    uri = tracking_uri(base, root)
    mlflow.set_tracking_uri(uri)
    if not from_env:
        os.environ[_SET_BY_US] = uri
    exp = mlflow.get_experiment_by_name(base.experiment)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if not from_env:
        artifacts = ((root / base.mlflow_dir).resolve() / "artifacts").as_uri()
    return mlflow.create_experiment(base.experiment, artifact_location=artifacts)


MODEL_MD5_TAG = "model_md5"  # on a train run: the md5 of the model.pt it wrote (how later stages find the run)


def train_run_of(model_file: Path, experiment_id: str):
    """The latest run (in this experiment) that trained exactly this checkpoint, or None: a train stage's run, else a
    sweep trial's (the same engine, tagged stage `tune`), so a trial's model evaluated later joins its own run.

    DVC outputs hold no run ids (they would change every rerun's hashes); the checkpoint's md5 is the link, and it
    holds wherever the model travels (`dvc pull` on another machine, with a shared tracking server)."""
    import mlflow

    from pipeline.io import md5_file

    md5 = md5_file(model_file)
    for stage in ("train", "tune"):
        runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list", max_results=1,
                                  filter_string=f"tags.{MODEL_MD5_TAG} = '{md5}' and tags.stage = '{stage}'",
                                  order_by=["attributes.start_time DESC"])
        if runs:
            return runs[0]
    return None


def log_artifacts_as(files: dict[str, Path]) -> None:
    """Log files to the active run under fixed names: DVC paths are per variant (plots/history/cnn.csv), the run's
    artifacts are not (train_history.csv), so every run looks alike in `mlflow ui`."""
    import mlflow

    renamed = {name: src for name, src in files.items() if Path(src).name != name}
    for name, src in files.items():
        if name not in renamed:  # already named right (model.pt): logged in place, never copied
            mlflow.log_artifact(str(src))
    if renamed:
        with tempfile.TemporaryDirectory() as tmp:
            for name, src in renamed.items():
                shutil.copyfile(src, Path(tmp) / name)
            mlflow.log_artifacts(tmp)


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
