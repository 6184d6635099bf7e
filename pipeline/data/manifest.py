"""The manifest: one row per image, the contract between stages (parquet, written with polars).

Paths are relative to the folder the manifest lives in (or the image root given next to it), so a data folder can be
moved, pushed to a DVC remote and pulled elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.io import write_parquet

MANIFEST = "manifest.parquet"

# Required columns and their types. Sources may add more (e.g. post_id, rating, score for Danbooru).
SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String,  # unique, stable across stages
    "path": pl.String,  # relative to the image root
    "class_id": pl.Int64,  # contiguous 0..C-1 after `clean`
    "class_name": pl.String,
    "source": pl.String,  # embedded, folder, danbooru, dafre, ...
    "group": pl.String,  # artist, post or near-duplicate group: what a group split holds out
    "md5": pl.String,
    "width": pl.Int64,
    "height": pl.Int64,
    "split": pl.String,  # train | val | test; null until `split` (or the source's official split)
}
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest misses columns, has wrong types or breaks an invariant."""


def validate(df: pl.DataFrame, where: str) -> pl.DataFrame:
    missing = [c for c in SCHEMA if c not in df.columns]
    if missing:
        raise ManifestError(f"{where}: missing columns {missing}")
    wrong = [f"{c} is {df.schema[c]}, expected {t}" for c, t in SCHEMA.items() if df.schema[c] != t]
    if wrong:
        raise ManifestError(f"{where}: wrong column types: {'; '.join(wrong)}")
    if df["image_id"].n_unique() != df.height:
        raise ManifestError(f"{where}: image_id is not unique")
    bad = df.filter(pl.col("split").is_not_null() & ~pl.col("split").is_in(SPLITS))
    if bad.height:
        raise ManifestError(f"{where}: split must be one of {SPLITS}, got {bad['split'].unique().to_list()}")
    return df


def read(path: str | Path) -> pl.DataFrame:
    """Read a manifest file (or the manifest.parquet inside a folder) and check its schema."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    if not path.is_file():
        raise ManifestError(f"manifest {path} does not exist (did the previous stage run?)")
    return validate(pl.read_parquet(path), str(path))


def write(df: pl.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".parquet":
        path = path / MANIFEST
    cols = list(SCHEMA) + [c for c in df.columns if c not in SCHEMA]
    write_parquet(path, validate(df.select(cols), str(path)))
    return path


def empty() -> pl.DataFrame:
    return pl.DataFrame(schema=SCHEMA)
