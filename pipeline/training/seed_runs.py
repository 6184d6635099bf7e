"""One variant over `base.seeds`: train each seed, then write the mean ± std summary (evaluate.py: evaluate_seeds).

The DVC stage train@<v> is train_seeds; evaluate@<v> is pipeline.training.evaluate.evaluate_seeds. Per-seed files
go into folders (models/<v>/seed<N>/, metrics/train/<v>/seed<N>.json, plots/<kind>/<v>/seed<N>.csv); the summary
file (metrics/{train,evaluate}/<v>.json) keeps the single-run keys as means over seeds (pipeline/seeds.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import tracking
from pipeline.config import Params
from pipeline.io import write_json
from pipeline.seeds import seed_dir, seed_params, summarize
from pipeline.training.engine import TrainOutputs, train


@dataclass(frozen=True)
class TrainSeedOutputs:
    model_dir: Path  # seed<N>/model.pt, config.yaml
    metrics_file: Path  # the summary over seeds
    seed_metrics_dir: Path  # seed<N>.json
    history_dir: Path  # seed<N>.csv

    @classmethod
    def in_layout(cls, name: str, models: Path, metrics: Path, plots: Path) -> TrainSeedOutputs:
        """dvc.yaml's train@<name> outputs under the three roots."""
        return cls(
            models / name, metrics / "train" / f"{name}.json", metrics / "train" / name, plots / "history" / name
        )

    def of(self, seed: int) -> TrainOutputs:
        return TrainOutputs(
            seed_dir(self.model_dir, seed),
            seed_dir(self.seed_metrics_dir, seed).with_suffix(".json"),
            seed_dir(self.history_dir, seed).with_suffix(".csv"),
        )


def train_seeds(
    params: Params, split: Path, images: Path, out: TrainSeedOutputs, root: Path, variant: str = "train"
) -> dict:
    """Train `params.train` once per seed, each an MLflow run under one parent run of the variant."""
    cfg, seeds = params.train, params.base.seeds
    name = f"{variant} ({cfg.method}/{cfg.model})"
    settings = json.dumps({"variant": variant, "train": cfg.model_dump(), "seeds": seeds}, sort_keys=True, default=str)
    group = tracking.seed_group_run(
        params.base,
        root,
        f"{name}, {len(seeds)} seeds",
        hashlib.sha256(settings.encode()).hexdigest()[:16],
        {"variant": variant, "stage": "train"},
    )
    per_seed = {}
    for i, seed in enumerate(seeds):
        print(f"train: {variant}, seed {seed} ({i + 1}/{len(seeds)})", flush=True)
        per_seed[seed] = train(
            seed_params(params, seed),
            split,
            images,
            out.of(seed),
            root,
            run_name=f"{name} seed {seed}",
            tags={"variant": variant, "seed": str(seed), "mlflow.parentRunId": group},
        )
    summary = summarize(per_seed)
    write_json(out.metrics_file, summary)
    tracking.log_seed_summary(group, summary)
    return summary
