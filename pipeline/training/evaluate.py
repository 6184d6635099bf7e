"""The `evaluate` stage: the selected checkpoint on the test split (held-out artists for the default).

Besides the accuracies it stores what the report compares the models by, so the report never runs a model: the
inference cost (GFLOPs per image from torch's FLOP counter; forward img/s at evaluate.batch_size on this machine goes
to MLflow only, since it differs between runs) and,
in a samples .npz, a few test images as the model saw them with their predictions (and, for GLSim, the CLS-patch
similarity map, the selected patches, the box and the crop).
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from pipeline.config import Params
from pipeline.data import manifest
from pipeline.data.dataset import ManifestDataset
from pipeline.data.transforms import eval_transform
from pipeline.inference.explain import write_samples
from pipeline.io import atomic_path, write_json
from pipeline.models import load_checkpoint
from pipeline.models.spec import ModelSpec
from pipeline.runtime import resolve_device, seed_everything
from pipeline.seeds import seed_dir, seed_params
from pipeline.seeds import summarize as summarize_seeds
from pipeline.training.engine import make_loader, predict, use_channels_last
from pipeline.training.metrics import GROUPS, confused_pairs, frequency_groups, group_accuracy, summarize


@dataclass(frozen=True)
class EvalOutputs:
    metrics: Path  # DVC metrics json
    predictions: Path  # csv: image_id, actual, predicted, confidence (DVC confusion plot)
    per_class: Path  # csv: class, train/test images, accuracy, frequency group
    confused_pairs: Path  # csv: the most frequent (actual, predicted) mistakes
    samples: Path  # npz: evaluate.sample_images test images as the model saw them (+ GLSim's selection)

    @classmethod
    def in_folder(cls, metrics: Path, folder: Path) -> EvalOutputs:
        """All but the metrics in one folder, under fixed names (tests, ad-hoc runs)."""
        return cls(
            metrics, *(folder / n for n in ("predictions.csv", "per_class.csv", "confused_pairs.csv", "samples.npz"))
        )


def evaluate(
    params: Params, split_manifest: Path, image_root: Path, model_dir: Path, out: EvalOutputs, root: Path
) -> dict:
    """Test-split metrics of model_dir/model.pt (DVC metrics + plots in `out`), logged to the run that trained it."""
    base, cfg = params.base, params.evaluate
    device = resolve_device(base.device)
    seed_everything(base.seed, base.threads, device)
    model, ckpt = load_checkpoint(model_dir / "model.pt", device)
    spec = ModelSpec.of(ckpt)
    if use_channels_last(spec.method, spec.options.get("backbone_cnn")):  # as it trained
        model = model.to(memory_format=torch.channels_last)
    classes: list[str] = ckpt["classes"]
    df = manifest.read(split_manifest)
    test = _test_split(df, classes, split_manifest, model_dir / "model.pt")
    dataset = ManifestDataset(test, image_root, eval_transform(spec.img_size, ckpt["data_config"]))
    loader = make_loader(dataset, cfg.batch_size, False, base.seed, 0, device)
    # The precision it trained and was selected with (a variant may set its own); fp32 for older checkpoints.
    logits, labels = predict(model, loader, device, ckpt.get("precision", "fp32"), desc="test")
    s = summarize(logits, labels, len(classes), cfg.top_k)
    n_train = dict(df.filter(pl.col("split") == "train").group_by("class_name").len().iter_rows())
    train_counts = np.array([n_train.get(name, 0) for name in classes])
    groups = frequency_groups(train_counts, cfg.head_above, cfg.tail_below)
    by_group = group_accuracy(s["per_class"], groups)
    metrics = _test_metrics(s, cfg.top_k, test, classes, ckpt, by_group) | _cost(model, spec.img_size, device)
    write_json(out.metrics, metrics)
    img_per_s = forward_throughput(model, spec.img_size, cfg.batch_size, device)  # MLflow only: differs every run

    pred, confidence = logits.argmax(1), torch.from_numpy(logits).softmax(1).max(1).values.numpy()
    _write_predictions(out.predictions, test["image_id"].to_list(), labels, pred, confidence, classes)
    _write_class_tables(out, classes, labels, pred, s["per_class"], train_counts, groups, cfg.confused_pairs)
    picks = np.sort(
        np.random.default_rng(base.seed).choice(test.height, min(cfg.sample_images, test.height), replace=False)
    )
    ids = test["image_id"].to_list()
    write_samples(
        out.samples, model, dataset, picks, ids, classes, pred[picks], confidence[picks], ckpt["data_config"], device
    )
    _track(params, root, model_dir, split_manifest, out, metrics | {"test_img_per_s": img_per_s})
    print(_summary_line(metrics, cfg.top_k, len(classes), by_group))
    return metrics


def _test_metrics(s: dict, top_k: int, test: pl.DataFrame, classes: list[str], ckpt: dict, by_group: dict) -> dict:
    """The DVC metrics of one checkpoint: accuracies, counts, chance and per frequency group."""
    metrics = {
        "test_top1": s["top1"],
        f"test_top{top_k}": s[f"top{top_k}"],
        "test_macro_acc": s["macro_acc"],
        "test_class_acc_std": s["class_acc_std"],
        "test_images": s["n"],
        "test_classes": int(test["class_id"].n_unique()),
        "chance_top1": 1.0 / len(classes),
        "checkpoint_epoch": int(ckpt.get("epoch", 0)),
    }
    for g in GROUPS:  # a group without test classes is left out (JSON has no NaN), its class count is 0
        if g in by_group:
            metrics[f"test_{g}_acc"] = by_group[g]["acc"]
        metrics[f"test_{g}_classes"] = by_group.get(g, {}).get("classes", 0)
    return metrics


def _write_class_tables(
    out: EvalOutputs,
    classes: list[str],
    labels: np.ndarray,
    pred: np.ndarray,
    per_class: np.ndarray,
    train_counts: np.ndarray,
    groups: list[str],
    n_pairs: int,
) -> None:
    """The per-class accuracy table and the most frequent confusions (DVC plots)."""
    n_test = np.bincount(labels, minlength=len(classes))
    _write_csv(
        out.per_class,
        ["class_name", "train_images", "test_images", "test_acc", "frequency"],
        [
            [name, int(train_counts[c]), int(n_test[c]), f"{per_class[c]:.4f}", groups[c]]
            for c, name in enumerate(classes)
            if n_test[c]
        ],
    )
    _write_csv(
        out.confused_pairs,
        ["actual", "predicted", "count", "actual_test_images", "rate"],
        [
            [classes[a], classes[p], n, int(n_test[a]), f"{n / n_test[a]:.4f}"]
            for a, p, n in confused_pairs(pred, labels, n_pairs)
        ],
    )


def _summary_line(metrics: dict, top_k: int, n_classes: int, by_group: dict) -> str:
    return (
        f"evaluate: test top-1 {metrics['test_top1']:.3f}, top-{top_k} {metrics[f'test_top{top_k}']:.3f} "
        f"on {metrics['test_images']} images ({n_classes} classes, chance {metrics['chance_top1']:.4f}); "
        f"macro {metrics['test_macro_acc']:.3f} +- {metrics['test_class_acc_std']:.3f}; "
        + ", ".join(f"{g} {by_group[g]['acc']:.3f} ({by_group[g]['classes']} classes)" for g in by_group)
    )


def _test_split(df: pl.DataFrame, classes: list[str], split_manifest: Path, model_file: Path) -> pl.DataFrame:
    """The test rows, their class ids mapped to the checkpoint's by name (the manifest's may differ if data
    changed)."""
    test = df.filter(pl.col("split") == "test")
    if test.height == 0:
        raise ValueError(f"{split_manifest}: the test split is empty")
    unknown = set(test["class_name"]) - set(classes)
    if unknown:
        raise ValueError(
            f"{len(unknown)} test classes are not in the checkpoint {model_file} "
            f"(e.g. {sorted(unknown)[:3]}): re-run train on this split"
        )
    index = {name: i for i, name in enumerate(classes)}
    return test.with_columns(pl.col("class_name").replace_strict(index, return_dtype=pl.Int64).alias("class_id"))


def _track(params: Params, root: Path, model_dir: Path, split_manifest: Path, out: EvalOutputs, metrics: dict) -> None:
    """Log the metrics and files to the MLflow run that trained the model (found by the checkpoint's md5)."""
    from pipeline import tracking

    experiment_id = tracking.setup(params.base, root)
    run = tracking.train_run_of(model_dir / "model.pt", experiment_id)
    if run is None:  # trained elsewhere (another store): the results get a run of their own
        print(f"evaluate: no train run in MLflow wrote {model_dir / 'model.pt'}; logging to a new run", file=sys.stderr)
    with tracking.start_run(
        experiment_id,
        run.info.run_id if run is not None else None,
        run_name=f"evaluate-{model_dir.name}",
        tags={"stage": "evaluate"},
    ):
        # On the train run the evaluate stage's own provenance is namespaced: the run's plain tags are train's.
        tracking.tag_provenance(
            root, f"evaluate@{model_dir.name}", split_manifest, prefix="evaluate." if run is not None else ""
        )
        tracking.log_metrics({k: float(v) for k, v in metrics.items()})
        tracking.log_artifacts_as(
            {"test_metrics.json": out.metrics, "per_class.csv": out.per_class, "confused_pairs.csv": out.confused_pairs}
        )


def _cost(model, img_size: int, device: torch.device) -> dict:
    """GFLOPs of one image (torch's FLOP counter, pipeline/models/profile.py) and GMACs (half of it: the papers'
    unit)."""
    from pipeline.models.profile import count_flops, macs

    flops = count_flops(model, torch.zeros(1, 3, img_size, img_size, device=device))
    return {"gflops": flops / 1e9, "gmacs": macs(flops) / 1e9}


def forward_throughput(model, img_size: int, batch_size: int, device: torch.device, repeats: int = 3) -> float:
    """Forward img/s at batch_size: the best of `repeats` timings (as timeit advises: slower ones measure the
    machine's other load, not the model)."""
    from pipeline.models.profile import measure_throughput

    return max(measure_throughput(model, img_size, batch_size, device, warmup=1, iters=3)[0] for _ in range(repeats))


def _write_predictions(
    path: Path, image_ids: list, labels: np.ndarray, pred: np.ndarray, confidence: np.ndarray, classes: list[str]
) -> None:
    _write_csv(
        path,
        ["image_id", "actual", "predicted", "confidence"],
        [[i, classes[y], classes[p], f"{c:.4f}"] for i, y, p, c in zip(image_ids, labels, pred, confidence)],
    )


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


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
        return cls(
            metrics / "evaluate" / f"{name}.json",
            metrics / "evaluate" / name,
            *(plots / kind / name for kind in ("predictions", "per_class", "confused_pairs", "samples")),
        )

    def of(self, seed: int) -> EvalOutputs:
        return EvalOutputs(
            *(
                seed_dir(folder, seed).with_suffix(ext)
                for folder, ext in (
                    (self.seed_metrics_dir, ".json"),
                    (self.predictions_dir, ".csv"),
                    (self.per_class_dir, ".csv"),
                    (self.confused_pairs_dir, ".csv"),
                    (self.samples_dir, ".npz"),
                )
            )
        )


def evaluate_seeds(
    params: Params, split: Path, images: Path, model_dir: Path, out: EvalSeedOutputs, root: Path
) -> dict:
    """Evaluate each seed's model (model_dir/seed<N>/) on the test split; the summary also goes to the parent run."""
    from pipeline import tracking

    per_seed = {}
    for seed in params.base.seeds:
        one = seed_dir(model_dir, seed)
        if not (one / "model.pt").is_file():
            raise FileNotFoundError(
                f"{one / 'model.pt'}: no model for seed {seed} of base.seeds (run train with the same base.seeds first)"
            )
        per_seed[seed] = evaluate(seed_params(params, seed), split, images, one, out.of(seed), root)
    summary = summarize_seeds(per_seed)
    write_json(out.metrics_file, summary)
    first = seed_dir(model_dir, params.base.seeds[0]) / "model.pt"
    group = tracking.parent_of(tracking.train_run_of(first, tracking.setup(params.base, root)))
    if group is not None:
        tracking.log_seed_summary(group, summary)
    print(
        f"evaluate: test top-1 {summary['test_top1']:.4f} ± {summary['test_top1_std']:.4f} over "
        f"{summary['n_seeds']} seeds ({', '.join(f'{v:.4f}' for v in summary['test_top1_seeds'])})"
    )
    return summary
