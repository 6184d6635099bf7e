"""Dataset card: what the data is after clean and split, as a Markdown section, a JSON summary and two figures.

The report stage writes it into the report folder, so it is logged to MLflow with the report. Contents: classes,
images per split, the long tail (images per class, sorted, log scale), a sample grid per split, quarantine counts by
reason, near-duplicate groups. Built to stay readable and fast at DAF:re scale (3,263 classes, 463k images): the
long tail is one line per split rather than a bar per class, the group panel falls back to totals per split when
there are too many groups to draw, and the grid shows a seeded sample of classes.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure  # the object API: no pyplot state, no global backend switch (headless-safe)
from matplotlib.ticker import FuncFormatter

from pipeline.data import images, manifest
from pipeline.fonts import use_cjk_fallback
from pipeline.io import write_text

use_cjk_fallback()  # class names in Japanese, Chinese or Korean get their glyphs, not empty boxes

SPLIT_COLORS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
DATASET_FIGURE = "dataset.png"
SAMPLES_FIGURE = "samples.png"
CARD_MD = "dataset_card.md"
CARD_JSON = "dataset_card.json"
MAX_GROUP_BARS = 30  # more groups than this (posts, near-duplicate groups): images per split instead
THUMB = 128  # sample images are shrunk to this before drawing (the figure is ~100 px per cell anyway)


@dataclass(frozen=True)
class Card:
    markdown: str  # the section for the report (figure links relative to the report folder)
    stats: dict  # what the markdown says, as numbers (dataset_card.json)
    figures: list[Path]


def card_stats(df: pl.DataFrame, quarantine: pl.DataFrame, group_col: str) -> dict:
    """Numbers of the card, from the split manifest and the quarantine table."""
    per_class = df.group_by("class_name").len().sort(["len", "class_name"], descending=[True, False])
    counts = per_class["len"]
    splits = {}
    for s in manifest.SPLITS:
        part = df.filter(pl.col("split") == s)
        sizes = part.group_by("class_name").len()["len"]
        splits[s] = {
            "images": part.height,
            "share": round(part.height / max(df.height, 1), 4),
            "classes": part["class_name"].n_unique(),
            "per_class_min": int(sizes.min() or 0),
            "per_class_median": float(sizes.median() or 0),
            "per_class_max": int(sizes.max() or 0),
            "groups": part[group_col].n_unique() if group_col in part.columns else None,
        }
    by_reason = {r: n for r, n in sorted(quarantine.group_by("reason").len().iter_rows())} if quarantine.height else {}
    stats = {
        "classes": per_class.height,
        "images": df.height,
        "splits": splits,
        "images_per_class": {
            "min": int(counts.min() or 0),
            "median": float(counts.median() or 0),
            "mean": round(float(counts.mean() or 0), 1),
            "max": int(counts.max() or 0),
        },
        "largest_classes": [[n, c] for n, c in per_class.head(5).iter_rows()],
        "quarantine": {"total": quarantine.height, "by_reason": by_reason},
    }
    if "dup_group" in df.columns:
        multi = df.group_by("dup_group").len().filter(pl.col("len") > 1)
        stats["near_duplicate_groups"] = {"groups": multi.height, "images": int(multi["len"].sum())}
    return stats


# --- figures ------------------------------------------------------------------------------------------------------


def _long_tail(ax, df: pl.DataFrame) -> None:
    """Images per class, classes sorted by their total; one line per split on the same class order, log scale."""
    table = (
        df.group_by("class_name")
        .agg(pl.len().alias("total"), *[(pl.col("split") == s).sum().alias(s) for s in manifest.SPLITS])
        .sort(["total", "class_name"], descending=[True, False])
    )
    x = np.arange(1, table.height + 1)
    ax.plot(x, table["total"].to_numpy(), color="black", lw=1.6, label="all")
    for s in manifest.SPLITS:
        y = table[s].to_numpy().astype(float)
        y[y == 0] = np.nan  # log scale: a class missing from a split leaves a gap, not a drop to -inf
        ax.plot(x, y, color=SPLIT_COLORS[s], lw=1.0, alpha=0.9, label=s)
    ax.set_yscale("log")
    if table.height > 200:
        ax.set_xscale("log")  # thousands of classes: the head and the tail both stay visible
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20, 100, 1000 rather than 2x10^1
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
    top = max(float(table["total"].max() or 1), 1.0)
    # Under one decade (the emoji set: 1-4 per class) the minor ticks are the only ones between the powers of ten.
    ax.yaxis.set_minor_formatter(plain if top < 10 else FuncFormatter(lambda v, _: ""))
    ax.set_ylim(0.8, top * 2.5)  # head-room above the largest class for the legend
    ax.set_xlabel("class rank (sorted by images)")
    ax.set_ylabel("images per class (log scale)")
    ax.set_title(f"Long tail: {table.height} classes, {df.height} images")
    ax.legend(fontsize=8, ncols=4, loc="upper right")
    ax.grid(alpha=0.3, which="both")


def _per_group(ax, df: pl.DataFrame, group_col: str) -> None:
    groups = df[group_col].cast(pl.String).unique().sort().to_list() if group_col in df.columns else []
    if not groups or len(groups) > MAX_GROUP_BARS:
        vals = [df.filter(pl.col("split") == s).height for s in manifest.SPLITS]
        ax.bar(manifest.SPLITS, vals, color=[SPLIT_COLORS[s] for s in manifest.SPLITS])
        for i, v in enumerate(vals):
            ax.annotate(str(v), (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("images")
        ax.set_title("Images per split" + (f" ({len(groups):,} distinct {group_col} values)" if groups else ""))
        ax.set_ylim(0, max(vals + [1]) * 1.15)
        return
    table = df.group_by(pl.col(group_col).cast(pl.String), "split").len()
    bottom = np.zeros(len(groups))
    for s in manifest.SPLITS:
        part = dict(table.filter(pl.col("split") == s).select(group_col, "len").iter_rows())
        vals = np.array([part.get(g, 0) for g in groups])
        ax.bar(groups, vals, bottom=bottom, label=s, color=SPLIT_COLORS[s])
        bottom += vals
    ax.set_xlabel(group_col)
    ax.set_ylabel("images")
    ax.set_title(f"Images per {group_col} and split")
    ax.set_ylim(0, max(bottom.max(), 1) * 1.25)  # head-room for the legend
    ax.legend(title="split", ncols=3, loc="upper center", fontsize=8)
    ax.tick_params(axis="x", rotation=30 if len(groups) > 4 else 0)


def _quarantine(ax, by_reason: dict[str, int]) -> None:
    ax.set_title(f"Quarantined by reason ({sum(by_reason.values())} images)")
    if not by_reason:
        ax.text(0.5, 0.5, "nothing quarantined", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    reasons = sorted(by_reason, key=lambda r: by_reason[r])
    ax.barh(reasons, [by_reason[r] for r in reasons], color="#C44E52")
    for i, r in enumerate(reasons):
        ax.annotate(f" {by_reason[r]}", (by_reason[r], i), va="center", fontsize=8)
    ax.set_xlabel("images")
    ax.set_xlim(0, max(by_reason.values()) * 1.25)


def plot_overview(df: pl.DataFrame, by_reason: dict[str, int], group_col: str, out: Path) -> None:
    fig = Figure(figsize=(16, 4.4))
    a, b, c = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.3, 1, 0.9]})
    _long_tail(a, df)
    _per_group(b, df, group_col)
    _quarantine(c, by_reason)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def _sample_classes(df: pl.DataFrame, n: int, seed: int) -> list[str]:
    """n classes drawn with the seed, preferring classes present in every split (so each block of the grid shows
    the same class)."""
    present = df.group_by("class_name").agg(pl.col("split").n_unique().alias("k")).sort("class_name")
    full = present.filter(pl.col("k") == present["k"].max())["class_name"].to_list()
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(full, size=min(n, len(full)), replace=False).tolist())


def thumbnail(root: Path, rel: str, side: int = THUMB) -> np.ndarray | None:
    """An image shrunk to fit side x side, as RGB; None when it cannot be read (the report uses it too)."""
    try:
        with images.open_image(root, rel) as im:
            im.thumbnail((side, side))
            return np.asarray(im.convert("RGB"))
    except Exception:  # a card must not fail on one unreadable file: the cell stays empty
        return None


def plot_sample_grid(
    df: pl.DataFrame, image_root: Path, n_classes: int, seed: int, group_col: str, out: Path, per_split: int = 2
) -> None:
    """A block of columns per split (train | val | test), one row per sampled class, up to per_split images each."""
    classes = _sample_classes(df, n_classes, seed)
    shown = df.filter(pl.col("class_name").is_in(classes))
    # As many columns per split as its best-filled sampled class needs (emoji: 2 train, 1 val, 1 test).
    widths = {
        s: min(per_split, int(shown.filter(pl.col("split") == s).group_by("class_name").len()["len"].max() or 0))
        for s in manifest.SPLITS
    }
    cols = [(s, j) for s in manifest.SPLITS for j in range(widths[s])]
    fig = Figure(figsize=(1.5 * len(cols) + 1.8, 1.55 * len(classes) + 0.5))
    axes = fig.subplots(len(classes), len(cols), squeeze=False)
    for i, name in enumerate(classes):
        rows = df.filter(pl.col("class_name") == name)
        for j, (s, k) in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            part = rows.filter(pl.col("split") == s)
            if i == 0 and k == 0:
                ax.set_title(s, fontsize=10, color=SPLIT_COLORS[s], loc="left", fontweight="bold")
            if k >= part.height:
                for spine in ax.spines.values():
                    spine.set_visible(False)
                continue
            item = part.row(k, named=True)
            pixels = thumbnail(image_root, item["path"])
            if pixels is not None:
                ax.imshow(pixels)
            ax.set_xlabel(str(item.get(group_col, ""))[:18], fontsize=6)
            for spine in ax.spines.values():
                spine.set_edgecolor(SPLIT_COLORS[s])
                spine.set_linewidth(2)
        label = "\n".join(textwrap.wrap(name, 16)[:3])
        axes[i][0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(
        f"Samples per split ({len(classes)} classes drawn with seed {seed}; caption = {group_col})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(out, dpi=100)


# --- markdown -----------------------------------------------------------------------------------------------------


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table; `|` inside a cell (a class name may hold one) is escaped. The report uses it too."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows])


def card_markdown(stats: dict, group_col: str, clean_counts: dict, figures: str = "figures") -> str:
    ipc = stats["images_per_class"]
    split_rows = [
        [
            s,
            v["images"],
            f"{100 * v['share']:.1f} %",
            v["classes"],
            f"{v['per_class_min']} / {v['per_class_median']:g} / {v['per_class_max']}",
            v["groups"] if v["groups"] is not None else "-",
        ]
        for s, v in stats["splits"].items()
    ]
    kept, total = clean_counts.get("kept"), clean_counts.get("input")
    q = stats["quarantine"]
    md = [
        "## Dataset card",
        "",
        f"**{stats['classes']} classes, {stats['images']} images**"
        + (f" (cleaning kept {kept} of {total})" if kept is not None and total is not None else "")
        + ".",
        "",
        md_table(
            ["split", "images", "share", "classes", "images per class (min / median / max)", f"{group_col}s"],
            split_rows,
        ),
        "",
        f"Images per class: min {ipc['min']}, median {ipc['median']:g}, mean {ipc['mean']:g}, max {ipc['max']}; "
        "largest: " + ", ".join(f"{name} ({n})" for name, n in stats["largest_classes"]) + ".",
    ]
    near = stats.get("near_duplicate_groups")
    if near and near["groups"]:
        md += [
            "",
            f"Near-duplicate groups: {near['groups']} groups, {near['images']} images, each group inside one split.",
        ]
    md += ["", f"Quarantined: {q['total']} images" + (" by reason:" if q["by_reason"] else " (none)."), ""]
    if q["by_reason"]:
        md += [md_table(["reason", "images"], [[r, n] for r, n in q["by_reason"].items()]), ""]
    md += [
        f"![dataset: long tail, splits, quarantine]({figures}/{DATASET_FIGURE})",
        "",
        f"![samples per split]({figures}/{SAMPLES_FIGURE})",
        "",
    ]
    return "\n".join(md)


def write_card(
    df: pl.DataFrame,
    quarantine: pl.DataFrame,
    image_root: Path,
    out_dir: Path,
    *,
    group_col: str,
    grid_classes: int,
    seed: int,
    clean_counts: dict | None = None,
) -> Card:
    """Figures into out_dir/figures, dataset_card.md and dataset_card.json into out_dir; returns the section."""
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    group_col = group_col if group_col in df.columns else "group"
    stats = card_stats(df, quarantine, group_col)
    plot_overview(df, stats["quarantine"]["by_reason"], group_col, figs / DATASET_FIGURE)
    plot_sample_grid(df, image_root, grid_classes, seed, group_col, figs / SAMPLES_FIGURE)
    md = card_markdown(stats, group_col, clean_counts or {})
    write_text(out_dir / CARD_MD, "# " + md.removeprefix("## ") + "\n")
    write_text(out_dir / CARD_JSON, json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return Card(md, stats, [figs / DATASET_FIGURE, figs / SAMPLES_FIGURE])
