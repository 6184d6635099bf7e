"""Issue 15 point 1: class names that look like numbers (or are not ASCII) survive acquire -> report unchanged.

The report used to read evaluate's CSVs with type inference: `001` and `1` became the same number, and the
confusion figure crashed comparing a string with an integer. The whole chain runs here on a folder dataset whose
class folders are exactly such names, with an untrained-enough model that makes mistakes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image

from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean
from pipeline.data.split import split
from pipeline.report import ReportInputs, build_report
from pipeline.report.results import load_variant
from pipeline.training.engine import TrainOutputs, train
from pipeline.training.evaluate import EvalOutputs, evaluate
from tests.conftest import REPO, shrink

pytestmark = pytest.mark.slow

NAMES = ["001", "010", "1", "1.5", "2e3", "日本語", "a b", "miku"]
PER_CLASS = 10


def _dataset(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(NAMES):
        for i in range(PER_CLASS):
            base = np.array([(37 * c) % 256, (91 * c) % 256, (53 * c + 40) % 256], np.uint8)
            noise = rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray((base + noise).astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("names")
    _dataset(root / "src")
    raw_params = shrink(yaml.safe_load((REPO / "params.yaml").read_text()))
    raw_params["acquire"].update(source="folder", folder={"path": "src"})
    raw_params["split"].update(strategy="per_class")
    raw_params["train"].update(epochs=1)
    raw_params["variants"] = {"cnn": {}}
    (root / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False, allow_unicode=True))
    params = load_params(root / "params.yaml")
    raw, cleaned, split_file = root / "data/raw", root / "data/clean", root / "data/split/manifest.parquet"
    acquire(params.acquire, root, raw)
    clean(params.clean, raw, cleaned)
    df, counts = split(manifest.read(cleaned), params.split, params.base.seed)
    manifest.write(df, split_file)
    (root / "metrics").mkdir()
    (root / "metrics/split.json").write_text(json.dumps(counts))
    inputs = ReportInputs(split_file, cleaned, root / "models", root / "metrics", root / "plots")
    paths = inputs.variant("cnn", params.base.seeds[0])
    p = params.with_variant("cnn")
    train(p, split_file, cleaned, TrainOutputs(paths.model_dir, paths.train_metrics, paths.history), root)
    evaluate(
        p,
        split_file,
        cleaned,
        paths.model_dir,
        EvalOutputs(paths.eval_metrics, paths.predictions, paths.per_class, paths.confused_pairs, paths.samples),
        root,
    )
    report, _ = build_report(params, inputs, root / "reports")
    return dict(root=root, report=report, paths=paths, split=df)


def test_every_name_survives_acquire_clean_split(project):
    assert sorted(project["split"]["class_name"].unique().to_list()) == sorted(NAMES)
    assert project["split"].group_by("class_name").len()["len"].to_list() == [PER_CLASS] * len(NAMES)


def test_report_reads_class_columns_as_the_exact_strings(project):
    result = load_variant("cnn", project["paths"])
    for table, cols in (
        (result.per_class, ["class_name"]),
        (result.predictions, ["actual", "predicted"]),
        (result.confused_pairs, ["actual", "predicted"]),
    ):
        for col in cols:
            assert table.schema[col] == pl.String
            assert set(table[col]) <= set(NAMES)
    assert sorted(result.per_class["class_name"]) == sorted(NAMES)  # "001" and "1" stay two classes
    assert result.predictions["image_id"].dtype == pl.String
    assert result.confused_pairs.height >= 1, "the test needs at least one confusion"


def test_report_renders_every_figure_with_the_right_names(project):
    text = project["report"].read_text()
    result = load_variant("cnn", project["paths"])
    actual, predicted = result.confused_pairs.row(0)[:2]
    assert f"| {actual} | {predicted} |" in text  # the confusion table names the exact classes
    figures = project["root"] / "reports/figures"
    for name in (
        "accuracy_vs_gflops.png",
        "training_curves.png",
        "per_class_vs_frequency.png",
        "confused_cnn.png",
        "dataset.png",
    ):
        assert (figures / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
