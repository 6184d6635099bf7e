"""What the report reads for each variant: only files the train and evaluate stages wrote (nothing is recomputed).

The paths follow dvc.yaml's foreach stages; VariantPaths.of is the one place that knows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from pipeline.seeds import seed_dir


@dataclass(frozen=True)
class VariantPaths:
    model_dir: Path  # train: model.pt, config.yaml (the resolved params it trained with), of the shown seed
    train_metrics: Path  # over all seeds (pipeline/seeds.py summarize)
    history: Path
    eval_metrics: Path  # over all seeds: test_top1 is the mean, test_top1_seeds the per-seed values
    predictions: Path
    per_class: Path
    confused_pairs: Path
    samples: Path

    @classmethod
    def of(cls, name: str, models: Path, metrics: Path, plots: Path, seed: int) -> VariantPaths:
        """dvc.yaml's layout: metrics/{train,evaluate}/<v>.json over the seeds; models/<v>/seed<N>/ and
        plots/<kind>/<v>/seed<N>.csv|npz of one seed (the figures show one run, the tables the mean)."""
        one = seed_dir(Path(), seed).name
        return cls(
            models / name / one,
            metrics / "train" / f"{name}.json",
            plots / "history" / name / f"{one}.csv",
            metrics / "evaluate" / f"{name}.json",
            plots / "predictions" / name / f"{one}.csv",
            plots / "per_class" / name / f"{one}.csv",
            plots / "confused_pairs" / name / f"{one}.csv",
            plots / "samples" / name / f"{one}.npz",
        )


@dataclass(frozen=True)
class VariantResult:
    name: str
    train_cfg: dict  # the train section it really trained with (variant + tuned values folded in)
    model_file: Path  # models/<v>/seed<N>/model.pt: its md5 finds the MLflow train run (pipeline/tracking.py)
    train: dict  # metrics/train/<v>.json (over seeds)
    test: dict  # metrics/evaluate/<v>.json (over seeds: mean, <key>_std, <key>_seeds)
    history: pl.DataFrame
    per_class: pl.DataFrame
    predictions: pl.DataFrame
    confused_pairs: pl.DataFrame
    samples: dict[str, np.ndarray]

    @property
    def backbone(self) -> str:
        cnn = self.train_cfg.get("backbone_cnn")
        return f"{self.train_cfg['model']} over {cnn}" if cnn else self.train_cfg["model"]


def load_variant(name: str, paths: VariantPaths) -> VariantResult:
    """Raises FileNotFoundError naming the first missing file (run `dvc repro` for that variant first)."""
    for f in (
        paths.model_dir / "config.yaml",
        paths.model_dir / "model.pt",
        paths.train_metrics,
        paths.history,
        paths.eval_metrics,
        paths.predictions,
        paths.per_class,
        paths.confused_pairs,
        paths.samples,
    ):
        if not f.is_file():
            raise FileNotFoundError(f"report: variant {name!r} has no {f} (run `dvc repro evaluate@{name}`)")
    with np.load(paths.samples, allow_pickle=False) as npz:
        samples = {k: npz[k] for k in npz.files}
    return VariantResult(
        name=name,
        train_cfg=yaml.safe_load((paths.model_dir / "config.yaml").read_text())["train"],
        model_file=paths.model_dir / "model.pt",
        train=json.loads(paths.train_metrics.read_text()),
        test=json.loads(paths.eval_metrics.read_text()),
        history=read_history(paths.history),
        per_class=read_class_table(paths.per_class),
        predictions=read_class_table(paths.predictions),
        confused_pairs=read_class_table(paths.confused_pairs),
        samples=samples,
    )


# Numeric columns of evaluate's CSVs. Every other column (class names, image ids) is text, whatever it looks like:
# type inference would read class folders `001` and `1` as the same number, or fail when a name after the first rows
# is not numeric, and could give two variants' files different dtypes.
CLASS_TABLE_NUMBERS = {
    "train_images": pl.Int64,
    "test_images": pl.Int64,
    "test_acc": pl.Float64,
    "count": pl.Int64,
    "actual_test_images": pl.Int64,
    "rate": pl.Float64,
    "confidence": pl.Float64,
}


def read_class_table(path: Path) -> pl.DataFrame:
    """plots/{predictions,per_class,confused_pairs}/<v>.csv: class and image columns as strings, counts as numbers."""
    df = pl.read_csv(path, infer_schema=False)
    return df.cast({c: t for c, t in CLASS_TABLE_NUMBERS.items() if c in df.columns})


def read_history(path: Path) -> pl.DataFrame:
    """plots/history/<v>.csv: one row per epoch, every column a number."""
    df = pl.read_csv(path, infer_schema=False)
    return df.cast({c: pl.Int64 if c == "epoch" else pl.Float64 for c in df.columns})
