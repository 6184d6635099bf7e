"""The `split` stage: assign train/val/test deterministically, then check the guarantees.

Strategies (split.strategy):
- per_class: DAF:re's rule. For each class, in manifest order (or after a seeded shuffle), the first
  int(train * n) rows are train, up to int((train + val) * n) val, the rest test.
- group: whole groups of `split.group_column` (artists, posts, near-duplicate groups) are held out: the listed
  test/val groups (leave one artist out), or, with group_assign: ratio, a seeded draw of groups filling the ratios,
  or with ratio_per_class the same draw inside each class (the folder source's <class>/<group>/<image> groups;
  groups that near-duplicates join are drawn as one, so nothing has to move afterwards).
- official: the source's own `split` column (DAF:re release, CUB, ...), which `clean` passes through.

Near-duplicate groups (`dup_group`, written by clean) never straddle splits, whatever the strategy: after the
strategy has assigned rows, every member of a group takes the split of the group's earliest row in manifest order.
A group of one is untouched, so without near-duplicates every strategy gives exactly its own rule (DAF:re's
assignments are reproduced row for row). The rows moved are counted in the metrics (`dup_group_moves`); under
`official` that count is how far the result deviates from the release.

Guarantees, checked at the end (SplitError otherwise): every row has a split; no image (image_id, file or md5) in
two splits; no near-duplicate group in two splits; for `group`, no group in two splits except rows moved to keep a
near-duplicate group whole; every class that survives has train images.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from pipeline.data import manifest
from pipeline.data_config import SplitParams

DUP_GROUP = "dup_group"


class SplitError(ValueError):
    """The split breaks a guarantee (a class without train images, an image in two splits, ...)."""


def _rule(rank: pl.Expr, n: pl.Expr, cfg: SplitParams) -> pl.Expr:
    r = cfg.ratios
    # Same arithmetic as DAF:re (int() truncation of float products), so its release assignments are reproduced.
    train_end = (n.cast(pl.Float64) * r.train).floor().cast(pl.Int64)
    # round(): 0.7 + 0.1 is 0.7999999999999999 in floating point; DAF:re multiplies by the literal 0.8.
    val_end = (n.cast(pl.Float64) * round(r.train + r.val, 12)).floor().cast(pl.Int64)
    return (
        pl.when(rank < train_end)
        .then(pl.lit("train"))
        .when(rank < val_end)
        .then(pl.lit("val"))
        .otherwise(pl.lit("test"))
        .alias("split")
    )


def per_class(df: pl.DataFrame, cfg: SplitParams, seed: int) -> pl.DataFrame:
    """DAF:re's rule per class. Rows keep their manifest order in the output, shuffled or not."""
    if not cfg.shuffle:
        return df.with_columns(_rule(pl.int_range(pl.len()).over("class_id"), pl.len().over("class_id"), cfg))
    # A seeded permutation as the within-class order (numpy's generator: stable across polars versions).
    key = pl.Series("_key", np.random.default_rng(seed).permutation(df.height))
    rank = pl.col("_key").rank("ordinal").over("class_id") - 1
    return df.with_columns(key).with_columns(_rule(rank, pl.len().over("class_id"), cfg)).drop("_key")


def official(df: pl.DataFrame, cfg: SplitParams) -> pl.DataFrame:
    """The source's split column as is; every row must have one."""
    missing = df.filter(pl.col("split").is_null())
    if missing.height:
        raise SplitError(
            f"split.strategy 'official': {missing.height} of {df.height} images have no split from "
            f"their source (e.g. {missing['image_id'].head(3).to_list()}); only sources with an "
            "official split (DAF:re, CUB, ...) fill it: choose per_class or group"
        )
    return df


def _group_column(df: pl.DataFrame, cfg: SplitParams) -> pl.Expr:
    col = cfg.group_column
    if col not in df.columns:
        raise SplitError(f"split.group_column: column {col!r} is not in the manifest (columns: {df.columns})")
    return pl.col(col).cast(pl.String)


def by_group(df: pl.DataFrame, cfg: SplitParams, seed: int = 0) -> pl.DataFrame:
    g = _group_column(df, cfg)
    if cfg.group_assign == "ratio":
        return _groups_by_ratio(df, cfg, seed)
    if cfg.group_assign == "ratio_per_class":
        return _groups_by_class_ratio(df, cfg, seed)
    present = set(df.select(g.unique())[cfg.group_column].to_list())
    unknown = sorted((set(cfg.test_groups) | set(cfg.val_groups)) - present)
    if unknown:
        raise SplitError(
            f"split.test_groups/val_groups: groups {unknown} are not in column {cfg.group_column!r} "
            f"(present: {sorted(present, key=str)[:20]})"
        )
    return df.with_columns(
        pl.when(g.is_in(cfg.test_groups))
        .then(pl.lit("test"))
        .when(g.is_in(cfg.val_groups))
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )


def _groups_by_ratio(df: pl.DataFrame, cfg: SplitParams, seed: int) -> pl.DataFrame:
    """Groups in a seeded random order fill test, then val, up to their share of rows; the rest is train.

    A group goes to test while the rows already in test are below ratios.test * N, so the shares are met to within
    one group. Nulls form one group of their own.
    """
    col, r = cfg.group_column, cfg.ratios
    sizes = df.group_by(pl.col(col).cast(pl.String).alias("_g")).len().sort("_g", nulls_last=True)
    order = np.random.default_rng(seed).permutation(sizes.height)
    sizes = sizes[order].with_columns((pl.col("len").cum_sum() - pl.col("len")).alias("_before"))
    n = df.height
    assign = sizes.select(
        "_g",
        pl.when(pl.col("_before") < r.test * n)
        .then(pl.lit("test"))
        .when(pl.col("_before") < (r.test + r.val) * n)
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
        .alias("_split"),
    )
    return (
        df.with_columns(pl.col(col).cast(pl.String).alias("_g"))
        .join(assign, on="_g", how="left", maintain_order="left", nulls_equal=True)
        .with_columns(pl.col("_split").alias("split"))
        .drop("_g", "_split")
    )


def merged_units(df: pl.DataFrame, column: str) -> pl.Series:
    """One id per set of rows linked by sharing `column` or a near-duplicate group (`dup_group`, when present): the
    connected components, found by propagating the smallest row index over both keys until nothing changes."""
    keys = [c for c in (column, DUP_GROUP) if c in df.columns]
    units = df.select(*(pl.col(k).cast(pl.String) for k in keys)).with_row_index("_u")
    while True:
        before = units["_u"]
        for key in keys:
            units = units.with_columns(pl.col("_u").min().over(key))
        if units["_u"].equals(before):
            return units["_u"]


def _groups_by_class_ratio(df: pl.DataFrame, cfg: SplitParams, seed: int) -> pl.DataFrame:
    """In each class, its groups in a seeded random order fill train, then val, up to their shares; the rest is
    test. Train comes first, so a class with a single group only trains. Groups that near-duplicates join are one
    draw, so neither the group nor the near-duplicate group straddles splits. A group spanning classes is an error."""
    r = cfg.ratios
    frame = df.with_columns(merged_units(df, cfg.group_column).alias("_u"))
    spans = (
        frame.group_by("_u")
        .agg(pl.col("class_name").n_unique().alias("k"), pl.col(cfg.group_column).first())
        .filter(pl.col("k") > 1)
    )
    if spans.height:
        raise SplitError(
            f"split.group_assign 'ratio_per_class': {spans.height} groups of {cfg.group_column!r} hold "
            f"images of several classes (e.g. {spans[cfg.group_column].head(3).to_list()}, counting "
            "groups joined by near-duplicates); use group_assign: ratio"
        )
    sizes = frame.group_by("class_name", "_u").len().sort("class_name", "_u")
    order = np.random.default_rng(seed).permutation(sizes.height)
    sizes = (
        sizes[order]
        .sort("class_name", maintain_order=True)
        .with_columns(
            (pl.col("len").cum_sum() - pl.col("len")).over("class_name").alias("_before"),
            pl.col("len").sum().over("class_name").alias("_n"),
        )
    )
    assign = sizes.select(
        "_u",
        pl.when(pl.col("_before") < r.train * pl.col("_n"))
        .then(pl.lit("train"))
        .when(pl.col("_before") < round(r.train + r.val, 12) * pl.col("_n"))
        .then(pl.lit("val"))
        .otherwise(pl.lit("test"))
        .alias("_split"),
    )
    return (
        frame.join(assign, on="_u", how="left", maintain_order="left")
        .with_columns(pl.col("_split").alias("split"))
        .drop("_u", "_split")
    )


STRATEGIES = {
    "per_class": lambda df, cfg, seed: per_class(df, cfg, seed),
    "group": lambda df, cfg, seed: by_group(df, cfg, seed),
    "official": lambda df, cfg, seed: official(df, cfg),
}


def keep_dup_groups_together(df: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """Every near-duplicate group takes the split of its earliest row (manifest order). Returns (df, rows moved)."""
    if DUP_GROUP not in df.columns:
        return df, 0
    first = pl.col("split").first().over(DUP_GROUP)
    target = pl.when(pl.col(DUP_GROUP).is_not_null()).then(first).otherwise(pl.col("split"))
    moved = df.select((target != pl.col("split")).sum()).item()
    return df.with_columns(target.alias("split")), int(moved or 0)


def _straddling(df: pl.DataFrame, key: str | pl.Expr) -> pl.DataFrame:
    key = pl.col(key) if isinstance(key, str) else key
    return (
        df.filter(key.is_not_null())
        .group_by(key.alias("_key"))
        .agg(pl.col("split").n_unique().alias("k"))
        .filter(pl.col("k") > 1)
        .sort("_key")
    )


def check(df: pl.DataFrame, cfg: SplitParams) -> None:
    """The guarantees, checked on every run (see the module docstring)."""
    manifest.validate(df, "split manifest")  # also: image_id unique, split values known
    if df["split"].is_null().any():
        raise SplitError("some images have no split")
    for what, key in (("files", "path"), ("images with the same md5", "md5")):
        both = _straddling(df, key)
        if both.height:
            raise SplitError(f"{what} in more than one split: {both['_key'].head(10).to_list()}")
    if DUP_GROUP in df.columns:
        both = _straddling(df, DUP_GROUP)
        if both.height:
            raise SplitError(f"near-duplicate groups in more than one split: {both['_key'].head(10).to_list()}")
    if cfg.strategy == "group":
        rows = df
        if DUP_GROUP in df.columns:  # members of a near-duplicate group may have been moved to keep it whole
            rows = df.filter(pl.len().over(DUP_GROUP) == 1)
        both = _straddling(rows, cfg.group_column)
        if both.height:
            raise SplitError(f"groups in more than one split: {both['_key'].head(10).to_list()}")
    no_train = set(df["class_name"].unique()) - set(df.filter(pl.col("split") == "train")["class_name"].unique())
    if no_train:
        raise SplitError(f"{len(no_train)} classes have no train images, e.g. {sorted(no_train)[:5]}")


def per_class_counts(df: pl.DataFrame) -> pl.DataFrame:
    """class_id, class_name, train, val, test, total: one row per class (a CSV beside the metrics json)."""
    counts = (
        df.group_by("class_id", "class_name")
        .agg(*[(pl.col("split") == s).sum().cast(pl.Int64).alias(s) for s in manifest.SPLITS], pl.len().alias("total"))
        .sort("class_id")
    )
    return counts.with_columns(pl.col("total").cast(pl.Int64))


def split(df: pl.DataFrame, cfg: SplitParams, seed: int) -> tuple[pl.DataFrame, dict]:
    """Assign splits with cfg.strategy, keep near-duplicate groups whole, check; returns (manifest, metrics)."""
    out = STRATEGIES[cfg.strategy](df, cfg, seed)
    out, moved = keep_dup_groups_together(out)
    check(out, cfg)
    table = per_class_counts(out)
    counts = {s: int(table[s].sum()) for s in manifest.SPLITS}
    classes = {s: int((table[s] > 0).sum()) for s in manifest.SPLITS}
    train = table["train"] if table.height else pl.Series([0])
    return out, {
        "images": counts,
        "classes": classes,
        "total": out.height,
        "dup_group_moves": moved,
        "train_per_class": {"min": int(train.min()), "median": float(train.median()), "max": int(train.max())},
    }
