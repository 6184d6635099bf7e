"""MLflow store selection: the project's SQLite store unless the user sets MLFLOW_TRACKING_URI."""

from pathlib import Path

import pytest

from pipeline import tracking
from pipeline.config import BaseParams


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking._SET_BY_US, raising=False)


def test_second_project_in_one_process_gets_its_own_store(tmp_path: Path) -> None:
    import mlflow

    base = BaseParams()
    tracking.setup(base, tmp_path / "a")
    tracking.setup(base, tmp_path / "b")  # set_tracking_uri exported a's URI: it must not be taken as the user's
    assert mlflow.get_tracking_uri() == f"sqlite:///{(tmp_path / 'b' / 'mlflow' / 'mlflow.db').resolve()}"
    assert (tmp_path / "b" / "mlflow" / "mlflow.db").is_file()


def test_user_uri_wins(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'server.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert tracking.tracking_uri(BaseParams(), tmp_path / "project") == uri
    assert not (tmp_path / "project").exists()


def test_a_sweep_trials_model_is_found_in_its_trial_run(tmp_path: Path) -> None:
    """Issue 23 case 7: `evaluate` on a trial's model.pt found no train run (trials are tagged stage `tune`) and
    logged to a new, unlinked run."""
    import mlflow

    from pipeline.io import md5_file

    model = tmp_path / "trial" / "model.pt"
    model.parent.mkdir()
    model.write_bytes(b"a trial's checkpoint")
    experiment_id = tracking.setup(BaseParams(), tmp_path)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="trial-1", tags={"stage": "tune", tracking.MODEL_MD5_TAG: md5_file(model)}
    ) as trial:
        pass
    with mlflow.start_run(experiment_id=experiment_id, run_name="sweep", tags={"stage": "tune"}):
        pass
    found = tracking.train_run_of(model, experiment_id)
    assert found is not None and found.info.run_id == trial.info.run_id
    with mlflow.start_run(
        experiment_id=experiment_id, run_name="cnn", tags={"stage": "train", tracking.MODEL_MD5_TAG: md5_file(model)}
    ) as train:
        pass
    assert tracking.train_run_of(model, experiment_id).info.run_id == train.info.run_id  # a train run comes first
