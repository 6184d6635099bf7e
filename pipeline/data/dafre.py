"""The `dafre` source: an unpacked DAF:re release (Rios et al. 2021), with its official train/val/test split.

Release layout (docs/methods.md#dafre):

    <path>/faces/<4-digit bucket>/<danbooru id>.jpg     (or fullMin256/, the "DAF:re Full" / DAFB images)
    <path>/labels/train.csv, val.csv, test.csv          `class_id,dir`, no header (GLSim's copies have one)
    <path>/labels/classid_classname.csv                 `id,name`, no header
    (or the same CSVs directly in <path>, GLSim's data/daf layout; see release_paths)

The label rows become manifest rows in release order (train, val, test; file order within): the DAF:re split is a
head/tail cut of each class in that order, so `split.strategy: per_class` reproduces it only if the order is kept.
Label parsing and image copying are the csv source's (labelcsv.py); this module adds what is DAF:re-specific.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl

from pipeline.data import labelcsv, registry
from pipeline.data_config import DafreSource

SOURCE = "dafre"
_POST_ID = r"(?:^|/)(\d+)\.[A-Za-z0-9]+$"  # `0291/1796291.jpg` -> 1796291: Danbooru post ids name the files


ARCHIVES = ("dafre_faces.tar.gz", "dafre_full.tar.gz", "labels.tar.gz")  # the release's files, before unpacking


def release_paths(base: Path, images: str) -> tuple[Path, Path, Path]:
    """(image folder, labels folder, class-name file) of a release; the folders and class names must exist.

    Labels are read from `labels/` (the release tarball) or, when there is none, from the CSVs beside the image
    folder: the layout GLSim's dataset config reads (`data/daf/{train,val,test,classid_classname}.csv` next to
    `fullMin256/`; its extra train_val.csv is ignored). A folder that still holds the release archives is named as
    such, with the command that unpacks them."""
    image_root, labels_dir = base / images, base / "labels"
    packed = [a for a in ARCHIVES if (base / a).is_file()]
    if packed and not image_root.is_dir():
        raise FileNotFoundError(
            f"acquire.dafre.path: {base} holds the release archives {packed}, not unpacked: run "
            f"`cd {base} && " + " && ".join(f"tar xzf {a}" for a in packed) + "` first"
        )
    if not labels_dir.is_dir() and any((base / f"{s}.csv").is_file() for s in labelcsv.SPLIT_FILES):
        labels_dir = base  # GLSim's layout: the label CSVs beside the image folder
    for folder, what in ((image_root, f"image folder ({images}/)"), (labels_dir, "label folder")):
        if not folder.is_dir():
            raise FileNotFoundError(f"acquire.dafre.path: DAF:re {what} {folder} does not exist")
    names = labels_dir / labelcsv.CLASS_NAMES_FILE
    if not names.is_file():
        raise FileNotFoundError(f"acquire.dafre.path: DAF:re class-name file {names} does not exist")
    return image_root, labels_dir, names


def label_table(labels_dir: Path) -> pl.DataFrame:
    """The release's label rows (those split files that exist) with DAF:re ids: one row per image, release order.

    Adds image_id `dafre-<post id>`, group `post-<post id>` (one post, one group), post_id and official_class_id.
    """
    table = labelcsv.read_labels(labels_dir, labels_dir / labelcsv.CLASS_NAMES_FILE)
    table = table.with_columns(pl.col("dir").str.extract(_POST_ID, 1).cast(pl.Int64).alias("post_id"))
    bad = table.filter(pl.col("post_id").is_null())
    if bad.height:
        row = bad.row(0, named=True)
        raise labelcsv.LabelFileError(
            f"{row['file']}:{row['line']}: {row['dir']!r} is not a DAF:re image path (<bucket>/<danbooru id>.jpg)"
        )
    return table.with_columns(
        pl.format("dafre-{}", "post_id").alias("image_id"),
        pl.format("post-{}", "post_id").alias("group"),
        pl.col("class_id").alias("official_class_id"),
    )


def from_dafre(cfg: DafreSource, root: Path, out: Path) -> pl.DataFrame:
    """Import a DAF:re release into `out` (tar shards of cfg.shard_size images, or plain files); see the module doc.

    class_id is the official one (0..3262) so that models and papers agree; `clean` re-indexes only if classes go.
    """
    image_root, labels_dir, _ = release_paths(root / str(cfg.path), cfg.images)
    table = label_table(labels_dir)
    # Only a warning: importing a subset of the release (fewer classes) is a normal thing to do.
    registry.check("dafb" if cfg.images == "fullMin256" else "daf", table, strict=False)
    return labelcsv.import_images(table, image_root, out, source=SOURCE, shard_size=cfg.shard_size)


CLI_HELP = "an unpacked DAF:re release (faces/ or fullMin256/ + labels/), official train/val/test split kept"


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", required=True, help="release folder holding faces/ or fullMin256/ and labels/")
    p.add_argument("--images", choices=("faces", "fullMin256"), help="which image folder to import (default faces)")
    p.add_argument(
        "--shard-size",
        type=labelcsv.shard_size_arg,
        metavar="N",
        help="images per tar shard (default 2048); 0 or none: plain files under images/",
    )


def section_from_cli(args: argparse.Namespace) -> dict:
    section = {k: v for k, v in (("path", args.path), ("images", args.images)) if v is not None}
    if args.shard_size is not None:
        section["shard_size"] = args.shard_size or None
    return section
