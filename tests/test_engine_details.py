"""Engine details from review (issue 15 point 5): validation's top-k, and what a tracking-store failure does."""

from __future__ import annotations

import os

import mlflow
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pipeline.tracking import start_or_resume_run
from pipeline.training.distributed import Dist
from pipeline.training.engine import validate


def test_validation_reports_the_configured_top_k():
    torch.manual_seed(0)
    x, y = torch.randn(20, 4), torch.arange(20) % 5
    model = torch.nn.Linear(4, 5)
    row = validate(
        model, DataLoader(TensorDataset(x, y), batch_size=8), 20, 5, "fp32", torch.device("cpu"), Dist(), top_k=3
    )
    assert set(row) == {"val_loss", "val_top1", "val_top3"}
    ranks = (model(x).argsort(1, descending=True)[:, :3] == y[:, None]).any(1).float().mean().item()
    assert row["val_top3"] == pytest.approx(ranks)


@pytest.fixture(autouse=True)
def _restore_tracking_env():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which later tests in this process would log to: put the
    variable back as it was (monkeypatch.delenv of an absent variable restores nothing)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def test_a_vanished_run_starts_a_new_one(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    with start_or_resume_run(exp, "0" * 32, "fresh") as run:  # the store was wiped: that id is unknown
        assert run.info.run_name == "fresh" and run.info.run_id != "0" * 32


def test_a_store_that_does_not_answer_fails_the_run(tmp_path, monkeypatch):
    """It used to swallow every error of get_run and silently start a new run, splitting a resumed run's history.
    The store is real; only the lookup is made to fail, as a network outage would."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())

    def outage(run_id):
        raise ConnectionError("tracking server 10.0.0.1:5000 did not answer")

    monkeypatch.setattr(mlflow, "get_run", outage)
    with pytest.raises(ConnectionError, match="did not answer"):
        start_or_resume_run(exp, "a" * 32, "never")
    assert mlflow.active_run() is None
    assert mlflow.search_runs([exp], output_format="list") == []  # no second run was started
