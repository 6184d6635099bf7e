"""The `split` stage: assign train/val/test deterministically, then check the guarantees.

Strategies:
- per_class: DAF:re's rule. For each class, in manifest order (or after a seeded shuffle), the first
  int(train * n) rows are train, up to int((train + val) * n) val, the rest test.
- group: whole groups (artists, posts, near-duplicate groups) are held out, so the test set is drawn by unseen artists.
"""

from __future__ import annotations

import polars as pl

from pipeline.config import SplitParams
from pipeline.data import manifest


class SplitError(ValueError):
    """The split breaks a guarantee (a class without train images, an image in two splits, ...)."""


def per_class(df: pl.DataFrame, cfg: SplitParams, seed: int) -> pl.DataFrame:
    if cfg.shuffle:
        df = df.sample(fraction=1.0, shuffle=True, seed=seed)
    r = cfg.ratios
    rank = pl.int_range(pl.len()).over("class_id")
    n = pl.len().over("class_id")
    # Same arithmetic as DAF:re (int() truncation on float products), so its release assignments are reproduced.
    train_end = (n.cast(pl.Float64) * r.train).floor().cast(pl.Int64)
    # round(): 0.7 + 0.1 is 0.7999999999999999 in floating point; DAF:re multiplies by the literal 0.8.
    val_end = (n.cast(pl.Float64) * round(r.train + r.val, 12)).floor().cast(pl.Int64)
    return df.with_columns(
        pl.when(rank < train_end).then(pl.lit("train")).when(rank < val_end).then(pl.lit("val"))
        .otherwise(pl.lit("test")).alias("split"))


def by_group(df: pl.DataFrame, cfg: SplitParams) -> pl.DataFrame:
    col = cfg.group_column
    if col not in df.columns:
        raise SplitError(f"split.group_column: column {col!r} is not in the manifest (columns: {df.columns})")
    present = set(df[col].cast(pl.String).unique().to_list())
    unknown = sorted((set(cfg.test_groups) | set(cfg.val_groups)) - present)
    if unknown:
        raise SplitError(f"split.test_groups/val_groups: groups {unknown} are not in column {col!r} "
                         f"(present: {sorted(present)[:20]})")
    g = pl.col(col).cast(pl.String)
    return df.with_columns(
        pl.when(g.is_in(cfg.test_groups)).then(pl.lit("test")).when(g.is_in(cfg.val_groups)).then(pl.lit("val"))
        .otherwise(pl.lit("train")).alias("split"))


def check(df: pl.DataFrame, cfg: SplitParams) -> None:
    """Guarantees checked on every run: one split per image, no group straddling splits, train for every class."""
    manifest.validate(df, "split manifest")
    if df["split"].is_null().any():
        raise SplitError("some images have no split")
    if cfg.strategy == "group":
        straddle = df.group_by(cfg.group_column).agg(pl.col("split").n_unique().alias("k")).filter(pl.col("k") > 1)
        if straddle.height:
            raise SplitError(f"groups in more than one split: {straddle[cfg.group_column].to_list()[:10]}")
    no_train = set(df["class_name"].unique()) - set(df.filter(pl.col("split") == "train")["class_name"].unique())
    if no_train:
        raise SplitError(f"{len(no_train)} classes have no train images, e.g. {sorted(no_train)[:5]}")


def split(df: pl.DataFrame, cfg: SplitParams, seed: int) -> tuple[pl.DataFrame, dict]:
    out = per_class(df, cfg, seed) if cfg.strategy == "per_class" else by_group(df, cfg)
    check(out, cfg)
    counts = {s: out.filter(pl.col("split") == s).height for s in manifest.SPLITS}
    classes = {s: out.filter(pl.col("split") == s)["class_id"].n_unique() for s in manifest.SPLITS}
    return out, {"images": counts, "classes": classes, "total": out.height}
