"""Issue 6: long-tail evaluation metrics, on hand-made logits whose values are known exactly, and wired through the
evaluate stage (metrics json, per-class and confused-pair CSVs, MLflow)."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from pipeline.config import ParamsError, load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.training.metrics import confused_pairs, frequency_groups, group_accuracy, summarize
from tests.conftest import write_tiny_params

# 8 test images over 4 classes; class 3 has no test image. Row = one image: (label, top-1 prediction, runner-up).
ROWS = [
    (0, 0, 1),
    (0, 0, 2),
    (0, 0, 3),
    (0, 1, 0),  # class 0: 3/4 right; the miss has the truth second
    (1, 2, 3),
    (1, 2, 0),  # class 1: 0/2 right, never in the top 2
    (2, 2, 1),
    (2, 2, 0),
]  # class 2: 2/2 right
TRAIN_COUNTS = np.array([150, 50, 5, 10])  # head (>100), medium, tail (<20), tail


def _logits() -> tuple[np.ndarray, np.ndarray]:
    logits = np.zeros((len(ROWS), 4), np.float32)
    for i, (_, top, second) in enumerate(ROWS):
        logits[i, top], logits[i, second] = 3.0, 2.0
    return logits, np.array([r[0] for r in ROWS])


def test_summary_metrics_are_exact():
    logits, labels = _logits()
    s = summarize(logits, labels, num_classes=4, top_k=2)
    assert s["n"] == 8
    assert s["top1"] == pytest.approx(5 / 8)
    assert s["top2"] == pytest.approx(6 / 8)  # + the class-0 miss, whose truth is the runner-up
    np.testing.assert_allclose(s["per_class"][:3], [0.75, 0.0, 1.0])
    assert np.isnan(s["per_class"][3])  # no test image: not a zero, and left out of macro/std
    assert s["macro_acc"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)
    mean = 1.75 / 3
    assert s["class_acc_std"] == pytest.approx(np.sqrt(((0.75 - mean) ** 2 + mean**2 + (1 - mean) ** 2) / 3))


def test_head_medium_tail_by_training_frequency():
    groups = frequency_groups(TRAIN_COUNTS, head_above=100, tail_below=20)
    assert groups.tolist() == ["head", "medium", "tail", "tail"]
    # Boundaries: exactly head_above is not head, exactly tail_below is not tail.
    assert frequency_groups(np.array([100, 101, 20, 19]), 100, 20).tolist() == ["medium", "head", "medium", "tail"]
    logits, labels = _logits()
    per_class = summarize(logits, labels, 4)["per_class"]
    assert group_accuracy(per_class, groups) == {
        "head": {"acc": 0.75, "classes": 1},
        "medium": {"acc": 0.0, "classes": 1},
        "tail": {"acc": 1.0, "classes": 1},
    }  # class 3 has no test image
    assert "head" not in group_accuracy(per_class, frequency_groups(TRAIN_COUNTS, 1000, 20))


def test_confused_pairs_are_counted_and_ranked():
    logits, labels = _logits()
    pred = logits.argmax(1)
    assert confused_pairs(pred, labels, 10) == [(1, 2, 2), (0, 1, 1)]
    assert confused_pairs(pred, labels, 1) == [(1, 2, 2)]
    assert confused_pairs(labels, labels, 5) == []


def test_tail_threshold_validation_names_the_key(tmp_path, tiny_emoji):
    path = write_tiny_params(tmp_path, tiny_emoji)
    with pytest.raises(ParamsError, match=r"evaluate\.tail_below"):
        load_params(path, overrides={"evaluate.head_above": 10, "evaluate.tail_below": 50})


@pytest.fixture
def mlflow_env():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which tracking.setup() then prefers over a project's
    own store: restore the variable so that later in-process tests in this worker keep their stores."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def test_evaluate_stage_writes_consistent_long_tail_outputs(tmp_path, tiny_emoji, mlflow_env):
    """A random-weight checkpoint on the emoji test artist: every output must agree with predictions.csv."""
    from pipeline import tracking
    from pipeline.data.transforms import data_config
    from pipeline.io import md5_file
    from pipeline.models import build_model, save_checkpoint
    from pipeline.training.evaluate import EvalOutputs, evaluate

    params = load_params(
        write_tiny_params(tmp_path, tiny_emoji),
        overrides={"evaluate.head_above": 1, "evaluate.tail_below": 1, "evaluate.top_k": 3},
    )
    df = acquire(params.acquire, tmp_path, tmp_path / "data/raw")
    style_split = {"noto": "train", "openmoji": "train", "emojione": "val", "twemoji": "test"}
    df = df.with_columns(pl.col("group").replace_strict(style_split).alias("split"))
    # Train counts 2 / 1 / 0 per class -> head / medium / tail with head_above = tail_below = 1.
    drop = (pl.col("split") == "train") & (
        ((pl.col("class_id") >= 4) & (pl.col("group") == "noto")) | (pl.col("class_id") >= 8)
    )
    df = df.filter(~drop)
    manifest.write(df, tmp_path / "split.parquet")
    classes = df.select("class_id", "class_name").unique().sort("class_id")["class_name"].to_list()

    torch.manual_seed(0)
    model = build_model("cnn", "resnet10t", len(classes), "none", 32)
    meta = {
        "classes": classes,
        "data_config": data_config(model),
        "epoch": 1,
        "model_spec": {"method": "cnn", "model": "resnet10t", "img_size": 32},
    }
    save_checkpoint(tmp_path / "models/model.pt", model, meta)
    with mlflow.start_run(
        experiment_id=tracking.setup(params.base, tmp_path),  # as train tags its run
        tags={"stage": "train", tracking.MODEL_MD5_TAG: md5_file(tmp_path / "models/model.pt")},
    ) as run:
        pass

    m = evaluate(
        params,
        tmp_path / "split.parquet",
        tmp_path / "data/raw",
        tmp_path / "models",
        EvalOutputs.in_folder(tmp_path / "metrics/evaluate.json", tmp_path / "plots"),
        tmp_path,
    )
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text()) == pytest.approx(m)
    preds = pl.read_csv(tmp_path / "plots/predictions.csv")
    hits = preds.with_columns((pl.col("actual") == pl.col("predicted")).alias("hit"))
    acc = dict(hits.group_by("actual").agg(pl.col("hit").mean()).iter_rows())
    assert m["test_top1"] == pytest.approx(hits["hit"].mean())
    per_class = pl.read_csv(tmp_path / "plots/per_class.csv")
    assert per_class.columns == ["class_name", "train_images", "test_images", "test_acc", "frequency"]
    assert per_class.height == 12 and per_class["test_images"].to_list() == [1] * 12
    assert per_class["frequency"].to_list() == ["head"] * 4 + ["medium"] * 4 + ["tail"] * 4
    assert per_class["train_images"].to_list() == [2] * 4 + [1] * 4 + [0] * 4
    for row in per_class.iter_rows(named=True):
        assert row["test_acc"] == pytest.approx(acc[row["class_name"]])
    for g, rows in (("head", slice(0, 4)), ("medium", slice(4, 8)), ("tail", slice(8, 12))):
        assert m[f"test_{g}_classes"] == 4
        assert m[f"test_{g}_acc"] == pytest.approx(per_class["test_acc"][rows].mean(), abs=1e-4)
    assert m["test_macro_acc"] == pytest.approx(per_class["test_acc"].mean(), abs=1e-4)
    assert m["test_class_acc_std"] == pytest.approx(per_class["test_acc"].std(ddof=0), abs=1e-4)

    pairs = pl.read_csv(tmp_path / "plots/confused_pairs.csv")
    wrong = hits.filter(~pl.col("hit")).group_by("actual", "predicted").len()
    assert pairs.height == min(wrong.height, params.evaluate.confused_pairs) > 0
    assert pairs["count"].sum() == wrong["len"].sum()
    assert pairs["count"].to_list() == sorted(pairs["count"].to_list(), reverse=True)

    logged = mlflow.get_run(run.info.run_id)
    assert logged.data.metrics["test_head_acc"] == pytest.approx(m["test_head_acc"])
    assert {"per_class.csv", "confused_pairs.csv"} <= {
        a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)
    }
