"""The papers' published top-1 beside ours: GLSim Table 4 (224 px) and ILA Table 1 (448 px), as data files.

pipeline/report/papers/*.csv hold the tables as the papers print them (one row per dataset and method, with their
source in the header comments); `ours` names the pipeline method that is the same method. A variant gets the paper's
number when the data is a registry dataset the table reports (registry.source_dataset), its method is the table's
and its image size the table's; everything else has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import polars as pl

TABLES = {"glsim_table4_is224.csv": "GLSim Table 4", "ila_table1_is448.csv": "ILA Table 1"}
FOLDER = Path(__file__).parent / "papers"


@dataclass(frozen=True)
class PaperResult:
    top1: float  # fraction (the tables' percent / 100), as the pipeline's metrics
    std: float | None  # over the paper's seeds, where given
    method: str  # the paper's label, e.g. "ILA++"
    source: str  # e.g. "GLSim Table 4"


@cache
def tables() -> pl.DataFrame:
    """Every row of both tables, with a `source` column."""
    frames = [
        pl.read_csv(FOLDER / name, comment_prefix="#", schema_overrides={"ours": pl.String, "std": pl.Float64})
        .select("dataset", "method", "ours", "img_size", "top1", "std")
        .with_columns(source=pl.lit(label))
        for name, label in TABLES.items()
    ]
    return pl.concat(frames)


def reports(dataset: str | None) -> bool:
    """Whether a paper table has numbers for this registry dataset."""
    return dataset is not None and dataset in set(tables()["dataset"])


def method_key(train_cfg: dict) -> str:
    """The pipeline method as the tables' `ours` column names it: ila -> its variant, cnn -> cnn:<timm arch>."""
    if train_cfg["method"] == "ila":
        return train_cfg.get("ila_variant", "ila")
    if train_cfg["method"] == "cnn":
        return f"cnn:{train_cfg['model'].split('.', 1)[0]}"
    return train_cfg["method"]


def paper_top1(dataset: str | None, train_cfg: dict) -> PaperResult | None:
    """The papers' top-1 for this dataset, method and image size; None where they report none."""
    if not reports(dataset):
        return None
    rows = tables().filter(
        (pl.col("dataset") == dataset)
        & (pl.col("ours") == method_key(train_cfg))
        & (pl.col("img_size") == train_cfg["img_size"])
    )
    if rows.height == 0:
        return None
    row = rows.row(0, named=True)
    return PaperResult(
        row["top1"] / 100, None if row["std"] is None else row["std"] / 100, row["method"], row["source"]
    )
