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
