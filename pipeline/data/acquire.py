"""The `acquire` stage: fill an output folder with images + manifest.parquet from one source.

Each source is a function (params section, project root, out dir) -> manifest DataFrame, registered in SOURCES.
Images are copied under `out/images/`, so the stage output is self-contained (DVC caches and pushes it as one folder).
"""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
from PIL import Image

from pipeline import outdir
from pipeline.data import manifest, sourcefiles
from pipeline.data_config import AcquireParams, EmbeddedSource, FolderSource
from pipeline.io import md5_file, write_parquet

SKIPPED = "skipped.parquet"  # entries of a folder source that were not imported, and why
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _image_size(path: Path) -> tuple[int | None, int | None]:
    """Header-only read; undecodable files are kept here and quarantined by `clean`, which has the reasons."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:
        return None, None


def _rows_from_files(files: list[tuple[Path, str, str, str, str]], out: Path, source: str) -> pl.DataFrame:
    """Copy (src, rel_dest, image_id, class_name, group) files under out/ and describe them."""
    rows = []
    for src, rel, image_id, class_name, group in files:
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        w, h = _image_size(dest)
        rows.append(
            dict(
                image_id=image_id,
                path=rel,
                class_name=class_name,
                source=source,
                group=group,
                md5=md5_file(dest),
                width=w,
                height=h,
            )
        )
    df = pl.DataFrame(rows, schema={k: v for k, v in manifest.SCHEMA.items() if k not in ("class_id", "split")})
    names = sorted(df["class_name"].unique().to_list())
    ids = pl.DataFrame({"class_name": names, "class_id": list(range(len(names)))})
    return df.join(ids, on="class_name", how="left").with_columns(pl.lit(None, pl.String).alias("split"))


def from_embedded(cfg: EmbeddedSource, root: Path, out: Path) -> pl.DataFrame:
    """The committed cross-artist emoji set: one class per emoji, one group per drawing style (artist)."""
    base = root / cfg.path
    index = pl.read_csv(base / "index.csv", infer_schema_length=0)  # all strings: codepoints like 0023 stay text
    for key, column, wanted in (("categories", "category", cfg.categories), ("styles", "style", cfg.styles)):
        unknown = sorted(set(wanted) - set(index[column]))
        if unknown:
            raise ValueError(
                f"acquire.embedded.{key}: {unknown} not in {base / 'index.csv'} "
                f"(available: {sorted(set(index[column]))})"
            )
    index = index.filter(pl.col("category").is_in(cfg.categories) & pl.col("style").is_in(cfg.styles))
    files = [
        (
            base / r["file"],
            f"images/{r['file'].removeprefix('images/')}",
            f"{r['style']}-{r['codepoint']}",
            r["class_name"],
            r["style"],
        )
        for r in index.sort("codepoint", "style").iter_rows(named=True)
    ]
    return _rows_from_files(files, out, "embedded")


def folder_group(rel: str, rule: str) -> str:
    """The `group` of an image at <class>/.../<image> (rel, below the folder root) under acquire.folder.group.

    subfolder: `<class>/<first folder below the class>` (an image directly in its class folder is its own group);
    pattern:<regex>: the first capture group of re.search on rel (the whole match without groups), unmatched images
    are their own group; image: rel itself."""
    parts = rel.split("/")
    if rule == "subfolder":
        return "/".join(parts[:2]) if len(parts) > 2 else rel
    if rule.startswith("pattern:"):
        m = re.search(rule.removeprefix("pattern:"), rel)
        if m is None:
            return rel
        return m.group(1) if m.re.groups else m.group(0)
    return rel


def from_folder(cfg: FolderSource, root: Path, out: Path) -> pl.DataFrame:
    """ImageFolder layout: <path>/<class name>/<image>, or <class>/<group>/<image> with acquire.folder.group (the
    `group` column, which split.strategy: group holds out whole; see folder_group).

    Folder links, links out of the root and hidden entries are skipped (pipeline/data/sourcefiles.py) and listed in
    out/skipped.parquet; so are images directly under <path>, which belong to no class."""
    base = root / str(cfg.path)
    listing = sourcefiles.list_files(base, IMAGE_EXTENSIONS)
    files = []
    for f in listing.files:
        rel = f.relative_to(base).as_posix()
        if "/" in rel:
            files.append((f, f"images/{rel}", rel, rel.split("/", 1)[0], folder_group(rel, cfg.group)))
        else:
            listing.skipped.append((rel, "image directly in the root: it belongs to no <class>/ folder"))
    write_parquet(
        out / SKIPPED, pl.DataFrame(listing.skipped, schema={"path": pl.String, "reason": pl.String}, orient="row")
    )
    if listing.skipped:
        print(
            f"acquire folder: skipped {len(listing.skipped)} entries under {base} (links, hidden files, "
            f"images outside a class folder), "
            f"listed in skipped.parquet; e.g. {listing.skipped[0][0]}: {listing.skipped[0][1]}",
            file=sys.stderr,
        )
    if not files:
        raise ValueError(f"acquire.folder.path: no images found under {base} (expected <class>/<image> files)")
    return _rows_from_files(files, out, "folder")


CLI_HELP = {
    "embedded": "the committed cross-artist emoji set (the default dataset)",
    "folder": "an ImageFolder tree: <path>/<class name>/<image>",
}


def add_cli_arguments_embedded(p) -> None:
    p.add_argument("--path", help="dataset folder (default datasets/emoji)")


def section_from_cli_embedded(args) -> dict:
    return {"path": args.path} if args.path else {}


def add_cli_arguments_folder(p) -> None:
    p.add_argument("--path", required=True, help="<class>/<image> root")
    p.add_argument(
        "--group",
        help="image (default) | subfolder (<class>/<group>/<image>) | pattern:<regex>: "
        "which images form one group that never straddles splits",
    )


def section_from_cli_folder(args) -> dict:
    return {"path": args.path} | ({"group": args.group} if args.group else {})


def _source(name: str) -> Callable[..., pl.DataFrame]:
    """Source functions by name; imported lazily so the embedded default never imports the crawler."""
    if name == "embedded":
        return from_embedded
    if name == "folder":
        return from_folder
    if name == "csv":
        from pipeline.data.labelcsv import from_csv

        return from_csv
    if name == "dafre":
        from pipeline.data.dafre import from_dafre

        return from_dafre
    if name == "danbooru":
        from pipeline.data.danbooru import from_danbooru

        return from_danbooru
    raise ValueError(f"acquire.source: unknown source {name!r}")


SOURCES = ("embedded", "folder", "csv", "dafre", "danbooru")


def acquire(cfg: AcquireParams, root: Path, out: Path) -> pl.DataFrame:
    """Run the configured source into `out` and write out/manifest.parquet.

    Local sources write a complete new output beside `out` and swap it in only when it is complete (a failing import
    leaves the previous output untouched). The crawler writes in place and keeps what it already downloaded (its
    journal makes a killed crawl resumable). Either way an `out` that holds anything the project did not write, holds
    the project, or overlaps the source is refused before anything is written (pipeline/outdir.py).
    """
    section = getattr(cfg, cfg.source)
    inputs = [
        (f"acquire.{cfg.source}.{key}", root / str(getattr(section, key)))
        for key in ("path", "labels", "class_names")  # every input location the source reads
        if getattr(section, key, None) is not None
    ]
    out = Path(out)
    if cfg.source == "danbooru":
        outdir.check_writable(out, "acquire", project=root, inputs=inputs)
        outdir.claim(out, "acquire")
        df = _source(cfg.source)(section, root, out)
        manifest.write(df, out)
        return df
    with outdir.replace_folder(out, "acquire", project=root, inputs=inputs) as tmp:
        df = _source(cfg.source)(section, root, tmp)
        manifest.write(df, tmp)
    return df
