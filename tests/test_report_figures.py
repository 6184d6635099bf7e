"""The report's figures on synthetic long-tailed results: every branch draws a readable PNG, and nothing is drawn
where there is nothing to show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.report import figures
from pipeline.report.build import claims, headline, results_table, settings_table, to_html
from pipeline.report.results import VariantResult
from pipeline.seeds import summarize

PNG = b"\x89PNG\r\n\x1a\n"


def fake_result(
    name: str,
    seed: int,
    method: str = "cnn",
    trainable: int = 1000,
    gflops: float = 0.1,
    counts: np.ndarray | None = None,
    top1: float | list[float] | None = None,
) -> VariantResult:
    """top1: one figure, or one per seed (42, 43, ...): then the test metrics are a seeds summary."""
    rng = np.random.default_rng(seed)
    counts = np.geomspace(1, 500, 60).astype(int) if counts is None else counts
    acc = np.clip(np.log(counts) / np.log(500) + rng.normal(0, 0.1, len(counts)), 0, 1)
    per_class = pl.DataFrame(
        {
            "class_name": [f"c{i}" for i in range(len(counts))],
            "train_images": counts,
            "test_images": [5] * len(counts),
            "test_acc": acc,
        }
    )
    history = pl.DataFrame(
        {
            "epoch": [1, 2, 3],
            "train_loss": [3.0, 2.0, 1.5],
            "val_loss": [3.1, 2.4, 2.2],
            "train_top1": [0.1, 0.4, 0.6],
            "val_top1": [0.1, 0.3, 0.35],
        }
    )
    cfg = {
        "method": method,
        "model": "m",
        "backbone_cnn": None,
        "img_size": 96,
        "ila_variant": "ila",
        "lr": 0.001,
        "epochs": 3,
        "checkpoint_dir": "x",
    }
    return VariantResult(
        name=name,
        train_cfg=cfg,
        model_file=Path(f"models/{name}/model.pt"),
        train={"params_total": 10 * trainable, "params_trainable": trainable, "best_epoch": 3, "best_val_top1": 0.35},
        test=_test_metrics(float(acc.mean()) if top1 is None else top1, float(acc.mean()), gflops),
        history=history,
        per_class=per_class,
        predictions=pl.DataFrame({"image_id": ["1"], "actual": ["c0"], "predicted": ["c0"], "confidence": [0.9]}),
        confused_pairs=pl.DataFrame(
            schema={
                "actual": pl.String,
                "predicted": pl.String,
                "count": pl.Int64,
                "actual_test_images": pl.Int64,
                "rate": pl.Float64,
            }
        ),
        samples={"image_id": np.array([], dtype=str)},
    )


def _test_metrics(top1: float | list[float], macro: float, gflops: float) -> dict:
    if not isinstance(top1, list):
        return {"test_top1": top1, "test_top5": 0.9, "test_macro_acc": macro, "gflops": gflops}
    return summarize(
        {
            42 + i: {"test_top1": t, "test_top5": 0.9, "test_macro_acc": macro, "gflops": gflops}
            for i, t in enumerate(top1)
        }
    )


@pytest.fixture()
def results() -> list[VariantResult]:
    return [
        fake_result("cnn", 0, trainable=3_600_000, gflops=0.14),
        fake_result("glsim", 1, "glsim", trainable=1_000_000, gflops=0.22),
        fake_result("ila", 2, "ila", trainable=56_000, gflops=30.0),
    ]


def _is_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as im:
        return im.size


def test_long_tail_figures_are_pngs(results, tmp_path):
    for draw, name in (
        (figures.accuracy_vs_cost, "cost.png"),
        (figures.training_curves, "curves.png"),
        (figures.per_class_vs_frequency, "per_class.png"),
    ):
        args = (results, 5, tmp_path / name) if draw is figures.accuracy_vs_cost else (results, tmp_path / name)
        assert draw(*args) == tmp_path / name
        w, h = _is_png(tmp_path / name)
        assert 600 <= w <= 1500 and 300 <= h <= 700


def test_frequency_bins_cover_every_class_once():
    counts = np.unique(np.geomspace(1, 500, 60).astype(int))
    edges = figures.frequency_bins(counts, spread=True)
    assert len(edges) == 9 and edges[0] < counts.min() and edges[-1] > counts.max()
    which = np.digitize(counts, edges[1:-1])
    assert which.min() == 0 and which.max() == len(edges) - 2
    few = np.array([2, 5, 9])
    assert np.array_equal(np.digitize(few, figures.frequency_bins(few, spread=False)[1:-1]), [0, 1, 2])


def test_nothing_to_draw_gives_no_figure(results, tmp_path):
    split = pl.DataFrame({"image_id": ["1"], "path": ["a.png"], "split": ["train"], "class_name": ["c0"]})
    assert figures.glsim_grid(results[1], tmp_path / "g.png") is None  # no selection data stored
    assert figures.confusions(results[0], split, tmp_path, 4, tmp_path / "c.png") is None  # no mistakes
    assert not list(tmp_path.glob("*.png"))


def test_tables_and_html(results):
    table = results_table(results, 5)
    assert table.count("\n") == 4 and "| **ila** | ila |" in table and "30.000" in table
    settings = settings_table(results)
    assert settings.splitlines()[0].startswith("| variant | method |")  # only the keys that differ (method here)
    assert "lr" not in settings.splitlines()[0]
    assert headline(results) == (
        "Best mean top-1: **ila** (49.8 %); fewest GFLOPs: **cnn** (0.140); fewest trainable "
        "parameters: **ila** (0.056 M)."
    )
    html = to_html("# T\n\n" + table, "T")
    assert html.count("<tr>") == 4 and "<title>T</title>" in html


def test_the_papers_tables_are_complete_and_name_registry_datasets():
    from pipeline.data import registry
    from pipeline.report import papers

    t = papers.tables()
    glsim, ila = t.filter(pl.col("source") == "GLSim Table 4"), t.filter(pl.col("source") == "ILA Table 1")
    assert glsim.height == 10 * 6 and set(glsim["img_size"]) == {224}  # 10 datasets x 6 methods
    assert ila.height == 5 * 18 and set(ila["img_size"]) == {448}  # 5 cultivar sets x 18 methods
    assert set(t["dataset"]) <= set(registry.keys())
    assert glsim.filter((pl.col("dataset") == "dafb") & (pl.col("ours") == "glsim"))["top1"].item() == 93.36
    assert ila.filter((pl.col("dataset") == "cotton") & (pl.col("ours") == "ila++"))["top1"].item() == 55.42
    header = (papers.FOLDER / "ila_table1_is448.csv").read_text().splitlines()[0]
    assert header.startswith("# ILA paper") and "arXiv 2409.11051" in header  # the source travels with the data


def test_results_table_sets_the_papers_top1_beside_ours_for_a_dataset_they_report(results):
    glsim = fake_result("glsim", 1, "glsim")
    glsim = VariantResult(
        **{
            **glsim.__dict__,
            "train_cfg": {**glsim.train_cfg, "img_size": 224},
            "test": {**glsim.test, "test_top1": 0.9},
        }
    )
    ila = fake_result("ila", 2, "ila")
    ila = VariantResult(
        **{
            **ila.__dict__,
            "train_cfg": {**ila.train_cfg, "img_size": 448, "ila_variant": "ila++"},
            "test": {**ila.test, "test_top1": 0.6},
        }
    )
    table = results_table([glsim, ila, results[0]], 5, "cub")
    lines = table.splitlines()
    assert "| top-1 | paper top-1 | ours - paper (points) | top-5 |" in lines[0]
    assert "| 90.0 % | 90.9 % (GLSim, GLSim Table 4) | -0.9 |" in lines[2]  # 90.0 - 90.93
    assert "| 60.0 % | - | - |" in lines[3]  # ILA Table 1 has no CUB
    assert "| 60.0 % | 55.4 % (ILA++, ILA Table 1) | +4.6 |" in results_table([ila], 5, "cotton")
    for dataset in (None, "daf", "cars"):  # not a registry name, or one the papers do not report
        assert "paper top-1" not in results_table([glsim, ila], 5, dataset)


def test_claims_compare_glsim_and_ila_with_the_vit_on_the_same_weights():
    """Verdicts come from the paired per-seed differences: a 2-point loss on every seed does not hold, ILA within
    5 points on every seed holds, and a gain whose seeds disagree is undecided."""
    vit = fake_result("vit", 0, "vit", trainable=5_000_000, gflops=0.4, top1=[0.30, 0.34, 0.32])
    glsim = fake_result("glsim", 1, "glsim", trainable=5_400_000, gflops=0.8, top1=[0.28, 0.32, 0.30])
    ila = fake_result("ila", 2, "ila", trainable=50_000, gflops=0.3, top1=[0.29, 0.33, 0.30])
    ila.train["params_total"] = 50_000_000  # a frozen backbone: 0.1 % trainable
    text = "\n".join(claims([fake_result("cnn", 3), vit, glsim, ila]))
    assert (
        "**glsim** vs **vit**: top-1 30.0 ± 2.0 % vs 32.0 ± 2.0 %; difference -2.0 points over 3 seeds "
        "(-2.0, -2.0, -2.0; 95 % interval [-2.0, -2.0]); 2.00x the GFLOPs"
    ) in text
    assert "GLSim paper's claim (better than its ViT, at about 2x the FLOPs): **does not hold**" in text
    assert "**ila** vs **vit**" in text and "0.75x the GFLOPs, 0.10 % of the parameters trainable" in text
    assert "trainable and fewer FLOPs): **holds**." in text  # ILA: within 5 points on every seed, 0.1 % trainable
    noisy = fake_result("glsim", 1, "glsim", trainable=5_400_000, gflops=0.8, top1=[0.40, 0.30, 0.36])
    assert "**undecided at this noise**" in "\n".join(claims([vit, noisy]))
    assert claims([fake_result("cnn", 3), glsim]) == []  # no ViT to compare with: no claim line


def test_cjk_class_names_are_drawn_with_their_glyphs(tmp_path, recwarn):
    """Issue 23 case 6: matplotlib warned `Glyph 35486 missing from font(s) DejaVu Sans` and drew boxes."""
    import dataclasses
    import warnings

    from pipeline.report.card import plot_sample_grid

    names = ["日本語", "초코", "中文"]
    for i in range(len(names)):
        Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(tmp_path / f"{i}.png")
    split = pl.DataFrame(
        {
            "image_id": ["0", "1", "2"],
            "path": ["0.png", "1.png", "2.png"],
            "class_name": names,
            "split": ["test", "train", "train"],
            "group": ["a", "b", "c"],
        }
    )
    result = dataclasses.replace(
        fake_result("cnn", 0),
        predictions=pl.DataFrame({"image_id": ["0"], "actual": ["日本語"], "predicted": ["초코"], "confidence": [0.9]}),
        confused_pairs=pl.DataFrame(
            {"actual": ["日本語"], "predicted": ["초코"], "count": [1], "actual_test_images": [1], "rate": [1.0]}
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph is a UserWarning: now an error
        assert figures.confusions(result, split, tmp_path, 4, tmp_path / "c.png") == tmp_path / "c.png"
        plot_sample_grid(split, tmp_path, 3, 0, "group", tmp_path / "grid.png")
    assert _is_png(tmp_path / "c.png") and _is_png(tmp_path / "grid.png")
