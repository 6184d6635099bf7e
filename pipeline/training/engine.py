"""The training engine: one function that the `train` stage (and sweeps) call.

Reads the split manifest, builds the model by name, trains with timm's optimizer and scheduler factories on
albumentations pipelines, selects the best epoch on val (never on test), tracks everything in MLflow and writes
the checkpoint, DVC metrics and the per-epoch history. `train.recipe` fills in a paper's hyper-parameters
(pipeline/config.py RECIPES).

Killed runs resume: after every epoch the full state (model, optimiser, scheduler, RNG, history, MLflow run id) is
written atomically to `train.checkpoint_dir/<run key>/` (see checkpoint.py). Every epoch reseeds from (seed, epoch),
so the resumed run ends with the same metrics as an uninterrupted one.

The same function runs data-parallel under `torchrun --nproc-per-node N stages/train.py ...` (distributed.py):
train.batch_size stays the global batch, only rank 0 writes, and a run may resume with another process count.
"""

from __future__ import annotations

import contextlib
import csv
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline import tracking
from pipeline.config import RECIPES, Params, TrainParams, flatten
from pipeline.data import device_decode, manifest
from pipeline.data.dataset import STREAM_TORCH, EpochSampler, ManifestDataset, sample_seed
from pipeline.data.device_decode import DeviceDecoder, EncodedDataset
from pipeline.data.prefetch import DeviceLoader
from pipeline.data.registry import source_dataset
from pipeline.data.transforms import (
    batch_augment,
    data_config,
    eval_batch_augment,
    eval_resize,
    eval_transform,
    train_transform,
)
from pipeline.io import atomic_path, md5_file, write_json, write_text
from pipeline.models import build_model, describe_weights, model_options, save_checkpoint
from pipeline.models.profile import count_params
from pipeline.progress import progress
from pipeline.runtime import autocast, fused_optimizer_kwargs, resolve_device, seed_everything, synchronize
from pipeline.training import checkpoint, distributed
from pipeline.training.distributed import Dist
from pipeline.training.metrics import summarize

CACHE_LIMIT = 20_000  # decode-once cache for sets up to this many images (the embedded default has ~1k)


@dataclass(frozen=True)
class TrainOutputs:
    model_dir: Path  # model.pt (best checkpoint), config.yaml (resolved params); the MLflow run is found by md5
    metrics_file: Path  # DVC metrics: best val accuracy, epochs, timing
    history_file: Path  # DVC plots: one row per epoch


def make_loader(
    ds: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    workers: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    collate_fn=None,
) -> DataLoader:
    """Order and augmentation come from EpochSampler's (index, epoch) keys: call loader.sampler.set_epoch(e).
    `batch_size` is per process; evaluation shards are padded to equal length (see EpochSampler)."""
    sampler = EpochSampler(len(ds), shuffle=train, seed=seed, rank=rank, world_size=world_size, pad=not train)
    return DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(sampler) > batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        worker_init_fn=_worker_init if workers > 0 else None,
        collate_fn=collate_fn,
    )


def _worker_init(worker_id: int) -> None:
    """One OpenCV thread per worker: the workers are the parallelism (N workers x N OpenCV threads thrash)."""
    import cv2

    cv2.setNumThreads(1)


def device_loaders(
    cfg: TrainParams,
    base,
    tr_df: pl.DataFrame,
    va_df: pl.DataFrame,
    image_root: Path,
    dcfg: dict,
    device: torch.device,
    d: Dist,
    channels_last: bool,
    cache: bool,
) -> tuple[DeviceLoader, ...]:
    """(train, val) loaders whose workers decode and crop to uint8; normalisation and erasing run on `device`."""
    per_rank = cfg.batch_size // d.world
    aug = batch_augment(cfg, dcfg)
    crop = train_transform(cfg, dcfg, base.seed)
    if cfg.decode == "device":  # workers read bytes and draw parameters; the device decodes and crops
        train_ds, collate, decoder = (
            EncodedDataset(tr_df, image_root, crop, aug, base.seed),
            device_decode.collate,
            DeviceDecoder(crop.size, crop.big, dcfg["interpolation"]),
        )
    else:
        train_ds, collate, decoder = ManifestDataset(tr_df, image_root, crop, cache, base.seed, aug), None, None
    val_ds = ManifestDataset(va_df, image_root, eval_transform(cfg.img_size, dcfg, normalize=False), cache)
    train = make_loader(train_ds, per_rank, True, base.seed, cfg.num_workers, device, d.rank, d.world, collate)
    val = make_loader(val_ds, per_rank, False, base.seed, cfg.num_workers, device, d.rank, d.world)
    return (
        DeviceLoader(train, device, aug, channels_last, decoder),
        DeviceLoader(val, device, eval_batch_augment(dcfg)),
    )  # NCHW, as evaluate predicts


def use_channels_last(method: str, backbone_cnn: str | None = None) -> bool:
    """NHWC for CNNs on every device: tensor cores on CUDA, and oneDNN on CPU (tf_efficientnet_lite0, 96 px,
    batch 32, 2 threads: 1.7x the NCHW training step), and so for a hybrid ViT's CNN patch embedding (GLSim over
    test_vit + lite0: 1.8x). A plain ViT is matmuls on token sequences: no effect there."""
    return method == "cnn" or backbone_cnn is not None


def train_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.Module,
    device: torch.device,
    precision: str,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step; returns (loss, logits). `python -m pipeline bench` times exactly this function.

    grad_clip bounds the L2 norm of all gradients together (GLSim: 1.0); under DDP the gradients are already
    averaged over ranks here, so every rank clips identically. fp16 needs the scaler (loss scaling), and clipping
    then works on the unscaled gradients."""
    with autocast(device, precision):
        logits = model(x)
        loss = loss_fn(logits, y)
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if grad_clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
        scaler.update()
    return loss, logits


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    desc: str = "eval",
    bar: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) as float32 numpy and labels (N,), in loader order."""
    model.eval()
    logits, labels = [], []
    for x, y in progress(loader, desc=desc, unit="batch", leave=False, disable=not bar):
        with autocast(device, precision):
            out = model(x.to(device, non_blocking=True))
        logits.append(out.float().cpu().numpy())
        labels.append(y.cpu().numpy())
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def recipe_overrides(cfg: TrainParams) -> dict[str, tuple]:
    """{key: (value used, recipe value)} for the recipe's keys that params.yaml set differently."""
    preset = RECIPES.get(cfg.recipe or "", {})
    return {k: (getattr(cfg, k), v) for k, v in preset.items() if getattr(cfg, k) != v}


def class_names(df: pl.DataFrame) -> list[str]:
    """Class names indexed by class_id (ids are contiguous after `clean`)."""
    pairs = df.select("class_id", "class_name").unique().sort("class_id")
    if pairs["class_id"].to_list() != list(range(pairs.height)):
        raise manifest.ManifestError("class_id must be contiguous 0..C-1 with one name each (run `clean`)")
    return pairs["class_name"].to_list()


def run_key(params: Params, split_md5: str, variant: str | None = None) -> str:
    """What decides the result: train params (minus where/how to checkpoint), seed, device, the split's content.
    The process count is not part of it: the global batch is, so a killed run may resume with other N. The variant
    name is: two variants with equal settings are two MLflow runs, and one must not resume the other's."""
    flat = checkpoint.result_params(flatten(params))
    if variant is not None:
        flat["variant"] = variant
    return checkpoint.run_key(flat, split_md5)


def train(
    params: Params,
    split_manifest: Path,
    image_root: Path,
    outputs: TrainOutputs,
    root: Path,
    *,
    on_epoch: Callable[[dict], None] | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    on_timing: Callable[[dict], None] | None = None,
) -> dict:
    """Train `params.train` on the train split, select on val; returns the summary that is also written.

    Sweeps (pipeline/tuning) call this same function: `on_epoch(row)` receives each epoch's history row after it is
    logged (a Ray Tune trial reports it; raising there stops the run), `run_name` and `tags` name the MLflow run
    (e.g. `mlflow.parentRunId` nests a trial under its sweep). Under torchrun every process calls it; on_epoch runs
    on rank 0 only. `on_timing({"epoch", "train_seconds", "images"})` gets each epoch's training pass (no validation,
    device-synchronised) on rank 0: `gpu-check` measures the engine with it.
    """
    d, device = distributed.setup(resolve_device(params.base.device))
    try:
        hooks = _Hooks(on_epoch, on_timing, run_name, tags or {})
        return _Trainer(params, split_manifest, image_root, outputs, root, d, device, hooks).run()
    finally:
        distributed.teardown(d)


@dataclass(frozen=True)
class _Hooks:
    """What a caller (a sweep trial, gpu-check) adds to a run: callbacks, and the MLflow run's name and tags."""

    on_epoch: Callable[[dict], None] | None
    on_timing: Callable[[dict], None] | None
    run_name: str | None
    tags: dict[str, str]


@dataclass
class _Data:
    classes: list[str]
    train: pl.DataFrame
    val: pl.DataFrame
    cache: bool  # decode-once cache (small sets only)


@dataclass
class _Progress:
    """Everything an epoch advances; the resumable state (checkpoint.py) stores it."""

    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"val_top1": -1.0, "epoch": 0})
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    epoch: int = 0  # the last finished epoch
    run_id: str | None = None


class _Trainer:
    """One training run in phases: data, model, loaders, restore, then per epoch train + validate + checkpoint, and
    finish. The order of the phases is the order the random streams are drawn in: keep it."""

    def __init__(
        self,
        params: Params,
        split_manifest: Path,
        image_root: Path,
        outputs: TrainOutputs,
        root: Path,
        d: Dist,
        device: torch.device,
        hooks: _Hooks,
    ):
        self.params, self.cfg, self.base = params, params.train, params.base
        self.split_manifest, self.image_root, self.outputs, self.root = split_manifest, image_root, outputs, root
        self.d, self.device, self.hooks = d, device, hooks
        self.progress = _Progress()

    def run(self) -> dict:
        cfg, d = self.cfg, self.d
        if cfg.batch_size % d.world:
            raise ValueError(
                f"train.batch_size: {cfg.batch_size} images per step do not split evenly over {d.world} "
                "processes (it is the global batch)"
            )
        # The cores are shared by the processes of one machine.
        seed_everything(self.base.seed, max(1, self.base.threads // d.local_world), self.device)
        self.data = self._data()
        self._model()
        self.train_loader, self.val_loader = self._loaders()
        self._optimization()
        if d.main:
            self._write_config()
        split_md5 = md5_file(self.split_manifest)  # once: the run key and the MLflow tag
        self.ckpt_dir = self.root / cfg.checkpoint_dir / run_key(self.params, split_md5, self.hooks.tags.get("variant"))
        self._restore()
        distributed.barrier(d)  # every rank has read the state before rank 0 may overwrite it
        start = self.progress.epoch + 1
        _begin_epoch(self.train_loader, self.base.seed, start, d)  # workers spawn and fill while the rest is set up
        self.net = distributed.wrap(self.model, d, self.device, cfg.sync_bn)
        if cfg.compile:
            self.net = torch.compile(self.net)
        t0 = time.perf_counter()
        with self._tracked_run(split_md5) as run:
            for epoch in range(start, cfg.epochs + 1):
                if epoch != start:
                    _begin_epoch(self.train_loader, self.base.seed, epoch, d)
                row, epoch_seconds = self._epoch(epoch)
                self._checkpoint(row, epoch, epoch_seconds, run)
            seconds = time.perf_counter() - t0
            summary = self._finish()
        distributed.barrier(d)  # the other ranks leave only once rank 0 has written everything
        if d.main:
            self._cleanup(seconds, run)
        return summary

    def _data(self) -> _Data:
        df = manifest.read(self.split_manifest)
        classes = class_names(df)
        tr_df, va_df = df.filter(pl.col("split") == "train"), df.filter(pl.col("split") == "val")
        if tr_df.height == 0:
            raise ValueError(f"{self.split_manifest}: the train split is empty")
        return _Data(classes, tr_df, va_df, df.height <= CACHE_LIMIT and self.cfg.decode_cache)

    def _model(self) -> None:
        cfg = self.cfg
        model = build_model(
            cfg.method,
            cfg.model,
            len(self.data.classes),
            cfg.weights,
            cfg.img_size,
            root=self.root,
            **model_options(cfg, source_dataset(self.params.acquire)),
        )
        self.dcfg = {**data_config(model), **eval_resize(cfg)}  # in the checkpoint: evaluate resizes the same way
        self.channels_last = use_channels_last(cfg.method, cfg.backbone_cnn)
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.n_params, self.n_trainable = count_params(model)
        self.meta = {
            "classes": self.data.classes,
            "data_config": self.dcfg,
            "precision": cfg.precision,  # evaluate predicts as it trained
            "model_spec": model.spec.as_dict(),
        }  # what load_checkpoint rebuilds

    def _loaders(self) -> tuple[DeviceLoader, DeviceLoader]:
        """(train, val) loaders over the split, on the run's device."""
        return device_loaders(
            self.cfg,
            self.base,
            self.data.train,
            self.data.val,
            self.image_root,
            self.dcfg,
            self.device,
            self.d,
            self.channels_last,
            self.data.cache,
        )

    def _optimization(self) -> None:
        cfg = self.cfg
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, len(self.train_loader), self.device)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.precision == "fp16" else None
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def _write_config(self) -> None:
        """Rank 0: what this model trained with, the variant folded into `train`, tuned values applied (the report
        reads it)."""
        cfg = self.cfg
        self.outputs.model_dir.mkdir(parents=True, exist_ok=True)
        resolved = self.params.model_dump(mode="json", exclude={"variants"})
        write_text(self.outputs.model_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        if cfg.recipe:
            over = recipe_overrides(cfg)
            print(
                f"train: recipe {cfg.recipe}"
                + (
                    ", params.yaml overrides " + ", ".join(f"{k}={v!r} (recipe {r!r})" for k, (v, r) in over.items())
                    if over
                    else ""
                ),
                flush=True,
            )

    def _restore(self) -> None:
        """Continue a killed run from its resumable state (train.resume), if one is there."""
        state = checkpoint.load_state(self.ckpt_dir / "last.pt") if self.cfg.resume else None
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        self.progress = _Progress(
            state["history"],
            state["best"],
            state["step"],
            state["images_seen"],
            state["train_seconds"],
            state["epoch"],
            state["run_id"],
        )
        if self.d.main:
            print(
                f"train: resuming after epoch {state['epoch']}/{self.cfg.epochs} from {self.ckpt_dir / 'last.pt'}",
                flush=True,
            )

    def _tracked_run(self, split_md5: str):
        """Rank 0's MLflow run (a resumed run continues its own), tagged once; other ranks track nothing."""
        if not self.d.main:
            return contextlib.nullcontext()
        cfg, p = self.cfg, self.progress
        experiment_id = tracking.setup(self.base, self.root)
        run = tracking.start_or_resume_run(experiment_id, p.run_id, self.hooks.run_name or f"{cfg.method}-{cfg.model}")
        if p.run_id is None:
            tracking.log_params({k: v for k, v in flatten(self.params).items() if not k.startswith("variants.")})
            tracking.set_tags(
                {
                    "git_commit": tracking.git_commit(self.root),
                    "split_manifest_md5": split_md5,
                    "device": str(self.device),
                    "torch": torch.__version__,
                    "timm": _timm_version(),
                    "stage": "train",
                    "method": cfg.method,
                    "model": cfg.model,
                    "recipe": cfg.recipe or "none",
                    "processes": str(self.d.world),
                    "weights": describe_weights(cfg.model, cfg.weights, cfg.backbone_cnn),
                    **self.hooks.tags,
                }
            )
            tracking.tag_provenance(self.root, tracking.stage_name("train", self.hooks.tags), self.split_manifest)
            tracking.log_params(
                {
                    "params_total": self.n_params,
                    "params_trainable": self.n_trainable,
                    "num_classes": len(self.data.classes),
                }
            )
        return run

    def _epoch(self, epoch: int) -> tuple[dict, float]:
        """Train one epoch, then validate: (history row, seconds)."""
        d, p, device = self.d, self.progress, self.device
        self.net.train(not getattr(self.model, "frozen_backbone", False))  # a linear probe keeps BatchNorm
        # statistics and dropout of the backbone fixed
        te = time.perf_counter()
        loss_sum, correct, seen, p.step = _train_epoch(
            self.net,
            self.train_loader,
            self.optimizer,
            self.scheduler,
            self.loss_fn,
            device,
            self.cfg,
            p.step,
            self.scaler,
            self.channels_last,
            d,
            epoch,
        )
        synchronize(device)
        pass_seconds = time.perf_counter() - te
        loss_sum, correct, seen = distributed.sum_all([loss_sum, correct, seen], d, device)
        p.images_seen, p.train_seconds = p.images_seen + int(seen), p.train_seconds + time.perf_counter() - te
        if self.hooks.on_timing is not None and d.main:
            self.hooks.on_timing({"epoch": epoch, "train_seconds": pass_seconds, "images": int(seen)})
        row = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_top1": correct / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
        }
        epoch_seconds = time.perf_counter() - te
        distributed.sync_buffers(self.model, d)  # one set of BatchNorm statistics for validation and checkpoints
        if self.data.val.height:
            row |= validate(
                self.model,
                self.val_loader,
                self.data.val.height,
                len(self.data.classes),
                self.cfg.precision,
                device,
                d,
                self.params.evaluate.top_k,
            )
        return row, epoch_seconds

    def _checkpoint(self, row: dict, epoch: int, epoch_seconds: float, run) -> None:
        """Record the epoch: history, best epoch (val top-1), and on rank 0 MLflow, best.pt and the resumable
        state."""
        p = self.progress
        p.history.append(row)
        p.epoch = epoch
        score = row.get("val_top1", float(epoch))  # without a val split the last epoch is kept
        improved = score > p.best["val_top1"]
        if improved:
            p.best = {"val_top1": score, "epoch": epoch}
        if not self.d.main:
            return
        # Seconds go to MLflow only: in the DVC outputs they would change every rerun's hashes.
        tracking.log_metrics(
            {**{k: v for k, v in row.items() if k != "epoch"}, "epoch_seconds": epoch_seconds}, step=epoch
        )
        if improved:
            save_checkpoint(self.ckpt_dir / "best.pt", self.model, {**self.meta, "epoch": epoch})
        checkpoint.save_state(
            self.ckpt_dir / "last.pt",
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            epoch=epoch,
            step=p.step,
            history=p.history,
            best=p.best,
            images_seen=p.images_seen,
            train_seconds=p.train_seconds,
            run_id=run.info.run_id,
        )
        print(
            f"epoch {epoch}/{self.cfg.epochs}  loss {row['train_loss']:.3f}  train {row['train_top1']:.3f}"
            + (f"  val {row['val_top1']:.3f}" if "val_top1" in row else "")
            + f"  ({epoch_seconds:.1f}s)",
            flush=True,
        )
        if self.hooks.on_epoch is not None:
            self.hooks.on_epoch(row)

    def _finish(self) -> dict:
        """The summary (a DVC metrics file: only what the same inputs reproduce; timings go to MLflow) and, on rank
        0, the DVC outputs and their MLflow copies."""
        p, data = self.progress, self.data
        summary = {
            "best_epoch": p.best["epoch"],
            "epochs": self.cfg.epochs,
            "train_images": data.train.height,
            "val_images": data.val.height,
            "num_classes": len(data.classes),
            "params_total": self.n_params,
            "params_trainable": self.n_trainable,
            "processes": self.d.world,
        }
        if data.val.height:
            summary["best_val_top1"] = p.best["val_top1"]
        timings = {
            "train_seconds": round(p.train_seconds, 2),
            "train_img_per_s": round(p.images_seen / max(p.train_seconds, 1e-9), 2),
        }
        if self.d.main:
            _write_outputs(self.ckpt_dir, self.outputs, p.history, summary, timings)
        return summary

    def _cleanup(self, seconds: float, run) -> None:
        """Rank 0, finished: the resumable state has served its purpose."""
        cfg, best = self.cfg, self.progress.best
        shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        print(
            f"train: {cfg.method}/{cfg.model} {len(self.data.classes)} classes, best epoch {best['epoch']}"
            + (f" val top-1 {best['val_top1']:.3f}" if self.data.val.height else "")
            + f", {seconds:.0f}s"
            + (f" on {self.d.world} processes" if self.d.enabled else "")
            + f", MLflow run {run.info.run_id}"
        )


def _begin_epoch(loader: DeviceLoader, seed: int, epoch: int, d: Dist) -> None:
    """Seed the epoch and start its data pass. Everything random in an epoch derives from (seed, epoch): resuming
    there replays it exactly. Ranks get their own torch stream (stochastic depth, dropout); rank 0's is the
    single-process one. The loader starts after the seed: its iterator draws its workers' base seed from it."""
    torch.manual_seed(sample_seed(seed, epoch, d.rank, stream=STREAM_TORCH))
    loader.sampler.set_epoch(epoch)
    loader.start()


def make_optimizer(model: nn.Module, cfg: TrainParams, updates_per_epoch: int, device: torch.device | None = None):
    """timm's optimizer and per-step cosine schedule (warm-up from 1e-6, as GLSim's trainer)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    # Given the model, timm skips frozen parameters and exempts biases and norms from weight decay. The update
    # kernel: fused on CUDA (one kernel for all tensors), foreach elsewhere (CPU: torch does not enable it itself).
    kernel = fused_optimizer_kwargs(device or torch.device("cpu"), cfg.optimizer)
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **kernel)
    # timm counts warm-up in epochs and multiplies by updates_per_epoch for per-step schedules: a step count
    # becomes a fraction of an epoch.
    warmup = cfg.warmup_epochs if cfg.warmup_steps is None else cfg.warmup_steps / updates_per_epoch
    # timm's default (warmup_prefix=False), as the GLSim/ILA trainers use it: the cosine spans the whole run and the
    # warm-up overlays its start, so the lr peaks a little below train.lr when the warm-up ends.
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        warmup_epochs=warmup,
        warmup_lr=1e-6,
        min_lr=cfg.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return optimizer, scheduler


def _train_epoch(
    net: nn.Module,
    loader: DeviceLoader,
    optimizer,
    scheduler,
    loss_fn: nn.Module,
    device: torch.device,
    cfg: TrainParams,
    step: int,
    scaler,
    channels_last: bool,
    d: Dist,
    epoch: int,
) -> tuple[float, int, int, int]:
    """One pass over this rank's shard; returns (loss sum, correct, images, global step) of this rank.

    The sums stay on the device and are read once per epoch: a per-step .item() would make the CPU wait for the
    GPU after every step. The progress bar shows the loss every 10 steps (one read each)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    bar = progress(loader, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, disable=not d.main)
    for x, y in bar:  # on the device already, normalised and augmented (DeviceLoader)
        loss, logits = train_step(net, x, y, optimizer, loss_fn, device, cfg.precision, cfg.grad_clip, scaler)
        step += 1
        scheduler.step_update(num_updates=step)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if d.main and step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return loss_sum.item(), int(correct.item()), seen, step


def validate(
    model: nn.Module,
    loader: DataLoader,
    n: int,
    num_classes: int,
    precision: str,
    device: torch.device,
    d: Dist,
    top_k: int = 5,
) -> dict:
    """Val loss/top-1/top-k (evaluate.top_k) over the whole val split: each rank predicts its shard, all ranks get
    all logits."""
    logits, labels = predict(model, loader, device, precision, desc="val", bar=d.main)
    logits, labels = distributed.gather_rows(logits, n, d, device), distributed.gather_rows(labels, n, d, device)
    s = summarize(logits, labels, num_classes, top_k)
    loss = nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    return {"val_loss": float(loss), "val_top1": s["top1"], f"val_top{top_k}": s[f"top{top_k}"]}


def _write_outputs(ckpt_dir: Path, outputs: TrainOutputs, history: list[dict], summary: dict, timings: dict) -> None:
    """Rank 0: the DVC outputs (best checkpoint, history, metrics) and their MLflow copies. The run is tagged with
    the checkpoint's md5, which is how evaluate, report and predict find it (no run id in the DVC outputs)."""
    shutil.copyfile(ckpt_dir / "best.pt", outputs.model_dir / "model.pt")
    _write_history(outputs.history_file, history)
    write_json(outputs.metrics_file, summary)
    tracking.set_tags({tracking.MODEL_MD5_TAG: md5_file(outputs.model_dir / "model.pt")})
    tracking.log_metrics(
        {
            k: float(v)
            for k, v in {**summary, **timings}.items()
            if k in ("best_val_top1", "train_seconds", "train_img_per_s")
        }
    )
    tracking.log_artifacts_as(
        {
            "config.yaml": outputs.model_dir / "config.yaml",
            "model.pt": outputs.model_dir / "model.pt",
            "train_history.csv": outputs.history_file,
            "train_metrics.json": outputs.metrics_file,
        }
    )


def _write_history(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def _timm_version() -> str:
    import timm

    return timm.__version__
