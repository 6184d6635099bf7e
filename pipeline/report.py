"""The `report` stage: a Markdown report with PNG plots, built only from what earlier stages stored.

Its data section is the dataset card (pipeline/data/card.py); the whole folder is logged to MLflow with the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
import polars as pl  # noqa: E402

from pipeline.config import Params  # noqa: E402
from pipeline.data import manifest  # noqa: E402
from pipeline.data.card import write_card  # noqa: E402
from pipeline.io import write_text  # noqa: E402


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


def _split_detail(params: Params) -> str:
    sp = params.split
    if sp.strategy != "group":
        return ""
    if sp.group_assign == "ratio":
        return f" (whole `{sp.group_column}` groups drawn by ratio with seed {params.base.seed})"
    return f" (test = {', '.join(sp.test_groups)}, val = {', '.join(sp.val_groups) or '-'})"


def build_report(params: Params, inp: ReportInputs, out_dir: Path) -> Path:
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    df = manifest.read(inp.split_manifest)
    group_col = params.split.group_column if params.split.group_column in df.columns else "group"
    m = {k: _load_json(p) for k, p in inp.metrics.items()}
    run = _load_json(inp.model_dir / "run.json")
    quarantine = pl.read_parquet(inp.quarantine) if inp.quarantine.is_file() else pl.DataFrame()

    # The dataset card (figures/dataset.png, figures/samples.png, dataset_card.md/.json) is the report's data section.
    card = write_card(df, quarantine, inp.image_root, out_dir, group_col=group_col,
                      grid_classes=params.report.grid_classes, seed=params.base.seed, clean_counts=m.get("clean", {}))
    have_history = inp.history.is_file()
    if have_history:
        plot_history(pl.read_csv(inp.history), figs / "training_curves.png")
    have_per_class = inp.per_class.is_file()
    if have_per_class:
        plot_per_class(pl.read_csv(inp.per_class), figs / "per_class_accuracy.png")

    t, ev, k = params.train, m.get("evaluate", {}), params.evaluate.top_k
    md = [
        "# Fine-grained recognition report",
        "",
        f"Dataset source: **{params.acquire.source}**; split strategy: **{params.split.strategy}**"
        + _split_detail(params),
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
        card.markdown,
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
