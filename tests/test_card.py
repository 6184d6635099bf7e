"""The dataset card (pipeline/report/card.py) and its place in the report: numbers, figures, DAF:re-scale speed."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.config import Params
from pipeline.data import images, manifest
from pipeline.data.clean import QUARANTINE_SCHEMA
from pipeline.report.card import (
    CARD_JSON,
    CARD_MD,
    DATASET_FIGURE,
    MAX_GROUP_BARS,
    SAMPLES_FIGURE,
    card_stats,
    write_card,
)

ARTISTS = ("noto", "openmoji", "twemoji", "emojione")
SPLIT_OF = {"noto": "train", "openmoji": "train", "twemoji": "test", "emojione": "val"}
PNG = b"\x89PNG\r\n\x1a\n"


def png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, format="PNG")
    return buf.getvalue()


def small_dataset(root: Path, shard_size: int | None) -> pl.DataFrame:
    """5 classes x 4 artists, images written as plain files or shards; split by artist as the emoji default."""
    rows = []
    with images.ImageWriter(root, shard_size=shard_size) as writer:
        for c in range(5):
            for k, artist in enumerate(ARTISTS):
                path = writer.write(f"{artist}/{c}.png", png((40 * c, 60 * k, 100)))
                rows.append(
                    dict(
                        image_id=f"{artist}-{c}",
                        path=path,
                        class_id=c,
                        class_name=f"emoji {c}",
                        source="embedded",
                        group=artist,
                        md5=f"{c}{k}",
                        width=24,
                        height=24,
                        split=SPLIT_OF[artist],
                        dup_group=f"{artist}-{c}",
                    )
                )
    return pl.DataFrame(rows, schema={**manifest.SCHEMA, "dup_group": pl.String})


def quarantine(reasons: dict[str, int]) -> pl.DataFrame:
    rows = [
        dict(image_id=f"{r}{i}", path=f"images/{r}{i}.png", class_name="x", reason=r, detail="d", duplicate_of=None)
        for r, n in reasons.items()
        for i in range(n)
    ]
    return pl.DataFrame(rows, schema=QUARANTINE_SCHEMA)


@pytest.mark.parametrize("shard_size", [None, 6], ids=["files", "shards"])
def test_card_files_numbers_and_markdown(tmp_path: Path, shard_size: int | None) -> None:
    df = small_dataset(tmp_path / "clean", shard_size)
    q = quarantine({"corrupt": 2, "duplicate": 1})
    card = write_card(
        df,
        q,
        tmp_path / "clean",
        tmp_path / "reports",
        group_col="group",
        grid_classes=3,
        seed=0,
        clean_counts={"input": 23, "kept": 20},
    )
    for name in (DATASET_FIGURE, SAMPLES_FIGURE):
        assert (tmp_path / "reports" / "figures" / name).read_bytes()[:8] == PNG
    figs = tmp_path / "reports/figures"
    assert card.figures == [figs / DATASET_FIGURE, figs / SAMPLES_FIGURE]
    s = card.stats
    assert (s["classes"], s["images"]) == (5, 20)
    assert {k: v["images"] for k, v in s["splits"].items()} == {"train": 10, "val": 5, "test": 5}
    assert s["splits"]["train"]["groups"] == 2 and s["splits"]["test"]["per_class_max"] == 1
    assert s["quarantine"] == {"total": 3, "by_reason": {"corrupt": 2, "duplicate": 1}}
    assert s["near_duplicate_groups"] == {"groups": 0, "images": 0}
    md = card.markdown
    assert md.startswith("## Dataset card")
    assert "**5 classes, 20 images** (cleaning kept 20 of 23)." in md
    assert "| train | 10 | 50.0 % | 5 | 2 / 2 / 2 | 2 |" in md
    assert "| corrupt | 2 |" in md and "| duplicate | 1 |" in md
    assert f"](figures/{DATASET_FIGURE})" in md and f"](figures/{SAMPLES_FIGURE})" in md
    assert (tmp_path / "reports" / CARD_MD).read_text().startswith("# Dataset card")
    assert json.loads((tmp_path / "reports" / CARD_JSON).read_text()) == s


def test_sample_grid_shows_images_from_every_split(tmp_path: Path) -> None:
    """The grid draws real pixels (not empty cells): its PNG has the classes' colours in it."""
    df = small_dataset(tmp_path / "clean", 4)
    write_card(df, quarantine({}), tmp_path / "clean", tmp_path / "r", group_col="group", grid_classes=5, seed=1)
    with Image.open(tmp_path / "r/figures" / SAMPLES_FIGURE) as im:
        colours = set(map(tuple, np.asarray(im.convert("RGB")).reshape(-1, 3)[::7].tolist()))
    assert (160, 180, 100) in colours  # class 4 by the 4th artist (emojione, val): 40*4, 60*3, 100


def test_empty_quarantine_and_near_duplicate_groups() -> None:
    df = pl.DataFrame(
        [
            dict(
                image_id=str(i),
                path=f"{i}.png",
                class_id=0,
                class_name="a",
                source="s",
                group="g",
                md5=str(i),
                width=1,
                height=1,
                split="train",
                dup_group="0" if i < 3 else str(i),
            )
            for i in range(5)
        ],
        schema={**manifest.SCHEMA, "dup_group": pl.String},
    )
    s = card_stats(df, pl.DataFrame(), "group")
    assert s["quarantine"] == {"total": 0, "by_reason": {}}
    assert s["near_duplicate_groups"] == {"groups": 1, "images": 3}


def test_card_at_dafre_scale_is_fast_and_readable(tmp_path: Path) -> None:
    """463k rows, 3,263 classes, a post per image (too many groups for bars): seconds, not minutes."""
    from benchmarks.clean_split import class_sizes

    sizes = class_sizes(463_437, 3_263)
    cls = np.repeat(np.arange(len(sizes)), sizes)
    rank = np.concatenate([np.arange(n) for n in sizes])
    n_per = np.repeat(sizes, sizes)
    split = np.where(
        rank < (0.7 * n_per).astype(int), "train", np.where(rank < (0.8 * n_per).astype(int), "val", "test")
    )
    df = pl.DataFrame({"image_id": np.arange(len(cls)).astype(str), "class_id": cls, "split": split}).with_columns(
        pl.format("shards/{}.tar/x.jpg", "image_id").alias("path"),
        pl.format("character_{}", "class_id").alias("class_name"),
        pl.lit("dafre").alias("source"),
        pl.col("image_id").alias("group"),
        pl.col("image_id").alias("md5"),
        pl.lit(256, pl.Int64).alias("width"),
        pl.lit(256, pl.Int64).alias("height"),
        pl.col("class_id").cast(pl.Int64),
    )
    q = quarantine({"too_few_in_class": 300, "duplicate": 40, "corrupt": 3})
    start = time.perf_counter()
    card = write_card(df, q, tmp_path / "missing-images", tmp_path / "r", group_col="group", grid_classes=8, seed=0)
    assert time.perf_counter() - start < 60  # ~5 s on 2 cores; generous for a loaded CI machine
    assert card.stats["classes"] == 3263 and card.stats["images_per_class"]["min"] == 20
    assert card.stats["splits"]["val"]["classes"] == 3263
    assert card.stats["splits"]["train"]["groups"] > MAX_GROUP_BARS  # so the middle panel shows totals per split
    with Image.open(tmp_path / "r/figures" / DATASET_FIGURE) as im:
        assert im.size[0] <= 1700 and im.size[1] <= 500  # one row of three panels, whatever the class count


def test_report_before_training_names_the_missing_output(tmp_path: Path) -> None:
    """build_report with only the data stages done stops on the first variant's missing output, naming it."""
    from pipeline.report import ReportInputs, build_report

    df = small_dataset(tmp_path / "clean", None)
    manifest.write(df, tmp_path / "split" / "manifest.parquet")
    none = tmp_path / "absent"
    inputs = ReportInputs(tmp_path / "split" / "manifest.parquet", tmp_path / "clean", none, none, none)
    with pytest.raises(FileNotFoundError, match=r"variant 'cnn' has no .*absent/cnn/seed42/config.yaml"):
        build_report(Params(), inputs, tmp_path / "reports")
