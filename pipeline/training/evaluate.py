"""The `evaluate` stage: the selected checkpoint on the test split (held-out artists for the default)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.config import Params
from pipeline.data import manifest
from pipeline.data.dataset import ManifestDataset
from pipeline.data.transforms import eval_transform
from pipeline.io import write_json
from pipeline.models import load_checkpoint
from pipeline.training.engine import load_run, make_loader, predict, resolve_device, seed_everything
from pipeline.training.metrics import summarize


def evaluate(params: Params, split_manifest: Path, image_root: Path, model_dir: Path, metrics_file: Path,
             plots_dir: Path, root: Path) -> dict:
    import mlflow

    from pipeline import tracking

    base, cfg = params.base, params.evaluate
    device = resolve_device(base.device)
    seed_everything(base.seed, base.threads, device)
    model, ckpt = load_checkpoint(model_dir / "model.pt", device)
    classes: list[str] = ckpt["classes"]
    df = manifest.read(split_manifest)
    test = df.filter(pl.col("split") == "test")
    if test.height == 0:
        raise ValueError(f"{split_manifest}: the test split is empty")
    unknown = set(test["class_name"]) - set(classes)
    if unknown:
        raise ValueError(f"{len(unknown)} test classes are not in the checkpoint {model_dir / 'model.pt'} "
                         f"(e.g. {sorted(unknown)[:3]}): re-run train on this split")
    # The manifest's class ids may differ from the checkpoint's if data changed: map by name.
    index = {name: i for i, name in enumerate(classes)}
    test = test.with_columns(pl.col("class_name").replace_strict(index, return_dtype=pl.Int64).alias("class_id"))
    loader = make_loader(ManifestDataset(test, image_root, eval_transform(ckpt["model_spec"]["img_size"],
                                                                          ckpt["data_config"])),
                         cfg.batch_size, False, base.seed, 0, device)
    logits, labels = predict(model, loader, device, params.train.precision, desc="test")
    s = summarize(logits, labels, len(classes), cfg.top_k)
    metrics = {"test_top1": s["top1"], f"test_top{cfg.top_k}": s[f"top{cfg.top_k}"],
               "test_macro_acc": s["macro_acc"], "test_class_acc_std": s["class_acc_std"], "test_images": s["n"],
               "test_classes": int(test["class_id"].n_unique()), "chance_top1": 1.0 / len(classes),
               "checkpoint_epoch": int(ckpt.get("epoch", 0))}
    write_json(metrics_file, metrics)

    plots_dir.mkdir(parents=True, exist_ok=True)
    pred = logits.argmax(1)
    prob = _softmax(logits)
    with open(plots_dir / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "actual", "predicted", "confidence"])
        for image_id, y, p, conf in zip(test["image_id"], labels, pred, prob.max(1)):
            w.writerow([image_id, classes[y], classes[p], f"{conf:.4f}"])
    n_train = dict(df.filter(pl.col("split") == "train").group_by("class_name").len().iter_rows())
    with open(plots_dir / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class_name", "train_images", "test_images", "test_acc"])
        for c, name in enumerate(classes):
            n_test = int((labels == c).sum())
            if n_test:
                w.writerow([name, n_train.get(name, 0), n_test, f"{s['per_class'][c]:.4f}"])

    tracking.setup(base, root)
    with mlflow.start_run(run_id=load_run(model_dir)["run_id"]):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifact(str(metrics_file))
        mlflow.log_artifact(str(plots_dir / "per_class.csv"))
    print(f"evaluate: test top-1 {metrics['test_top1']:.3f}, top-{cfg.top_k} {metrics[f'test_top{cfg.top_k}']:.3f} "
          f"on {metrics['test_images']} images ({len(classes)} classes, chance {metrics['chance_top1']:.4f})")
    return metrics


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
