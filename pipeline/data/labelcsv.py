"""The `csv` source: `class_id,dir` label CSVs (train/val/test) over an image root, the format of DAF:re and GLSim.

This module also holds what the `dafre` source builds on, so both read labels and copy images the same way:

- `read_split_file` / `read_class_names` parse one CSV each (header line optional) and report bad rows by file:line;
- `read_labels` joins the split files (train, val, test, file order kept) with the class names and checks them as a
  whole (duplicate paths, class ids the class-name file does not know);
- `import_images` copies the images of a label table into the output folder (plain files or tar shards), records
  md5 and size, and lists images that are not there in `missing.parquet` instead of failing.

Label rows are untrusted: every `dir` is checked with images.safe_relpath before any image is opened.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
from pathlib import Path

import polars as pl
from PIL import Image

from pipeline.data import manifest, registry
from pipeline.data.images import ImageWriter, safe_relpath
from pipeline.data.sourcefiles import OutsideRoot, Unresolvable, resolve_inside
from pipeline.data_config import CsvSource
from pipeline.io import write_parquet
from pipeline.progress import progress

SPLIT_FILES = ("train", "val", "test")  # release order: the split stage's per_class rule depends on manifest order
CLASS_NAMES_FILE = "classid_classname.csv"
MISSING = "missing.parquet"
LABEL_HEADERS = {("class_id", "dir")}  # GLSim's copies carry this header; the DAF:re originals have none
CLASS_NAME_HEADERS = {("id", "name"), ("class_id", "name"), ("class_id", "class_name")}
# Columns of a label table (read_labels); sources add image_id, group and their own extras before import_images.
LABEL_COLUMNS = ("split", "file", "line", "class_id", "class_name", "dir")
_CHUNK = 4096  # rows per batch of import results: memory stays flat at 463k images


class LabelFileError(ValueError):
    """A label or class-name CSV has a malformed, unsafe, duplicate or unknown row; the message names file:line."""


# -------------------------------------------------------------------------------------------------------- parsing


def _lines(path: Path) -> pl.DataFrame:
    """The file's non-blank lines with their 1-based line numbers (utf-8, a BOM and CRLF endings tolerated)."""
    text = path.read_text(encoding="utf-8-sig")
    raw = pl.DataFrame({"raw": text.splitlines()}, schema={"raw": pl.String})
    return (
        raw.with_row_index("line", offset=1)
        .with_columns(pl.col("line").cast(pl.Int64))
        .filter(pl.col("raw").str.strip_chars() != "")
    )


def _drop_header(lines: pl.DataFrame, headers: set[tuple[str, ...]]) -> pl.DataFrame:
    """Drop the first line if it is one of the known header lines (compared without case and spaces)."""
    if lines.height == 0:
        return lines
    first = tuple(f.strip().lower() for f in lines["raw"][0].split(","))
    return lines.slice(1) if first in headers else lines


def _two_fields(lines: pl.DataFrame, path: Path, second: str, what: str, commas: bool = False) -> pl.DataFrame:
    """Split each line into an integer id and a non-empty second field; the first bad line is an error.

    commas: the second field is the rest of the line (class names may hold commas); otherwise a third field makes
    the row malformed (a path never needs one, and silently keeping `a.jpg,x` as a path would hide the mistake).
    """
    rest = r"(.*?)" if commas else r"([^,]*?)"
    parts = lines.with_columns(
        pl.col("raw").str.extract_groups(rf"^\s*(\d+)\s*,\s*{rest}\s*$").struct.rename_fields(["id", second]).alias("m")
    ).unnest("m")
    bad = parts.filter(pl.col("id").is_null() | (pl.col(second) == ""))
    if bad.height:
        line, raw = bad.row(0, named=True)["line"], bad.row(0, named=True)["raw"]
        raise LabelFileError(
            f"{path}:{line}: malformed row {raw!r}, expected {what} ({bad.height} malformed row(s) in the file)"
        )
    return parts.with_columns(pl.col("id").cast(pl.Int64))


def read_split_file(path: Path, split: str) -> pl.DataFrame:
    """One `class_id,dir` file -> columns split, file, line, class_id, dir (dir checked and normalised)."""
    lines = _drop_header(_lines(path), LABEL_HEADERS)
    parts = _two_fields(lines, path, "dir", "'class_id,dir' with an integer class id")
    dirs = []
    for line, d in zip(parts["line"], parts["dir"]):
        try:
            dirs.append(safe_relpath(d).as_posix())  # normalised: 'a/./b.jpg' and 'a/b.jpg' are one file
        except ValueError as exc:
            raise LabelFileError(f"{path}:{line}: {exc}") from None
    return parts.select(
        pl.lit(split).alias("split"),
        pl.lit(str(path), pl.Categorical).alias("file"),
        "line",
        pl.col("id").alias("class_id"),
        pl.Series("dir", dirs, pl.String),
    )


def read_class_names(path: Path) -> pl.DataFrame:
    """An `id,name` file -> columns class_id, class_name; ids must be unique."""
    lines = _drop_header(_lines(path), CLASS_NAME_HEADERS)
    parts = _two_fields(lines, path, "class_name", "'id,name' with an integer id", commas=True)
    dup = parts.filter(pl.col("id").is_duplicated())
    if dup.height:
        first, again = dup.row(0, named=True), dup.row(1, named=True)
        raise LabelFileError(f"{path}:{again['line']}: class id {again['id']} already named on line {first['line']}")
    # Names such as "a, b" may arrive quoted; the split above keeps everything after the first comma.
    name = pl.col("class_name")
    unquoted = (
        pl.when(name.str.starts_with('"') & name.str.ends_with('"') & (name.str.len_chars() >= 2))
        .then(name.str.slice(1, name.str.len_chars() - 2).str.replace_all('""', '"', literal=True))
        .otherwise(name)
    )
    return parts.select(pl.col("id").alias("class_id"), unquoted.alias("class_name"))


def split_files(labels_dir: Path) -> list[tuple[str, Path]]:
    """The split files present in labels_dir, in release order; at least one is required."""
    found = [(s, labels_dir / f"{s}.csv") for s in SPLIT_FILES if (labels_dir / f"{s}.csv").is_file()]
    if not found:
        wanted = ", ".join(str(labels_dir / f"{s}.csv") for s in SPLIT_FILES)
        raise FileNotFoundError(f"no label file found: expected at least one of {wanted}")
    return found


def read_labels(labels_dir: Path, class_names: Path | None) -> pl.DataFrame:
    """All split files of labels_dir joined with class names -> LABEL_COLUMNS, in release order.

    class_names None: classes are named `class_<id>`. Otherwise every class id in the split files must be in it.
    """
    files = split_files(labels_dir)
    table = pl.concat([read_split_file(path, split) for split, path in files], how="vertical")
    if table.height == 0:
        raise LabelFileError(f"label files {', '.join(str(p) for _, p in files)} have no rows")
    _check_unique(table, "dir", "image path")
    if class_names is None:
        return table.with_columns(pl.format("class_{}", "class_id").alias("class_name")).select(LABEL_COLUMNS)
    if not class_names.is_file():
        raise FileNotFoundError(f"class-name file {class_names} does not exist")
    names = read_class_names(class_names)
    table = table.join(names, on="class_id", how="left", maintain_order="left")
    unknown = table.filter(pl.col("class_name").is_null())
    if unknown.height:
        row = unknown.row(0, named=True)
        raise LabelFileError(
            f"{row['file']}:{row['line']}: class id {row['class_id']} is not in {class_names} "
            f"({unknown.height} row(s) with unknown class ids)"
        )
    return table.select(LABEL_COLUMNS)


def _check_unique(table: pl.DataFrame, column: str, what: str) -> None:
    """A value seen twice is an error naming both rows (a label table has `file` and `line`)."""
    dup = table.filter(pl.col(column).is_duplicated())
    if dup.height:
        value = dup[column][0]
        first, again = dup.filter(pl.col(column) == value).head(2).iter_rows(named=True)
        raise LabelFileError(
            f"{again['file']}:{again['line']}: duplicate {what} {value!r} (already on {first['file']}:{first['line']})"
        )


# ------------------------------------------------------------------------------------------------------- importing


def _image_size(data: bytes) -> tuple[int | None, int | None]:
    """Header-only read; undecodable files are kept here and quarantined by `clean`, which records the reasons."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:
        return None, None


def _copy_one(root: Path, src: Path, name: str, writer: ImageWriter) -> dict:
    """Copy one image into the writer; a file that is not there (or unreadable) becomes a reason, not an error."""
    try:
        data = resolve_inside(root, src).read_bytes()  # a link out of the image root is never read
    except OutsideRoot:
        return {"reason": "links outside the image root (not read)"}
    except Unresolvable:
        return {"reason": "symlink loop (the link leads back to itself)"}
    except FileNotFoundError:
        return {"reason": "not found"}
    except OSError as exc:  # a directory, a permission problem, an I/O error: report it with the others
        return {"reason": f"unreadable: {exc.strerror or exc}"}
    width, height = _image_size(data)
    return {"path": writer.write(name, data), "md5": hashlib.md5(data).hexdigest(), "width": width, "height": height}


_RESULT_SCHEMA = {"path": pl.String, "md5": pl.String, "width": pl.Int64, "height": pl.Int64, "reason": pl.String}


def _copy_all(dirs: pl.Series, image_root: Path, writer: ImageWriter, desc: str) -> pl.DataFrame:
    """One result row per dir (path/md5/size, or the reason it is missing); image bytes are held one at a time."""
    chunks, batch = [], []
    for d in progress(dirs, total=len(dirs), desc=desc, unit="img"):
        batch.append(_copy_one(image_root, image_root / d, d, writer))
        if len(batch) == _CHUNK:
            chunks.append(pl.DataFrame(batch, schema=_RESULT_SCHEMA))
            batch = []
    chunks.append(pl.DataFrame(batch, schema=_RESULT_SCHEMA))
    return pl.concat(chunks, how="vertical")


def import_images(
    table: pl.DataFrame, image_root: Path, out: Path, *, source: str, shard_size: int | None
) -> pl.DataFrame:
    """Copy the images of a label table under `out` and return its manifest rows (present images, table order).

    `table` has LABEL_COLUMNS plus image_id and group; other columns are kept as manifest extras. Images go to
    `out/images/<dir>` (shard_size None) or into tar shards of shard_size members. Images that are not there are
    left out and listed in out/missing.parquet (image_id, path, split, reason); the count is printed.
    """
    _check_unique(table, "image_id", "image id")
    with ImageWriter(out, shard_size) as writer:
        results = _copy_all(table["dir"], image_root, writer, desc=f"{source}: import images")
    done = pl.concat([table, results], how="horizontal")
    missing = done.filter(pl.col("reason").is_not_null())
    write_parquet(out / MISSING, missing.select("image_id", pl.col("dir").alias("path"), "split", "reason"))
    if missing.height:
        examples = ", ".join(missing["dir"].head(3).to_list())
        print(
            f"{source}: {missing.height} of {table.height} images missing under {image_root} (e.g. {examples}); "
            f"listed in {MISSING} of the output folder",
            file=sys.stderr,
        )  # `out` may be a temporary sibling
    present = done.filter(pl.col("reason").is_null()).with_columns(pl.lit(source).alias("source"))
    if present.height == 0:  # every image missing: a wrong folder (or --images), not a few lost files
        examples = ", ".join(f"{d} ({r})" for d, r in missing.select("dir", "reason").head(3).iter_rows())
        raise FileNotFoundError(
            f"{source}: none of the {table.height} images of the label files exist under "
            f"{image_root} (e.g. {examples}); nothing was written"
        )
    extras = [c for c in present.columns if c not in manifest.SCHEMA and c not in (*LABEL_COLUMNS, "reason")]
    return present.select(*manifest.SCHEMA, *extras).cast(manifest.SCHEMA)


# ----------------------------------------------------------------------------------------------------- the source


def _resolve(root: Path, cfg: CsvSource) -> tuple[Path, Path, Path | None]:
    """(image root, labels folder, class-name file or None) with the documented defaults."""
    image_root = root / str(cfg.path)
    labels_dir = root / cfg.labels if cfg.labels else image_root / "labels"
    if not labels_dir.is_dir():
        raise FileNotFoundError(f"acquire.csv.labels: label folder {labels_dir} does not exist")
    if cfg.class_names:  # given explicitly: it must exist
        names = root / cfg.class_names
        if not names.is_file():
            raise FileNotFoundError(f"acquire.csv.class_names: file {names} does not exist")
        return image_root, labels_dir, names
    default = labels_dir / CLASS_NAMES_FILE
    return image_root, labels_dir, default if default.is_file() else None


def from_csv(cfg: CsvSource, root: Path, out: Path) -> pl.DataFrame:
    """`class_id,dir` CSVs over an image root. Each image is its own group; the CSV's split is kept."""
    image_root, labels_dir, names = _resolve(root, cfg)
    if cfg.dataset is not None:
        registry.lookup(cfg.dataset)  # an unknown name fails before anything is read
    table = read_labels(labels_dir, names)
    if cfg.dataset is not None:
        registry.check(cfg.dataset, table)  # before copying: a wrong dataset should cost nothing
    table = table.with_columns(pl.col("dir").alias("image_id"), pl.col("dir").alias("group"))
    return import_images(table, image_root, out, source="csv", shard_size=cfg.shard_size)


CLI_HELP = "label CSVs (`class_id,dir` per split: train/val/test.csv) over an image folder (GLSim / DAF:re format)"


def shard_size_arg(text: str) -> int:
    """--shard-size: a positive count, or 0 / none for plain files (0 stands for the params' null)."""
    if text.lower() in ("0", "none", "null"):
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 0 or none, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, 0 or none, got {text!r}")
    return value


def add_cli_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", required=True, help="image root that the CSVs' dir column is relative to")
    p.add_argument("--labels", metavar="DIR", help="folder with train.csv/val.csv/test.csv (default: PATH/labels)")
    p.add_argument(
        "--class-names",
        metavar="FILE",
        help=f"`id,name` CSV (default: LABELS/{CLASS_NAMES_FILE} if present, else class_<id>)",
    )
    p.add_argument(
        "--dataset", metavar="NAME", help=f"registry name whose class count is checked: {', '.join(registry.keys())}"
    )
    p.add_argument(
        "--shard-size",
        type=shard_size_arg,
        metavar="N",
        help="images per tar shard; default (or 0 / none): plain files under images/",
    )


def section_from_cli(args: argparse.Namespace) -> dict:
    given = {"path": args.path, "labels": args.labels, "class_names": args.class_names, "dataset": args.dataset}
    section = {k: v for k, v in given.items() if v is not None}
    if args.shard_size:
        section["shard_size"] = args.shard_size
    return section
