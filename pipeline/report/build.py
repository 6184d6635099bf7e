"""The `report` stage: one Markdown report (and its HTML rendering) comparing every variant of params.yaml.

It reads only what the earlier stages stored (pipeline/report/results.py): no model is run and nothing retrained.
Its data section is the dataset card (pipeline/report/card.py). The folder is logged to MLflow as a run of its own,
tagged with the run ids of the models it compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline import methods
from pipeline.config import Params
from pipeline.data import manifest
from pipeline.data.registry import source_dataset
from pipeline.io import write_text
from pipeline.report import figures, papers
from pipeline.report.card import md_table, write_card
from pipeline.report.results import VariantPaths, VariantResult, load_variant
from pipeline.seeds import CONFIDENCE, Paired, paired, verdict


@dataclass(frozen=True)
class ReportInputs:
    split_manifest: Path
    image_root: Path  # the clean stage's output (quarantine.parquet is read from it too)
    models: Path  # models/<variant>/seed<N>/
    metrics: Path  # metrics/{clean,split}.json, metrics/{train,evaluate}/<variant>.json
    plots: Path  # plots/<kind>/<variant>/seed<N>.csv|npz

    def variant(self, name: str, seed: int) -> VariantPaths:
        return VariantPaths.of(name, self.models, self.metrics, self.plots, seed)


def build_report(params: Params, inp: ReportInputs, out_dir: Path) -> tuple[Path, list[VariantResult]]:
    """Write out_dir/report.md, report.html, figures/*.png and the dataset card; returns (report.md, results)."""
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for stale in figs.glob("*.png"):  # figures of variants that no longer exist must not linger
        stale.unlink()
    results = [load_variant(name, inp.variant(name, params.base.seeds[0])) for name in params.variants]
    df = manifest.read(inp.split_manifest)
    group_col = params.split.group_column if params.split.group_column in df.columns else "group"
    quarantine_file = inp.image_root / "quarantine.parquet"
    quarantine = pl.read_parquet(quarantine_file) if quarantine_file.is_file() else pl.DataFrame()
    clean_counts = _load_json(inp.metrics / "clean.json")
    card = write_card(
        df,
        quarantine,
        inp.image_root,
        out_dir,
        group_col=group_col,
        grid_classes=params.report.grid_classes,
        seed=params.base.seed,
        clean_counts=clean_counts,
    )
    k = params.evaluate.top_k

    figures.accuracy_vs_cost(results, k, figs / "accuracy_vs_gflops.png")
    figures.training_curves(results, figs / "training_curves.png")
    figures.per_class_vs_frequency(results, figs / "per_class_vs_frequency.png")
    glsim = {r.name: figures.glsim_grid(r, figs / f"glsim_{r.name}.png") for r in results}
    confused = {
        r.name: figures.confusions(
            r, df, inp.image_root, params.report.confused_examples, figs / f"confused_{r.name}.png"
        )
        for r in results
    }
    md = _results_section(params, results) + _detail_sections(results, glsim, confused)
    md += [
        card.markdown,
        "",
        f"Open the runs: `mlflow ui --backend-store-uri sqlite:///$PWD/{params.base.mlflow_dir}/mlflow.db` "
        "(the `report` run links every variant's training run in its `run.<variant>` tags).",
        "",
    ]
    text = "\n".join(md)
    out = out_dir / "report.md"
    write_text(out, text)
    write_text(out_dir / "report.html", to_html(text, "Fine-grained recognition report"))
    return out, results


def _results_section(params: Params, results: list[VariantResult]) -> list[str]:
    """The report's opening: what ran, the results table beside the papers', and how each variant trained."""
    k = params.evaluate.top_k
    chance = results[0].test.get("chance_top1")
    dataset = source_dataset(params.acquire)  # a registry name: the papers' numbers go beside ours
    return [
        "# Fine-grained recognition report",
        "",
        f"Dataset source: **{params.acquire.source}**; split strategy: **{params.split.strategy}**"
        + _split_detail(params)
        + f"; {len(results)} variants (params.yaml `variants`), each trained on the train "
        f"split once per seed ({', '.join(map(str, params.base.seeds))}: `base.seeds`), its epoch chosen on val, "
        "and measured on test. Accuracies are the mean ± sample standard deviation over the seeds; the figures "
        f"show seed {params.base.seeds[0]}.",
        "",
        "## Results (test split)",
        "",
        headline(results),
        "",
        *claims(results),
        results_table(results, k, dataset),
        "",
        *([papers_note(dataset), ""] if papers.reports(dataset) else []),
        f"Chance top-1: {_pct(chance)}. GFLOPs: one image, forward pass, torch's FLOP counter (matmul, convolution "
        'and attention; a multiply-add is 2 FLOPs); GMACs, half of it, is the papers\' "FLOPs". Tail: classes '
        f"with fewer than {params.evaluate.tail_below} training images. Timings (training seconds, img/s) and run "
        "ids differ on every run, so they are not in this versioned report: they are in MLflow, with a table of "
        "them (`runtime.md`) in the `report` run's artifacts.",
        "",
        "![accuracy vs GFLOPs](figures/accuracy_vs_gflops.png)",
        "",
        "### How each variant trained",
        "",
        settings_table(results),
        "",
        "## Training",
        "",
        "![training curves](figures/training_curves.png)",
        "",
        "## Per-class accuracy",
        "",
        "![per-class accuracy vs training frequency](figures/per_class_vs_frequency.png)",
        "",
    ]


def _detail_sections(results: list[VariantResult], glsim: dict, confused: dict) -> list[str]:
    """GLSim's selections (when a variant has them) and each variant's most frequent confusions."""
    md: list[str] = []
    if any(glsim.values()):
        md += [
            "## Where GLSim looks",
            "",
            "Each row: a test image as the model saw it; the cosine similarity between the CLS token and each "
            "patch token (the selection GLSim ranks patches by), the top-k patches and their box; the crop that "
            "was re-encoded by the same encoder.",
            "",
        ]
        md += [f"![GLSim selection of {n}](figures/{p.name})\n" for n, p in glsim.items() if p]
    md += ["## Most frequent confusions (test)", ""]
    for r in results:
        md += [f"### {r.name}", "", confusion_table(r), ""]
        if confused[r.name]:
            md += [f"![confusions of {r.name}](figures/{confused[r.name].name})", ""]
    return md


def headline(results: list[VariantResult]) -> str:
    """One sentence: which variant is best on accuracy, on cost and on trainable parameters. The table's rule: a
    variant without a figure is left out of that comparison, never an error."""
    parts = []
    for label, pick, value, fmt in (
        ("Best mean top-1", max, lambda r: r.test.get("test_top1"), _pct),
        ("fewest GFLOPs", min, lambda r: r.test.get("gflops"), _num(3)),
        ("fewest trainable parameters", min, lambda r: r.train.get("params_trainable"), lambda v: f"{v / 1e6:.3f} M"),
    ):
        known = [r for r in results if isinstance(value(r), (int, float))]
        if known:
            r = pick(known, key=value)
            parts.append(f"{label}: **{r.name}** ({fmt(value(r))})")
    return ("; ".join(parts) + ".") if parts else "No test metrics yet."


# The papers' claims, as this report checks them against a plain ViT variant on the same model and weights: GLSim
# beats its ViT (at about 2x the FLOPs); ILA keeps the ViT's accuracy (here: within 5 points) with under 2 % of the
# parameters trainable and fewer FLOPs. Accuracy parts are judged on the paired per-seed differences
# (pipeline/seeds.py): holds / does not hold only when the whole 95 % interval of the mean difference is on one side.
ILA_MAX_DROP, ILA_MAX_TRAINABLE = 0.05, 0.02


def claims(results: list[VariantResult]) -> list[str]:
    """One line per GLSim/ILA variant that has a `vit` variant on the same model and weights to compare with: the
    papers' claim, the paired figures here and the verdict. Nothing when no such pair exists."""

    def key(r: VariantResult) -> tuple:
        return r.train_cfg.get("model"), r.train_cfg.get("weights"), r.train_cfg.get("backbone_cnn")

    lines = []
    for r in results:
        method = r.train_cfg.get("method")
        base = next((b for b in results if b.train_cfg.get("method") == "vit" and key(b) == key(r)), None)
        compared = method in methods.METHODS and methods.METHODS[method].compared_with_vit
        diff = paired(r.test, base.test) if base is not None and compared else None
        if diff is None or not all(isinstance(x.test.get("gflops"), (int, float)) for x in (r, base)):
            continue
        cost = r.test["gflops"] / base.test["gflops"]
        said = (
            f"**{r.name}** vs **{base.name}**: top-1 {_mean_std(r.test, 'test_top1')} vs "
            f"{_mean_std(base.test, 'test_top1')}; {_paired_text(diff)}; {cost:.2f}x the GFLOPs"
        )
        if method == "glsim":
            lines.append(
                f"- {said}. The GLSim paper's claim (better than its ViT, at about 2x the FLOPs): **{verdict(diff)}**."
            )
            continue
        share = r.train.get("params_trainable", 0) / max(r.train.get("params_total", 1), 1)
        said += f", {100 * share:.2f} % of the parameters trainable"
        accuracy = verdict(diff, -ILA_MAX_DROP)
        outcome = accuracy if share < ILA_MAX_TRAINABLE and cost < 1 else "does not hold"
        lines.append(
            f"- {said}. The ILA paper's claim (the ViT's accuracy, within {100 * ILA_MAX_DROP:.0f} points "
            f"here, with under {100 * ILA_MAX_TRAINABLE:.0f} % trainable and fewer FLOPs): **{outcome}**"
            + ("" if outcome == accuracy else f" (accuracy alone: {accuracy})")
            + "."
        )
    rule = (
        f"Rule: the per-seed differences (same seed, same data order) give a mean and a {100 * CONFIDENCE:.0f} % "
        "Student-t interval; a claim **holds** when the whole interval clears its threshold, **does not hold** "
        "when the whole interval misses it, and is **undecided at this noise** otherwise."
    )
    return ["The papers' claims against the plain ViT:", "", *lines, "", rule, ""] if lines else []


def _paired_text(d: Paired) -> str:
    per_seed = ", ".join(f"{100 * x:+.1f}" for x in d.diffs)
    interval = (
        f"{100 * CONFIDENCE:.0f} % interval [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
        if d.n > 1
        else "one seed: no interval"
    )
    return f"difference {100 * d.mean:+.1f} points over {d.n} seeds ({per_seed}; {interval})"


def _mean_std(metrics: dict, key: str) -> str:
    """`61.2 ± 2.3 %`: mean and sample std over seeds (std left out for a single seed or an older file)."""
    value, std = metrics.get(key), metrics.get(f"{key}_std")
    if not isinstance(value, (int, float)):
        return "-"
    if not isinstance(std, (int, float)) or metrics.get("n_seeds", 1) < 2:
        return _pct(value)
    return f"{100 * value:.1f} ± {100 * std:.1f} %"


def results_table(results: list[VariantResult], k: int, dataset: str | None = None) -> str:
    """One row per variant; with a registry dataset the papers report (papers.py), their top-1 for the same method
    and image size and ours minus theirs, in points."""
    from pipeline.models import describe_weights

    with_paper = papers.reports(dataset)
    rows = []
    for r in results:
        t, c = r.test, r.train_cfg
        paper = papers.paper_top1(dataset, c) if with_paper else None
        theirs = (
            []
            if not with_paper
            else ["-", "-"]
            if paper is None
            else [f"{_pct(paper.top1)} ({paper.method}, {paper.source})", f"{100 * (t['test_top1'] - paper.top1):+.1f}"]
        )
        rows.append(
            [
                f"**{r.name}**",
                c["ila_variant"] if c["method"] == "ila" else c["method"],
                f"`{r.backbone}`",
                describe_weights(c["model"], c.get("weights", "none"), c.get("backbone_cnn")),
                c["img_size"],
                _mean_std(t, "test_top1"),
                *theirs,
                _mean_std(t, f"test_top{k}"),
                _mean_std(t, "test_macro_acc"),
                _pct(t.get("test_tail_acc")),
                _millions(r.train.get("params_total"), 2),
                _millions(r.train.get("params_trainable"), 3),
                _num(3)(t.get("gflops")),
                _num(3)(t.get("gmacs")),
            ]
        )
    return md_table(
        [
            "variant",
            "method",
            "backbone",
            "weights",
            "image size",
            "top-1",
            *(["paper top-1", "ours - paper (points)"] if with_paper else []),
            f"top-{k}",
            "macro acc",
            "tail acc",
            "params",
            "trainable",
            "GFLOPs",
            "GMACs",
        ],
        rows,
    )


def papers_note(dataset: str) -> str:
    return (
        f"Paper top-1: the published mean for `{dataset}` with the same method at the same image size (GLSim "
        "Table 4 at 224 px, ILA Table 1 at 448 px; ViT-B/16 with the original ImageNet-21k weights; "
        "`pipeline/report/papers/`); `-` where the papers have none."
    )


def settings_table(results: list[VariantResult]) -> str:
    """The train keys that differ between variants (all of them come from models/<v>/config.yaml)."""
    keys = [
        k
        for k in results[0].train_cfg
        if k not in ("checkpoint_dir", "resume", "num_workers") and len({repr(r.train_cfg.get(k)) for r in results}) > 1
    ]
    keys = keys or ["epochs", "lr"]
    rows = [
        [
            r.name,
            *("-" if r.train_cfg.get(k) is None else r.train_cfg[k] for k in keys),
            r.train.get("best_epoch", "?"),
            _pct(r.train.get("best_val_top1")),
        ]
        for r in results
    ]
    return md_table(["variant", *keys, "epoch kept", "val top-1"], rows)


def confusion_table(r: VariantResult, n: int = 5) -> str:
    top = r.confused_pairs.head(n)
    if top.height == 0:
        return "No mistakes on the test split."
    return md_table(
        ["true class", "predicted as", "images", "of its test images"],
        [
            [a, p, c, f"{100 * rate:.0f} %"]
            for a, p, c, rate in top.select("actual", "predicted", "count", "rate").iter_rows()
        ],
    )


def to_html(markdown: str, title: str) -> str:
    """A self-contained page (figures linked relatively) rendered by markdown-it (CommonMark + tables)."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.45}"
    "table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;"
    "text-align:left}th{background:#f3f3f3}img{max-width:100%;height:auto}code{background:#f6f6f6;"
    "padding:0 .2em}"
)


def _load_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def _num(digits: int):
    return lambda x: f"{x:.{digits}f}" if isinstance(x, (int, float)) else "n/a"


def _millions(x, digits: int) -> str:
    return f"{x / 1e6:.{digits}f} M" if isinstance(x, (int, float)) else "n/a"


def _split_detail(params: Params) -> str:
    sp = params.split
    if sp.strategy != "group":
        return ""
    if sp.group_assign == "ratio":
        return f" (whole `{sp.group_column}` groups drawn by ratio with seed {params.base.seed})"
    return f" (test = {', '.join(sp.test_groups)}, val = {', '.join(sp.val_groups) or '-'})"


def log_to_mlflow(params: Params, out_dir: Path, results: list[VariantResult], root: Path) -> str:
    """A `report` run holding the report folder, each variant's headline metrics and its training run id."""
    from pipeline import tracking

    experiment_id = tracking.setup(params.base, root)  # the train runs' experiment and artifact store
    runs = {r.name: tracking.train_run_of(r.model_file, experiment_id) for r in results}
    with tracking.start_run(experiment_id, run_name="report", tags={"stage": "report"}) as run:
        tracking.set_tags({f"run.{name}": tr.info.run_id for name, tr in runs.items() if tr is not None})
        tracking.tag_provenance(root, "report")
        tracking.log_metrics(
            {
                f"{r.name}.{k}": float(r.test[k])
                for r in results
                for k in ("test_top1", "test_macro_acc", "gflops")
                if k in r.test
            }
        )
        tracking.log_folder(out_dir, "report")
        tracking.log_text(runtime_table(runs), "report/runtime.md")
    return run.info.run_id


def runtime_table(runs: dict) -> str:
    """What differs on every run, from the train runs' MLflow records: run id, training time and speeds."""
    rows = []
    for name, tr in runs.items():
        m = tr.data.metrics if tr is not None else {}
        rows.append(
            [
                name,
                f"`{tr.info.run_id}`" if tr is not None else "not found",
                _num(0)(m.get("train_seconds")),
                _num(1)(m.get("train_img_per_s")),
                _num(0)(m.get("test_img_per_s")),
            ]
        )
    return (
        "# Run times\n\n"
        + md_table(["variant", "MLflow train run", "training s", "train img/s", "test img/s (forward)"], rows)
        + "\n"
    )
