"""The training engine: one function that the `train` stage (and later sweeps) call.

Reads the split manifest, builds the model by name, trains with timm's optimizer and scheduler factories on
albumentations pipelines, selects the best epoch on val (never on test), tracks everything in MLflow and writes
the checkpoint, DVC metrics and the per-epoch history.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader
from pipeline.progress import progress

from pipeline.config import Params, flatten
from pipeline.data import manifest
from pipeline.data.dataset import ManifestDataset
from pipeline.data.transforms import data_config, eval_transform, train_transform
from pipeline.io import md5_file, write_json, write_text
from pipeline.models import build_model, save_checkpoint
from pipeline.training.metrics import summarize

CACHE_LIMIT = 20_000  # decode-once cache for sets up to this many images (the embedded default has ~1k)


@dataclass(frozen=True)
class TrainOutputs:
    model_dir: Path  # model.pt (best checkpoint), run.json (MLflow ids), config.yaml (resolved params)
    metrics_file: Path  # DVC metrics: best val accuracy, epochs, timing
    history_file: Path  # DVC plots: one row per epoch


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"base.device={spec!r} but CUDA is not available on this machine (use auto or cpu)")
    return torch.device(spec)


def seed_everything(seed: int, threads: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_num_threads(threads)
        # Same seed + same machine -> same weights, so a re-run reproduces dvc.lock's hashes.
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_loader(ds: ManifestDataset, batch_size: int, train: bool, seed: int, workers: int,
                device: torch.device) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=train, drop_last=train and len(ds) > batch_size,
                      num_workers=workers, generator=g, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
            desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) as float32 numpy and labels (N,), in loader order."""
    model.eval()
    logits, labels = [], []
    for x, y in progress(loader, desc=desc, unit="batch", leave=False):
        with autocast(device, precision):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def class_names(df: pl.DataFrame) -> list[str]:
    """Class names indexed by class_id (ids are contiguous after `clean`)."""
    pairs = df.select("class_id", "class_name").unique().sort("class_id")
    if pairs["class_id"].to_list() != list(range(pairs.height)):
        raise manifest.ManifestError("class_id must be contiguous 0..C-1 with one name each (run `clean`)")
    return pairs["class_name"].to_list()


def train(params: Params, split_manifest: Path, image_root: Path, outputs: TrainOutputs, root: Path) -> dict:
    """Train `params.train` on the train split, select on val; returns the summary that is also written."""
    import mlflow

    from pipeline import tracking

    cfg, base = params.train, params.base
    device = resolve_device(base.device)
    seed_everything(base.seed, base.threads, device)
    df = manifest.read(split_manifest)
    classes = class_names(df)
    tr_df, va_df = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "val")
    if tr_df.height == 0:
        raise ValueError(f"{split_manifest}: the train split is empty")

    model = build_model(cfg.method, cfg.model, len(classes), cfg.weights, cfg.img_size, root=root)
    dcfg = data_config(model)
    model = model.to(device)
    cache = df.height <= CACHE_LIMIT
    train_loader = make_loader(ManifestDataset(tr_df, image_root, train_transform(cfg, dcfg, base.seed), cache),
                               cfg.batch_size, True, base.seed, cfg.num_workers, device)
    val_loader = make_loader(ManifestDataset(va_df, image_root, eval_transform(cfg.img_size, dcfg), cache),
                             cfg.batch_size, False, base.seed, cfg.num_workers, device)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer_v2(trainable, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                                       warmup_lr=1e-6, min_lr=cfg.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    frozen = getattr(model, "frozen_backbone", False)

    outputs.model_dir.mkdir(parents=True, exist_ok=True)
    write_text(outputs.model_dir / "config.yaml", yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False))
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    meta = {"classes": classes, "data_config": dcfg,
            "model_spec": {"method": cfg.method, "model": cfg.model, "img_size": cfg.img_size}}

    experiment_id = tracking.setup(base, root)
    history: list[dict] = []
    best = {"val_top1": -1.0, "epoch": 0}
    t0 = time.perf_counter()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{cfg.method}-{cfg.model}") as run:
        mlflow.log_params(flatten(params))
        mlflow.set_tags({"git_commit": tracking.git_commit(root), "split_manifest_md5": md5_file(split_manifest),
                         "device": str(device), "torch": torch.__version__, "timm": _timm_version(),
                         "stage": "train", "method": cfg.method, "model": cfg.model})
        mlflow.log_params({"params_total": n_params, "params_trainable": n_trainable, "num_classes": len(classes)})
        write_json(outputs.model_dir / "run.json", {"run_id": run.info.run_id, "experiment_id": experiment_id})
        step, images_seen, train_seconds = 0, 0, 0.0
        for epoch in range(1, cfg.epochs + 1):
            model.train(not frozen)  # a linear probe keeps BatchNorm statistics and dropout of the backbone fixed
            te = time.perf_counter()
            loss_sum, correct, seen = 0.0, 0, 0
            bar = progress(train_loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False)
            for x, y in bar:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast(device, cfg.precision):
                    logits = model(x)
                    loss = loss_fn(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                scheduler.step_update(num_updates=step)
                loss_sum += loss.item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            scheduler.step(epoch)
            images_seen, train_seconds = images_seen + seen, train_seconds + time.perf_counter() - te
            row = {"epoch": epoch, "train_loss": loss_sum / seen, "train_top1": correct / seen,
                   "lr": optimizer.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - te}
            if len(val_loader.dataset):
                logits_v, labels_v = predict(model, val_loader, device, cfg.precision, desc="val")
                row["val_loss"] = float(nn.functional.cross_entropy(torch.from_numpy(logits_v),
                                                                    torch.from_numpy(labels_v)))
                s = summarize(logits_v, labels_v, len(classes))
                row["val_top1"], row["val_top5"] = s["top1"], s["top5"]
            history.append(row)
            mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            score = row.get("val_top1", float(epoch))  # without a val split the last epoch is kept
            if score > best["val_top1"]:
                best = {"val_top1": score, "epoch": epoch}
                save_checkpoint(outputs.model_dir / "model.pt", model, {**meta, "epoch": epoch})
            print(f"epoch {epoch}/{cfg.epochs}  loss {row['train_loss']:.3f}  train {row['train_top1']:.3f}"
                       + (f"  val {row['val_top1']:.3f}" if "val_top1" in row else "")
                       + f"  ({row['epoch_seconds']:.1f}s)", flush=True)

        seconds = time.perf_counter() - t0
        _write_history(outputs.history_file, history)
        summary = {"best_epoch": best["epoch"], "epochs": cfg.epochs, "train_seconds": round(seconds, 2),
                   "train_images": tr_df.height, "val_images": va_df.height, "num_classes": len(classes),
                   "params_total": n_params, "params_trainable": n_trainable,
                   "train_img_per_s": round(images_seen / train_seconds, 2)}
        if va_df.height:
            summary["best_val_top1"] = best["val_top1"]
        write_json(outputs.metrics_file, summary)
        mlflow.log_metrics({k: float(summary[k]) for k in ("best_val_top1", "train_seconds", "train_img_per_s")
                            if k in summary})
        for f in (outputs.model_dir / "config.yaml", outputs.history_file, outputs.metrics_file,
                  outputs.model_dir / "model.pt"):
            mlflow.log_artifact(str(f))
    print(f"train: {cfg.method}/{cfg.model} {len(classes)} classes, best epoch {best['epoch']}"
          + (f" val top-1 {best['val_top1']:.3f}" if va_df.height else "")
          + f", {seconds:.0f}s, MLflow run {run.info.run_id}")
    return summary


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    tmp.replace(path)


def _timm_version() -> str:
    import timm

    return timm.__version__


def load_run(model_dir: Path) -> dict:
    return json.loads((model_dir / "run.json").read_text())
