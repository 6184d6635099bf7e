"""Every stage on a tiny subset of the real embedded data, chained as DVC would run them (library level)."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import polars as pl
import pytest
import torch

from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean
from pipeline.data.split import split
from pipeline.models import load_checkpoint
from pipeline.report import ReportInputs, build_report
from pipeline.training.engine import TrainOutputs, train
from pipeline.training.evaluate import evaluate
from tests.conftest import write_tiny_params

N_CLASSES = 12


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_emoji) -> dict:
    """Run acquire -> clean -> split -> train -> evaluate -> report once; tests inspect the results."""
    root = tmp_path_factory.mktemp("project")
    params = load_params(write_tiny_params(root, tiny_emoji))
    raw, cleaned, split_file = root / "data/raw", root / "data/clean", root / "data/split/manifest.parquet"
    acquire(params.acquire, root, raw)
    _, _, clean_counts = clean(params.clean, raw, cleaned)
    df, split_counts = split(manifest.read(cleaned), params.split, params.base.seed)
    manifest.write(df, split_file)
    for name, counts in (("clean", clean_counts), ("split", split_counts)):
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{name}.json").write_text(json.dumps(counts))
    outputs = TrainOutputs(root / "models", root / "metrics/train.json", root / "plots/train_history.csv")
    train_summary = train(params, split_file, cleaned, outputs, root)
    eval_metrics = evaluate(params, split_file, cleaned, root / "models", root / "metrics/evaluate.json",
                            root / "plots", root)
    inputs = ReportInputs(split_file, cleaned, cleaned / "quarantine.parquet", root / "models",
                          root / "plots/train_history.csv", root / "plots/per_class.csv",
                          root / "plots/predictions.csv",
                          {k: root / "metrics" / f"{k}.json" for k in ("clean", "split", "train", "evaluate")})
    report = build_report(params, inputs, root / "reports")
    return dict(root=root, params=params, train=train_summary, eval=eval_metrics, report=report,
                split_file=split_file, cleaned=cleaned)


def test_acquire_and_clean_keep_every_image(project):
    raw = manifest.read(project["root"] / "data/raw")
    cleaned = manifest.read(project["cleaned"])
    assert raw.height == cleaned.height == N_CLASSES * 4
    assert sorted(cleaned["class_id"].unique().to_list()) == list(range(N_CLASSES))
    # RGBA emoji were composited on white and re-encoded as RGB PNG
    from PIL import Image

    with Image.open(project["cleaned"] / cleaned["path"][0]) as im:
        assert im.mode == "RGB"


def test_group_split_holds_out_one_artist(project):
    df = manifest.read(project["split_file"])
    assert set(df.filter(pl.col("split") == "test")["group"]) == {"twemoji"}
    assert set(df.filter(pl.col("split") == "val")["group"]) == {"emojione"}
    assert set(df.filter(pl.col("split") == "train")["group"]) == {"noto", "openmoji"}
    assert df.group_by("split").len().sort("split").rows() == [("test", 12), ("train", 24), ("val", 12)]


def test_train_writes_checkpoint_history_and_metrics(project):
    root, summary = project["root"], project["train"]
    assert summary["epochs"] == 2 and summary["num_classes"] == N_CLASSES
    assert 1 <= summary["best_epoch"] <= 2
    history = pl.read_csv(root / "plots/train_history.csv")
    assert history["epoch"].to_list() == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "lr"} <= set(history.columns)
    assert json.loads((root / "metrics/train.json").read_text())["train_images"] == 24


def test_checkpoint_reloads_to_identical_logits(project):
    root = project["root"]
    model, ckpt = load_checkpoint(root / "models/model.pt")
    assert len(ckpt["classes"]) == N_CLASSES and ckpt["model_spec"]["img_size"] == 32
    x = torch.randn(2, 3, 32, 32)
    again, _ = load_checkpoint(root / "models/model.pt")
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_evaluate_reports_test_metrics(project):
    m = project["eval"]
    assert m["test_images"] == N_CLASSES
    assert 0.0 <= m["test_top1"] <= m["test_top5"] <= 1.0
    assert m["chance_top1"] == pytest.approx(1 / N_CLASSES)
    preds = pl.read_csv(project["root"] / "plots/predictions.csv")
    assert preds.height == N_CLASSES and set(preds.columns) == {"image_id", "actual", "predicted", "confidence"}


def test_mlflow_run_has_params_epoch_metrics_and_artifacts(project):
    root = project["root"]
    run_id = json.loads((root / "models/run.json").read_text())["run_id"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow/mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.img_size"] == "32"
    assert run.data.tags["stage"] == "train" and run.data.tags["device"] == "cpu"
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert "test_top1" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "config.yaml", "train_history.csv"} <= names
    # artifacts live beside the database, inside the project
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlflow")


def test_report_has_results_table_and_valid_pngs(project):
    text = project["report"].read_text()
    assert "| cnn | tf_efficientnet_lite0 |" in text
    run_id = json.loads((project["root"] / "models/run.json").read_text())["run_id"]
    assert run_id in text
    assert "## Most frequent confusions (test)" in text
    figures = sorted(p.name for p in (project["root"] / "reports/figures").glob("*.png"))
    assert figures == ["dataset.png", "per_class_accuracy.png", "samples.png", "training_curves.png"]
    for name in figures:
        assert f"figures/{name}" in text
        assert (project["root"] / "reports/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
