"""The `report` stage: a Markdown report with PNG plots, built only from what earlier stages stored."""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.data import manifest  # noqa: E402
from pipeline.io import write_text  # noqa: E402

SPLIT_COLORS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}


@dataclass(frozen=True)
class ReportInputs:
    split_manifest: Path
    image_root: Path
    quarantine: Path
    model_dir: Path
    history: Path
    per_class: Path
    predictions: Path
    metrics: dict[str, Path]  # stage name -> its metrics json


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def plot_dataset(df: pl.DataFrame, group_col: str, out: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    counts = df.group_by("class_name").len().sort("len", descending=True)["len"].to_list()
    a.plot(range(1, len(counts) + 1), counts, color="#4C72B0")
    a.set_yscale("log")
    a.set_xlabel("class rank (sorted by image count)")
    a.set_ylabel("images per class (log scale)")
    a.set_title(f"Images per class ({len(counts)} classes, {df.height} images)")
    a.grid(alpha=0.3)
    table = df.group_by(group_col, "split").len().sort(group_col)
    groups = sorted(table[group_col].cast(pl.String).unique().to_list())[:30]
    bottom = [0] * len(groups)
    for split in manifest.SPLITS:
        vals = [table.filter((pl.col(group_col).cast(pl.String) == g) & (pl.col("split") == split))["len"].sum()
                for g in groups]
        b.bar(groups, vals, bottom=bottom, label=split, color=SPLIT_COLORS[split])
        bottom = [x + y for x, y in zip(bottom, vals)]
    b.set_xlabel(group_col)
    b.set_ylabel("images")
    b.set_title(f"Images per {group_col} and split")
    b.set_ylim(0, max(bottom) * 1.25)  # head-room for the legend
    b.legend(title="split", ncols=3, loc="upper center")
    b.tick_params(axis="x", rotation=30 if len(groups) > 4 else 0)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_history(history: pl.DataFrame, out: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for col, label in (("train_loss", "train"), ("val_loss", "val")):
        if col in history.columns:
            a.plot(history["epoch"], history[col], marker="o", label=label)
    a.set_xlabel("epoch")
    a.set_ylabel("cross-entropy loss")
    a.set_title("Loss")
    a.legend()
    a.grid(alpha=0.3)
    for col, label in (("train_top1", "train top-1"), ("val_top1", "val top-1"), ("val_top5", "val top-5")):
        if col in history.columns:
            b.plot(history["epoch"], history[col], marker="o", label=label)
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy")
    b.set_ylim(0, 1)
    b.set_title("Accuracy")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_per_class(per_class: pl.DataFrame, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.hist(per_class["test_acc"].to_list(), bins=20, range=(0, 1), color="#55A868", edgecolor="white")
    ax.set_xlabel("test accuracy of a class")
    ax.set_ylabel("number of classes")
    ax.set_title(f"Per-class test accuracy ({per_class.height} classes)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_samples(df: pl.DataFrame, image_root: Path, n_classes: int, seed: int, out: Path) -> None:
    """One row per class, its images side by side, each titled with its split and group."""
    names = df["class_name"].unique().sort().sample(n=min(n_classes, df["class_name"].n_unique()), seed=seed)
    rows = [df.filter(pl.col("class_name") == n).sort("split", "group").head(6) for n in names.sort()]
    cols = max(r.height for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.7 * cols + 1.8, 1.8 * len(rows)), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if j < r.height:
                item = r.row(j, named=True)
                with Image.open(image_root / item["path"]) as im:
                    ax.imshow(im.convert("RGB"))
                ax.set_title(f"{item['split']} · {item['group']}"[:24], fontsize=7,
                             color=SPLIT_COLORS.get(item["split"], "black"))
                for s in ax.spines.values():
                    s.set_visible(True)
                    s.set_edgecolor(SPLIT_COLORS.get(item["split"], "black"))
        label = "\n".join(textwrap.wrap(r["class_name"][0], 16)[:3])
        axes[i][0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle("Sample images per class (frame colour = split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _confusions(predictions: Path, n: int = 10) -> list[list]:
    wrong = pl.read_csv(predictions).filter(pl.col("actual") != pl.col("predicted"))
    top = (wrong.group_by("actual", "predicted").agg(pl.len().alias("n"), pl.col("confidence").mean())
           .sort(["n", "confidence"], descending=True).head(n))
    return [[a, p, k, f"{c:.2f}"] for a, p, k, c in top.iter_rows()]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def build_report(params: Params, inp: ReportInputs, out_dir: Path) -> Path:
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    df = manifest.read(inp.split_manifest)
    group_col = params.split.group_column if params.split.group_column in df.columns else "group"
    m = {k: _load_json(p) for k, p in inp.metrics.items()}
    run = _load_json(inp.model_dir / "run.json")
    quarantine = pl.read_parquet(inp.quarantine) if inp.quarantine.is_file() else pl.DataFrame()

    plot_dataset(df, group_col, figs / "dataset.png")
    plot_samples(df, inp.image_root, params.report.grid_classes, params.base.seed, figs / "samples.png")
    have_history = inp.history.is_file()
    if have_history:
        plot_history(pl.read_csv(inp.history), figs / "training_curves.png")
    have_per_class = inp.per_class.is_file()
    if have_per_class:
        plot_per_class(pl.read_csv(inp.per_class), figs / "per_class_accuracy.png")

    t, ev, k = params.train, m.get("evaluate", {}), params.evaluate.top_k
    split_rows = []
    for s in manifest.SPLITS:
        part = df.filter(pl.col("split") == s)
        split_rows.append([s, part.height, part["class_id"].n_unique(),
                           ", ".join(sorted(part[group_col].cast(pl.String).unique().to_list())[:8])])
    by_reason = m.get("clean", {}).get("by_reason", {})
    md = [
        "# Fine-grained recognition report",
        "",
        f"Dataset source: **{params.acquire.source}**; split strategy: **{params.split.strategy}**"
        + (f" (test = {', '.join(params.split.test_groups)}, val = {', '.join(params.split.val_groups) or '-'})"
           if params.split.strategy == "group" else ""),
        "",
        "## Results (test split)",
        "",
        _table(["method", "backbone", "weights", "image size", "top-1", f"top-{k}", "macro acc",
                "chance", "params (trainable)", "MLflow run"],
               [[t.method, t.model, t.weights, t.img_size, _pct(ev.get("test_top1")), _pct(ev.get(f"test_top{k}")),
                 _pct(ev.get("test_macro_acc")), _pct(ev.get("chance_top1")),
                 f"{m.get('train', {}).get('params_total', 0) / 1e6:.2f} M "
                 f"({m.get('train', {}).get('params_trainable', 0) / 1e6:.2f} M)", f"`{run.get('run_id', 'n/a')}`"]]),
        "",
        f"Best validation top-1 {_pct(m.get('train', {}).get('best_val_top1'))} at epoch "
        f"{m.get('train', {}).get('best_epoch', '?')} of {t.epochs}; training took "
        f"{m.get('train', {}).get('train_seconds', 0):.0f} s "
        f"({m.get('train', {}).get('train_img_per_s', 0):.0f} img/s). Model selection used val only.",
        "",
        "## Data",
        "",
        _table(["split", "images", "classes", f"{group_col}s"], split_rows),
        "",
        f"Cleaning kept {m.get('clean', {}).get('kept', '?')} of {m.get('clean', {}).get('input', '?')} images; "
        f"quarantined: {', '.join(f'{r} {n}' for r, n in by_reason.items()) or 'none'}"
        + (f" ({quarantine.height} rows in quarantine.parquet)" if quarantine.height else "") + ".",
        "",
        "![dataset](figures/dataset.png)",
        "",
        "![samples](figures/samples.png)",
        "",
    ]
    if have_history:
        md += ["## Training", "", "![training curves](figures/training_curves.png)", ""]
    if have_per_class:
        md += ["## Per-class accuracy", "", "![per-class accuracy](figures/per_class_accuracy.png)", ""]
    if inp.predictions.is_file():
        md += ["## Most frequent confusions (test)", "", _table(["true class", "predicted as", "images",
                                                                 "mean confidence"], _confusions(inp.predictions)), ""]
    md += ["", f"Open the run: `mlflow ui --backend-store-uri sqlite:///$PWD/{params.base.mlflow_dir}/mlflow.db` "
           f"(run `{run.get('run_id', 'n/a')}`).", ""]
    out = out_dir / "report.md"
    write_text(out, "\n".join(md))
    return out


def log_to_mlflow(params: Params, out_dir: Path, model_dir: Path, root: Path) -> None:
    """Attach the report to the training run, so `mlflow ui` shows it next to the metrics."""
    import mlflow

    from pipeline import tracking

    run = _load_json(model_dir / "run.json")
    if not run:
        return
    tracking.setup(params.base, root)
    with mlflow.start_run(run_id=run["run_id"]):
        mlflow.log_artifacts(str(out_dir), artifact_path="report")
