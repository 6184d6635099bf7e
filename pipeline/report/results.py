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


@dataclass(frozen=True)
class VariantPaths:
    model_dir: Path  # train: model.pt, run.json, config.yaml (the resolved params it trained with)
    train_metrics: Path
    history: Path
    eval_metrics: Path
    predictions: Path
    per_class: Path
    confused_pairs: Path
    samples: Path

    @classmethod
    def of(cls, name: str, models: Path, metrics: Path, plots: Path) -> VariantPaths:
        """dvc.yaml's layout: models/<v>/, metrics/{train,evaluate}/<v>.json, plots/<kind>/<v>.csv|npz."""
        return cls(models / name, metrics / "train" / f"{name}.json", plots / "history" / f"{name}.csv",
                   metrics / "evaluate" / f"{name}.json", plots / "predictions" / f"{name}.csv",
                   plots / "per_class" / f"{name}.csv", plots / "confused_pairs" / f"{name}.csv",
                   plots / "samples" / f"{name}.npz")


@dataclass(frozen=True)
class VariantResult:
    name: str
    train_cfg: dict  # the train section it really trained with (variant + tuned values folded in)
    run_id: str
    train: dict  # metrics/train/<v>.json
    test: dict  # metrics/evaluate/<v>.json
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
    for f in (paths.model_dir / "config.yaml", paths.model_dir / "run.json", paths.train_metrics, paths.history,
              paths.eval_metrics, paths.predictions, paths.per_class, paths.confused_pairs, paths.samples):
        if not f.is_file():
            raise FileNotFoundError(f"report: variant {name!r} has no {f} (run `dvc repro evaluate@{name}`)")
    with np.load(paths.samples, allow_pickle=False) as npz:
        samples = {k: npz[k] for k in npz.files}
    return VariantResult(
        name=name, train_cfg=yaml.safe_load((paths.model_dir / "config.yaml").read_text())["train"],
        run_id=json.loads((paths.model_dir / "run.json").read_text())["run_id"],
        train=json.loads(paths.train_metrics.read_text()), test=json.loads(paths.eval_metrics.read_text()),
        history=pl.read_csv(paths.history), per_class=pl.read_csv(paths.per_class),
        predictions=pl.read_csv(paths.predictions, schema_overrides={"image_id": pl.String}),
        confused_pairs=pl.read_csv(paths.confused_pairs), samples=samples)
