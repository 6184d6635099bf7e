"""One variant over `base.seeds`: train (or evaluate) each seed, then write the mean ± std summary.

The DVC stages train@<v> and evaluate@<v> are these two functions. Per-seed files go into folders
(models/<v>/seed<N>/, metrics/train/<v>/seed<N>.json, plots/<kind>/<v>/seed<N>.csv); the summary file
(metrics/{train,evaluate}/<v>.json) keeps the single-run keys as means over seeds (pipeline/seeds.py).
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
from pipeline.training.evaluate import EvalOutputs, evaluate


@dataclass(frozen=True)
class TrainSeedOutputs:
    model_dir: Path  # seed<N>/model.pt, config.yaml
    metrics_file: Path  # the summary over seeds
    seed_metrics_dir: Path  # seed<N>.json
    history_dir: Path  # seed<N>.csv

    @classmethod
    def in_layout(cls, name: str, models: Path, metrics: Path, plots: Path) -> TrainSeedOutputs:
        """dvc.yaml's train@<name> outputs under the three roots."""
        return cls(models / name, metrics / "train" / f"{name}.json", metrics / "train" / name,
                   plots / "history" / name)

    def of(self, seed: int) -> TrainOutputs:
        return TrainOutputs(seed_dir(self.model_dir, seed), seed_dir(self.seed_metrics_dir, seed).with_suffix(".json"),
                            seed_dir(self.history_dir, seed).with_suffix(".csv"))


@dataclass(frozen=True)
class EvalSeedOutputs:
    metrics_file: Path  # the summary over seeds
    seed_metrics_dir: Path  # seed<N>.json
    predictions_dir: Path  # seed<N>.csv each
    per_class_dir: Path
    confused_pairs_dir: Path
    samples_dir: Path  # seed<N>.npz

    @classmethod
    def in_layout(cls, name: str, metrics: Path, plots: Path) -> EvalSeedOutputs:
        """dvc.yaml's evaluate@<name> outputs under the two roots."""
        return cls(metrics / "evaluate" / f"{name}.json", metrics / "evaluate" / name,
                   *(plots / kind / name for kind in ("predictions", "per_class", "confused_pairs", "samples")))

    def of(self, seed: int) -> EvalOutputs:
        return EvalOutputs(*(seed_dir(folder, seed).with_suffix(ext) for folder, ext in (
            (self.seed_metrics_dir, ".json"), (self.predictions_dir, ".csv"), (self.per_class_dir, ".csv"),
            (self.confused_pairs_dir, ".csv"), (self.samples_dir, ".npz"))))


def train_seeds(params: Params, split: Path, images: Path, out: TrainSeedOutputs, root: Path,
                variant: str = "train") -> dict:
    """Train `params.train` once per seed, each an MLflow run under one parent run of the variant."""
    cfg, seeds = params.train, params.base.seeds
    name = f"{variant} ({cfg.method}/{cfg.model})"
    settings = json.dumps({"variant": variant, "train": cfg.model_dump(), "seeds": seeds}, sort_keys=True,
                          default=str)
    group = tracking.seed_group_run(params.base, root, f"{name}, {len(seeds)} seeds",
                                    hashlib.sha256(settings.encode()).hexdigest()[:16],
                                    {"variant": variant, "stage": "train"})
    per_seed = {}
    for i, seed in enumerate(seeds):
        print(f"train: {variant}, seed {seed} ({i + 1}/{len(seeds)})", flush=True)
        per_seed[seed] = train(seed_params(params, seed), split, images, out.of(seed), root,
                               run_name=f"{name} seed {seed}",
                               tags={"variant": variant, "seed": str(seed), "mlflow.parentRunId": group})
    summary = summarize(per_seed)
    write_json(out.metrics_file, summary)
    tracking.log_seed_summary(group, summary)
    return summary


def evaluate_seeds(params: Params, split: Path, images: Path, model_dir: Path, out: EvalSeedOutputs,
                   root: Path) -> dict:
    """Evaluate each seed's model (model_dir/seed<N>/) on the test split; the summary also goes to the parent run."""
    per_seed = {}
    for seed in params.base.seeds:
        one = seed_dir(model_dir, seed)
        if not (one / "model.pt").is_file():
            raise FileNotFoundError(f"{one / 'model.pt'}: no model for seed {seed} of base.seeds (run train with "
                                    "the same base.seeds first)")
        per_seed[seed] = evaluate(seed_params(params, seed), split, images, one, out.of(seed), root)
    summary = summarize(per_seed)
    write_json(out.metrics_file, summary)
    first = seed_dir(model_dir, params.base.seeds[0]) / "model.pt"
    group = tracking.parent_of(tracking.train_run_of(first, tracking.setup(params.base, root)))
    if group is not None:
        tracking.log_seed_summary(group, summary)
    print(f"evaluate: test top-1 {summary['test_top1']:.4f} ± {summary['test_top1_std']:.4f} over "
          f"{summary['n_seeds']} seeds ({', '.join(f'{v:.4f}' for v in summary['test_top1_seeds'])})")
    return summary
