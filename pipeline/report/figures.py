"""The report's comparison figures, drawn from VariantResult data (pipeline/report/results.py) with matplotlib.

Every figure uses matplotlib's object API (no pyplot state) and constrained layout, so titles, legends and colour
bars are never clipped; one colour per variant, in params.yaml order, across all figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.figure import Figure

from pipeline.fonts import use_cjk_fallback
from pipeline.inference.explain import draw_selection
from pipeline.io import atomic_path
from pipeline.report.card import thumbnail
from pipeline.report.results import VariantResult

use_cjk_fallback()  # class names in Japanese, Chinese or Korean (titles, labels) get their glyphs

DPI = 110


def colours(results: list[VariantResult]) -> dict[str, tuple]:
    cmap = colormaps["tab10"]
    return {r.name: cmap(i % 10) for i, r in enumerate(results)}


def save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def accuracy_vs_cost(results: list[VariantResult], top_k: int, path: Path) -> Path:
    """Top-1 and top-k against GFLOPs per image; bubble area proportional to trainable parameters."""
    col = colours(results)
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    ax = fig.subplots()
    trainable = np.array([r.train["params_trainable"] for r in results], dtype=float)
    area = 80 + 1600 * trainable / trainable.max()
    gflops = [r.test["gflops"] for r in results]
    for r, a, g in zip(results, area, gflops):
        top1 = 100 * r.test["test_top1"]
        ax.scatter(
            g,
            top1,
            s=a,
            color=col[r.name],
            alpha=0.55,
            edgecolors="black",
            linewidths=0.8,
            label=f"{r.name}: {r.train['params_trainable'] / 1e6:.2f} M trainable",
        )
        ax.scatter(
            g, 100 * r.test[f"test_top{top_k}"], s=40, marker="^", color=col[r.name], edgecolors="black", linewidths=0.5
        )
        radius = np.sqrt(a / np.pi)  # points: the label sits just above the bubble
        ax.annotate(
            r.name, (g, top1), textcoords="offset points", xytext=(0, radius + 2), ha="center", va="bottom", fontsize=9
        )
    if max(gflops) / max(min(gflops), 1e-12) > 8:
        ax.set_xscale("log")
    lo, hi = min(gflops), max(gflops)
    ax.set_xlim(
        lo / 1.6 if ax.get_xscale() == "log" else lo - 0.25 * (hi - lo + 0.1),
        hi * 1.6 if ax.get_xscale() == "log" else hi + 0.25 * (hi - lo + 0.1),
    )
    ax.set_ylim(0, 100)
    ax.set_xlabel("GFLOPs per image (torch FLOP counter, forward at batch 1)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Accuracy vs cost: circles top-1 (area = trainable parameters), triangles top-{top_k}")
    ax.grid(alpha=0.3)
    # Outside the axes: a legend inside could hide a point.
    ax.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, markerscale=0.4, title="variant", title_fontsize=8
    )
    return save(fig, path)


def training_curves(results: list[VariantResult], path: Path) -> Path:
    col = colours(results)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for r in results:
        h = r.history
        loss_ax.plot(h["epoch"], h["train_loss"], color=col[r.name], linestyle="--", label=f"{r.name} train")
        if "val_loss" in h.columns:
            loss_ax.plot(h["epoch"], h["val_loss"], color=col[r.name], marker="o", ms=3, label=f"{r.name} val")
        acc_ax.plot(h["epoch"], 100 * h["train_top1"], color=col[r.name], linestyle="--", label=f"{r.name} train")
        if "val_top1" in h.columns:
            acc_ax.plot(h["epoch"], 100 * h["val_top1"], color=col[r.name], marker="o", ms=3, label=f"{r.name} val")
            best = r.train.get("best_epoch")
            if best:
                acc_ax.scatter(
                    [best],
                    [100 * r.train["best_val_top1"]],
                    s=110,
                    facecolors="none",
                    edgecolors=col[r.name],
                    linewidths=1.5,
                )
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss (dashed: train, dots: val)")
    acc_ax.set(
        xlabel="epoch",
        ylabel="top-1 accuracy (%)",
        ylim=(0, 100),
        title="Top-1 (circled: the epoch kept, chosen on val)",
    )
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncols=2)
    return save(fig, path)


def _accuracy_histogram(ax, results: list[VariantResult], col: dict) -> None:
    """How many classes reach each per-class accuracy, one step outline per variant."""
    for r in results:
        ax.hist(
            100 * r.per_class["test_acc"].to_numpy(),
            bins=np.linspace(0, 100, 11),
            histtype="step",
            linewidth=2,
            color=col[r.name],
            label=r.name,
        )
    ax.set(
        xlabel="test accuracy of a class (%)", ylabel="number of classes", title="Distribution of per-class accuracy"
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def per_class_vs_frequency(results: list[VariantResult], path: Path) -> Path:
    """Left: each class's test accuracy against its training images, with the mean per frequency bin. Right: the
    distribution of per-class accuracy (long-tailed sets: is the tail where a method loses?)."""
    col = colours(results)
    fig = Figure(figsize=(12, 4.6), layout="constrained")
    ax, hist_ax = fig.subplots(1, 2)
    counts = np.unique(np.concatenate([r.per_class["train_images"].to_numpy() for r in results]))
    _accuracy_histogram(hist_ax, results, col)
    if len(counts) == 1:  # one training frequency (the embedded default): one column of classes per variant
        _strips(ax, results, col, int(counts[0]))
        return save(fig, path)
    spread = counts.max() / max(counts.min(), 1) > 8
    rng = np.random.default_rng(0)  # jitter only: points of equal count stay readable
    bins = frequency_bins(counts, spread)
    for i, r in enumerate(results):
        x = r.per_class["train_images"].to_numpy().astype(float)
        y = 100 * r.per_class["test_acc"].to_numpy()
        offset = (i - (len(results) - 1) / 2) * 0.08
        jitter = (
            x * np.exp(offset + rng.uniform(-0.03, 0.03, len(x)))
            if spread
            else x + offset * 4 + rng.uniform(-0.08, 0.08, len(x))
        )
        ax.scatter(jitter, y, s=10, alpha=0.35, color=col[r.name])
        which = np.digitize(x, bins[1:-1])
        centres = [x[which == b].mean() for b in range(len(bins) - 1) if (which == b).any()]
        means = [y[which == b].mean() for b in range(len(bins) - 1) if (which == b).any()]
        ax.plot(
            np.array(centres) * (np.exp(offset) if spread else 1) + (0 if spread else offset * 4),
            means,
            marker="D",
            ms=7,
            color=col[r.name],
            markeredgecolor="black",
            label=f"{r.name}: mean {np.mean(y):.1f} % over {len(y)} classes",
        )
    if spread:
        ax.set_xscale("log")
    ax.set(
        xlabel="training images of the class" + (" (log scale)" if spread else ""),
        ylabel="test accuracy of the class (%)",
        ylim=(-5, 105),
        title="Per-class accuracy vs training frequency",
    )
    ax.legend(fontsize=8, loc="best", title="diamonds: mean per frequency bin", title_fontsize=8)
    ax.grid(alpha=0.3)
    return save(fig, path)


def _strips(ax, results: list[VariantResult], col: dict, count: int) -> None:
    """Every class has the same training count: a jittered column of per-class accuracies per variant."""
    rng = np.random.default_rng(0)
    for i, r in enumerate(results):
        y = 100 * r.per_class["test_acc"].to_numpy()
        ax.scatter(i + rng.uniform(-0.2, 0.2, len(y)), y, s=10, alpha=0.35, color=col[r.name])
        ax.scatter(
            [i],
            [y.mean()],
            s=70,
            marker="D",
            color=col[r.name],
            edgecolors="black",
            zorder=3,
            label=f"{r.name}: mean {y.mean():.1f} % over {len(y)} classes",
        )
    ax.set_xticks(range(len(results)), [r.name for r in results])
    ax.set(
        xlabel=f"variant (every class has {count} training images: no frequency axis to draw)",
        ylabel="test accuracy of the class (%)",
        ylim=(-5, 105),
        xlim=(-0.6, len(results) - 0.4),
        title="Per-class test accuracy",
    )
    ax.legend(fontsize=8, loc="center right", title="diamonds: mean over classes", title_fontsize=8)
    ax.grid(alpha=0.3)


def frequency_bins(counts: np.ndarray, spread: bool) -> np.ndarray:
    """Edges of at most 8 frequency bins over the distinct training counts (log-spaced for long tails)."""
    if len(counts) <= 8:
        mids = (counts[:-1] + counts[1:]) / 2
        return np.concatenate([[counts[0] - 0.5], mids, [counts[-1] + 0.5]])
    if spread:
        return np.geomspace(max(counts.min(), 1) * 0.999, counts.max() * 1.001, 9)
    return np.linspace(counts.min() - 0.5, counts.max() + 0.5, 9)


def glsim_grid(result: VariantResult, path: Path) -> Path | None:
    """One row per stored test image: the input, the CLS-patch similarity with the top-k patches and the box, and
    the crop the second pass saw; None for a variant without GLSim selection data."""
    s = result.samples
    if "similarity" not in s or len(s["image_id"]) == 0:
        return None
    n = len(s["image_id"])
    fig = Figure(figsize=(9.5, 2.9 * n + 0.6), layout="constrained")
    fig.suptitle(
        f"GLSim selection of {result.name} on {n} test images ({s['selected'].shape[1]} patches, "
        f"box rule {s['box_rule']})"
    )
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        heat = draw_selection(
            axes[i],
            s["image"][i],
            s["crop"][i],
            s["similarity"][i],
            s["selected"][i],
            s["box"][i],
            tuple(s["patch_px"]),
            str(s["box_rule"]),
            legend=i == 0,
        )
        mark = "correct" if s["actual"][i] == s["predicted"][i] else "wrong"
        axes[i][0].set_title(f"true: {_short(s['actual'][i])}", fontsize=9)
        axes[i][1].set_title(f"predicted: {_short(s['predicted'][i])} ({s['confidence'][i]:.2f}, {mark})", fontsize=9)
        x0, y0, x1, y1 = (int(v) for v in s["box"][i])
        axes[i][2].set_title(f"crop {x1 - x0}x{y1 - y0} px, re-encoded", fontsize=9)
        fig.colorbar(heat, ax=axes[i][1], shrink=0.85, label="cos(CLS, patch)")
    return save(fig, path)


def confusions(result: VariantResult, split: pl.DataFrame, image_root: Path, n: int, path: Path) -> Path | None:
    """The n most frequent mistakes: a misclassified test image next to a training image of the class it was taken
    for. None when the variant made no mistake."""
    pairs = result.confused_pairs.head(n)
    if pairs.height == 0:
        return None
    wrong = result.predictions.filter(pl.col("actual") != pl.col("predicted"))
    paths = dict(split.select(pl.col("image_id").cast(pl.String), "path").iter_rows())
    train = split.filter(pl.col("split") == "train")
    fig = Figure(figsize=(6.4, 2.7 * pairs.height + 0.5), layout="constrained")
    fig.suptitle(f"{result.name}: most frequent confusions on the test split")
    axes = fig.subplots(pairs.height, 2, squeeze=False)
    for row, (actual, predicted, count, n_test) in enumerate(
        pairs.select("actual", "predicted", "count", "actual_test_images").iter_rows()
    ):
        example = (
            wrong.filter((pl.col("actual") == actual) & (pl.col("predicted") == predicted))
            .sort("confidence", descending=True)
            .head(1)
        )
        other = train.filter(pl.col("class_name") == predicted).head(1)
        left = thumbnail(image_root, paths.get(example["image_id"][0]), 160) if example.height else None
        right = thumbnail(image_root, other["path"][0], 160) if other.height else None
        for ax, img, title in (
            (axes[row][0], left, f"test image of {_short(actual)}\n({count} of its {n_test} taken for the right)"),
            (axes[row][1], right, f"a training image of\n{_short(predicted)}"),
        ):
            if img is not None:
                ax.imshow(img)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    return save(fig, path)


def _short(name: str, width: int = 34) -> str:
    name = str(name)
    return name if len(name) <= width else name[: width - 1] + "…"
