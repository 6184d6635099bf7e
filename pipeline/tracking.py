"""MLflow set-up: a SQLite store at an absolute path inside the project unless MLFLOW_TRACKING_URI is set.

Absolute, because Ray workers and `dvc exp run` change the working directory. The store is a side effect of runs,
never a DVC output (DVC deletes outputs before re-running a stage).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.data_config import BaseParams

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


def start_or_resume_run(experiment_id: str, run_id: str | None, run_name: str):
    """Continue a killed run's MLflow run when it still exists in the store; otherwise start a new one (a context
    manager, as mlflow.start_run).

    Only "no such run" (the store was wiped or moved; the history is in the state) starts a fresh run: any other
    error, a store that does not answer say, fails the run instead of silently splitting its history."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
        else:
            return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(experiment_id=experiment_id, run_name=run_name)


def start_run(experiment_id: str, run_id: str | None = None, **kwargs):
    """mlflow.start_run on the given run (run_id) or a new one in the experiment (kwargs: run_name, tags)."""
    import mlflow

    if run_id is not None:
        return mlflow.start_run(run_id=run_id)
    return mlflow.start_run(experiment_id=experiment_id, **kwargs)


def log_params(params: dict) -> None:
    """Params of the active run."""
    import mlflow

    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Metrics of the active run (at `step`: one point of a curve)."""
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def set_tags(tags: dict[str, str]) -> None:
    """Tags of the active run."""
    import mlflow

    mlflow.set_tags(tags)


def log_folder(folder: Path, artifact_path: str) -> None:
    """Every file of `folder` as artifacts of the active run, under `artifact_path`."""
    import mlflow

    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)


def log_text(text: str, artifact_file: str) -> None:
    """`text` as an artifact file of the active run."""
    import mlflow

    mlflow.log_text(text, artifact_file)


def end_run(status: str = "FINISHED") -> None:
    """End the active run with `status`."""
    import mlflow

    mlflow.end_run(status)


MODEL_MD5_TAG = "model_md5"  # on a train run: the md5 of the model.pt it wrote (how later stages find the run)


def train_run_of(model_file: Path, experiment_id: str):
    """The latest run (in this experiment) that trained exactly this checkpoint, or None: a train stage's run, else a
    sweep trial's (the same engine, tagged stage `tune`), so a trial's model evaluated later joins its own run.

    DVC outputs hold no run ids (they would change every rerun's hashes); the checkpoint's md5 is the link, and it
    holds wherever the model travels (`dvc pull` on another machine, with a shared tracking server)."""

    from pipeline.io import md5_file

    md5 = md5_file(model_file)
    for stage in ("train", "tune"):
        run = _latest_run(experiment_id, f"tags.{MODEL_MD5_TAG} = '{md5}' and tags.stage = '{stage}'")
        if run is not None:
            return run
    return None


def _latest_run(experiment_id: str, filter_string: str):
    """The newest run of the experiment that matches (MLflow's filter syntax), or None."""
    import mlflow

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        output_format="list",
        max_results=1,
        filter_string=filter_string,
        order_by=["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


SEED_GROUP_TAG = "seed_group"  # on the parent run of one variant's seed runs: what it groups (variant + settings)


def seed_group_run(base: BaseParams, root: Path, name: str, group: str, tags: dict[str, str]) -> str:
    """The parent run that groups one variant's runs over `base.seeds` in `mlflow ui` (each seed's run carries
    `mlflow.parentRunId`). A stage re-run with the same settings (`group`) reuses it instead of leaving orphans."""
    import mlflow

    experiment_id = setup(base, root)
    found = _latest_run(experiment_id, f"tags.{SEED_GROUP_TAG} = '{group}'")
    if found is not None:
        return found.info.run_id
    return Store(mlflow.get_tracking_uri()).create_run(experiment_id, name, {SEED_GROUP_TAG: group, **tags})


def log_seed_summary(run_id: str, summary: dict, prefix: str = "") -> None:
    """Log mean, std and n_seeds of a seeds summary (pipeline/seeds.py) to the group run, and close it."""
    import mlflow

    store = Store(mlflow.get_tracking_uri())
    numbers = {f"{prefix}{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    store.log(run_id, metrics=numbers)
    store.end(run_id)


def parent_of(run) -> str | None:
    """The group run a seed's run belongs to (None for a run outside any group)."""
    return run.data.tags.get("mlflow.parentRunId") if run is not None else None


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
    from pipeline.provenance import git_state

    return git_state(root)["git_commit"]


def stage_name(kind: str, tags: dict[str, str] | None = None) -> str:
    """The dvc.yaml stage a run belongs to: `train@<variant>` for a variant's train run, `tune` for sweep trials."""
    tags = tags or {}
    if tags.get("stage") == "tune":
        return "tune"
    return f"{kind}@{tags['variant']}" if tags.get("variant") else kind


def provenance(root: Path, stage: str | None = None, data_file: Path | None = None, prefix: str = "") -> dict:
    """Tags for a run: dvc.lock dependency hashes of `stage`, the data version (md5 of `data_file`), CPU/GPU,
    torch/timm/CUDA versions, git commit + dirty flag (pipeline/provenance.py). `prefix` namespaces them when a
    later stage adds its own to an earlier run (evaluate on the train run)."""
    from pipeline import provenance as prov

    return {f"{prefix}{k}": v for k, v in prov.collect(root, stage, data_file).items()}


def tag_provenance(root: Path, stage: str | None = None, data_file: Path | None = None, prefix: str = "") -> None:
    """Set provenance() on the active MLflow run."""
    import mlflow

    mlflow.set_tags(provenance(root, stage, data_file, prefix))


def model_origin(base: BaseParams, root: Path, model_file: Path, run_id: str | None = None) -> dict | None:
    """The train run a checkpoint came from (by run id, or by the checkpoint's md5 tag) as {run_id, run_name,
    data_version, git_commit, git_dirty, dvc_stage, deps_md5}, or None. Read-only: a missing store stays missing."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.io import md5_file

    db = local_db(base, root)
    if db is not None and not db.is_file():
        return None
    client = MlflowClient(tracking_uri(base, root))
    try:
        if run_id is not None:
            run = client.get_run(run_id)
        else:
            exp = client.get_experiment_by_name(base.experiment)
            found = (
                []
                if exp is None
                else client.search_runs(
                    [exp.experiment_id],
                    f"tags.{MODEL_MD5_TAG} = '{md5_file(model_file)}' and tags.stage = 'train'",
                    max_results=1,
                    order_by=["attributes.start_time DESC"],
                )
            )
            run = found[0] if found else None
    except MlflowException:
        return None
    if run is None:
        return None
    t = run.data.tags
    keys = ("data_version", "git_commit", "git_dirty", "dvc_stage", "deps_md5")
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        **{k: t.get(k) for k in keys},
        "data_version": t.get("data_version") or t.get("split_manifest_md5"),
    }


class ArtifactError(Exception):
    """An artifact the store cannot deliver (no such run or path, store unreachable); the message says why."""


def download_artifact(uri: str, store: str, dest: Path) -> Path:
    """A runs:/ artifact of `store` into dest; ArtifactError names what went wrong (first line of MLflow's reason)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest), tracking_uri=store))
    except (MlflowException, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(reason) from None


class Store:
    """Runs addressed by id in one tracking store, without an active run: the sweep driver, its Ray callbacks (which
    are pickled, so they keep params and build a Store when called) and checks that read runs back."""

    def __init__(self, uri: str) -> None:
        from mlflow import MlflowClient

        self.uri = uri
        self._client = MlflowClient(uri)

    @classmethod
    def of(cls, base: BaseParams, root: Path) -> Store:
        return cls(tracking_uri(base, root))

    def experiment_id(self, name: str) -> str:
        return self._client.get_experiment_by_name(name).experiment_id

    def runs(self, experiment_id: str, filter_string: str, max_results: int | None = None) -> list:
        """Matching runs (MLflow's filter syntax, e.g. "tags.stage = 'tune'"), newest first."""
        if max_results is None:
            return self._client.search_runs([experiment_id], filter_string)
        return self._client.search_runs([experiment_id], filter_string, max_results=max_results)

    def get_run(self, run_id: str):
        return self._client.get_run(run_id)

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str], params: dict | None = None) -> str:
        """A new run with its tags and params (in batches: MLflow takes at most 100 per call); returns its id."""
        from mlflow.entities import Param

        run_id = self._client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
        flat = [Param(k, str(v)) for k, v in (params or {}).items()]
        for i in range(0, len(flat), 100):
            self._client.log_batch(run_id, params=flat[i : i + 100])
        return run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None, tags: dict | None = None) -> None:
        """Metrics (at step 0, timestamped now) and tags (values as text) in one batch."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        self._client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
        )

    def log_artifact(self, run_id: str, path: Path) -> None:
        self._client.log_artifact(run_id, str(path))

    def reopen(self, run_id: str) -> None:
        self._client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._client.set_terminated(run_id, status)
