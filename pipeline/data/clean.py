"""The `clean` stage: decode-verify, normalise to RGB, drop duplicates and rare classes, group near-duplicates.

Three phases, so that the decisions that need the whole manifest never wait on pixels and every image is decoded once:

1. Per image (`check_image`, in `clean.workers` processes): read the bytes (a plain file or a tar-shard member),
   verify them by a full decode, convert to RGB, optionally resize, hash (md5 of the input bytes, pHash of the
   result) and write the result to a staging area.
2. Metadata only (`select`, polars, no pixels: what benchmarks/clean_split.py times at DAF:re scale): class-name
   normalisation, exact duplicates (md5), near-duplicates (pHash, pipeline/data/dedup.py), per-class min/max, then
   contiguous class ids.
3. Commit: kept images move from staging to images/ (plain-file input) or are re-packed, in manifest order, into
   tar shards (sharded input: 463k loose files would make DVC crawl).

Nothing is lost silently: every dropped image lands in quarantine.parquet with a reason (a metrics key) and a detail;
duplicates also name the image they duplicated (`duplicate_of`: the first in manifest order); the same bytes
under two classes quarantine every copy as `label_conflict`. The run continues
whatever the input. Columns the source added (post_id, face_*, artist, the source's `split`, ...) pass through.

Near-duplicates: `clean.near_dup_hamming` is 0 (off) by default, because a 64-bit pHash merges images that are
different classes of the embedded emoji set. Measured on its 932 images (64 px, composited on white): 8 pairs of
*different* emoji by the same artist have identical pHashes (distance 0: coloured hearts, which a grey-level hash
cannot tell apart; imp vs. smiling face with horns; person frowning vs. pouting face), 57 pairs are within 4 bits
and 100 within 6; across artists, different emoji come within 2-4 bits (e.g. noto kissing face vs. emojione
pouting face). Meanwhile an emoji and its own JPEG (q60) or half-size copy can be 16 bits apart. At 64 px no
threshold separates the two, so the emoji default is off. For photos and illustrations at DAF:re sizes, 4 bits (5
bands of ~13 bits: 2.6 s for 463k hashes) is a conservative setting that catches re-encodes and resizes; with
`near_dup_action: group` (the default action) nothing is dropped: near-duplicates only share a `dup_group`, which
the split keeps on one side.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageFile, ImageOps

from pipeline import outdir
from pipeline.data import images, manifest
from pipeline.data.dedup import near_duplicate_groups, phash64
from pipeline.data_config import CleanParams
from pipeline.io import write_parquet
from pipeline.progress import progress

QUARANTINE = "quarantine.parquet"
QUARANTINE_SCHEMA = {
    "image_id": pl.String,
    "path": pl.String,
    "class_name": pl.String,
    "reason": pl.String,
    "detail": pl.String,
    "duplicate_of": pl.String,
}
STAGING = ".staging"  # inside the output folder: same filesystem, so committing plain files is a rename
ORIENTATION_TAG = 0x0112  # EXIF Orientation
POOL_MIN_IMAGES = 256  # below this, starting decode processes (imports: ~2 s each) costs more than it saves
_SHARD_MARK = images.SHARD_SUFFIX + "/"


class Rejected(Exception):
    """An image that cannot be used; `reason` is a short metrics key, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# --- one image ------------------------------------------------------------------------------------------------------


def upright(im: Image.Image) -> tuple[Image.Image, bool]:
    """(the image as viewers show it, whether that changed it): EXIF orientation applied (a phone JPEG with
    Orientation=6 is stored sideways). Images without the tag are returned as they are, not copied."""
    if im.getexif().get(ORIENTATION_TAG, 1) == 1:
        return im, False
    return ImageOps.exif_transpose(im), True


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on `background` (DAF:re Full used white)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit modes are scaled by their full range (a dark image stays dark); 32-bit "I" and float "F" have no
        # declared range, so values that fit in 8 bits are taken as 8-bit data.
        peak = 255.0 if im.mode in ("I", "F") and arr.max() <= 255 else 65535.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        canvas = Image.new("RGB", im.size, background)
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    return im.convert("RGB") if im.mode != "RGB" else im


@contextmanager
def _pillow_guards(max_pixels: int) -> Iterator[None]:
    """Pillow's bomb limit follows clean.max_image_pixels and truncated data is an error, whatever another module set.

    Both settings are process-global, so they are restored on exit (decoding runs in processes, not threads).
    """
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = max_pixels, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff(data: bytes) -> str | None:
    """The image format the first bytes announce, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def decode(data: bytes, cfg: CleanParams) -> tuple[Image.Image, bool]:
    """Verify and normalise one image's bytes. Returns (RGB image, changed?) or raises Rejected."""
    if not data:
        raise Rejected("empty_file", "0 bytes")
    try:
        with _pillow_guards(cfg.max_image_pixels):
            im = Image.open(io.BytesIO(data))
            w, h = im.size  # from the header: checked before a single pixel is decoded
            if w * h > cfg.max_image_pixels:
                raise Rejected(
                    "too_many_pixels",
                    f"{w}x{h} = {w * h} pixels > clean.max_image_pixels="
                    f"{cfg.max_image_pixels} (decompression-bomb guard)",
                )
            im.load()  # full decode: catches truncated and corrupt data
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own text quotes its hard limit (twice ours): only the image's pixel count is taken from it.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        claims = f"{found.group(1)} pixels" if found else "more pixels than that"
        raise Rejected(
            "too_many_pixels",
            f"header claims {claims} > clean.max_image_pixels={cfg.max_image_pixels} (decompression-bomb guard)",
        ) from None
    except Image.UnidentifiedImageError:
        fmt = _sniff(data)
        if fmt:  # looks like an image but its header is damaged: corrupt, not a stray HTML page or caption
            raise Rejected("corrupt", f"{fmt} signature, but no decoder accepts the header") from None
        # The content is never quoted: a stray file may hold anything (a linked secret, a token in an HTML page).
        raise Rejected("not_an_image", f"no image decoder recognises the content ({len(data)} bytes)") from None
    except Exception as exc:  # truncated streams, bad CRCs, broken headers: a property of the input, never fatal
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    original_mode = im.mode
    try:
        im, rotated = upright(im)
        rgb = to_rgb(im, cfg.background)
    except (ValueError, OSError) as exc:  # modes Pillow cannot convert (LAB, HSV, ...)
        raise Rejected("unsupported_mode", f"{original_mode}: {exc}") from None
    changed = original_mode != "RGB" or rotated
    if cfg.resize_short_side and min(rgb.size) > cfg.resize_short_side:
        scale = cfg.resize_short_side / min(rgb.size)
        size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)  # antialiased, as DAF:re Full's resize_all.py
        changed = True
    return rgb, changed


def load_clean(path: Path, cfg: CleanParams) -> tuple[Image.Image, bool]:
    """Open, verify and normalise one image file. Returns (RGB image, changed?) or raises Rejected."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise Rejected("missing", str(exc)) from None
    return decode(data, cfg)


@dataclass
class Checked:
    """What phase 1 learnt about one image. `data` is what to store: the input bytes or the re-encoded image."""

    reason: str | None = None
    detail: str | None = None
    raw_md5: str | None = None
    data: bytes | None = None
    suffix: str = ""  # appended to the output name when re-encoded (".png" / ".jpg")
    md5: str | None = None
    width: int | None = None
    height: int | None = None
    phash: int | None = None


def _encode(rgb: Image.Image, cfg: CleanParams) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if cfg.reencode == "jpeg":
        rgb.save(buf, format="JPEG", quality=cfg.jpeg_quality)
        return buf.getvalue(), ".jpg"
    rgb.save(buf, format="PNG")
    return buf.getvalue(), ".png"


def check_image(root: Path, rel: str, cfg: CleanParams) -> Checked:
    """Phase 1 for one manifest row: never raises for bad input, the reason is in the result."""
    try:
        data = images.read_bytes(root, rel)
    except ValueError as exc:  # safe_relpath: absolute, '..', backslashes: never followed
        return Checked("unsafe_path", str(exc))
    except FileNotFoundError as exc:
        return Checked("missing", str(exc))
    except Exception as exc:  # unreadable file or broken tar shard
        return Checked("unreadable", f"{type(exc).__name__}: {exc}")
    raw_md5 = hashlib.md5(data).hexdigest()
    try:
        rgb, changed = decode(data, cfg)
    except Rejected as r:
        return Checked(r.reason, r.detail, raw_md5)
    out, suffix = _encode(rgb, cfg) if changed else (data, "")  # RGB input: original bytes, no JPEG re-encoding
    return Checked(
        raw_md5=raw_md5,
        data=out,
        suffix=suffix,
        md5=hashlib.md5(out).hexdigest(),
        width=rgb.width,
        height=rgb.height,
        phash=phash64(rgb) if cfg.near_dup_hamming else None,
    )


# --- phase 1 over the manifest ----------------------------------------------------------------------------------------

_WORKER: tuple[Path, CleanParams] | None = None


def _init_worker(root: Path, cfg: CleanParams) -> None:
    global _WORKER
    _WORKER = (root, cfg)


def _check_in_worker(rel: str) -> Checked:
    root, cfg = _WORKER
    return check_image(root, rel, cfg)


def _check_all(rels: list[str], root: Path, cfg: CleanParams, pool_min: int) -> Iterable[Checked]:
    """check_image over all rows, in manifest order; in worker processes when there is enough work."""
    if cfg.workers <= 1 or len(rels) < pool_min:
        yield from (check_image(root, rel, cfg) for rel in rels)
        return
    # spawn, not fork: polars and BLAS threads in the parent make fork unsafe.
    with multiprocessing.get_context("spawn").Pool(cfg.workers, _init_worker, (root, cfg)) as pool:
        yield from pool.imap(_check_in_worker, rels, chunksize=16)


def output_name(rel: str, suffix: str) -> str:
    """The image's name inside its shard or images/ folder; re-encoded images get the suffix of their format appended
    (appended, not replaced, so x.webp and x.jpg cannot collide), unless the name already ends with it."""
    name = rel.split(_SHARD_MARK, 1)[1] if _SHARD_MARK in rel else rel
    name = name.removeprefix("images/")
    endings = {".png": (".png",), ".jpg": (".jpg", ".jpeg"), "": ("",)}[suffix]
    return name if name.lower().endswith(endings) else name + suffix


def _unique(name: str, used: set[str]) -> str:
    """Two shards may hold the same member name: the later one gets a counter before its extension."""
    candidate, k = name, 1
    while candidate in used:
        stem, dot, ext = name.rpartition(".")
        candidate = f"{stem}.{k}.{ext}" if dot else f"{name}.{k}"
        k += 1
    used.add(candidate)
    return candidate


def is_sharded(paths: pl.Series) -> bool:
    return bool(paths.str.contains(_SHARD_MARK, literal=True).any())


def verify_images(
    df: pl.DataFrame,
    root: Path,
    staging: Path,
    cfg: CleanParams,
    shard_size: int | None,
    pool_min: int = POOL_MIN_IMAGES,
) -> pl.DataFrame:
    """Phase 1: df plus _reason, _detail, _raw_md5, _staged, _out_md5, _width, _height, phash; images in staging."""
    rels = df["path"].to_list()
    cols: dict[str, list] = {
        k: [] for k in ("_reason", "_detail", "_raw_md5", "_staged", "_out_md5", "_width", "_height", "phash")
    }
    used: set[str] = set()
    with images.ImageWriter(staging, shard_size=shard_size) as writer:
        checked = _check_all(rels, root, cfg, pool_min)
        for rel, c in zip(rels, progress(checked, total=len(rels), desc="clean", unit="img")):
            staged = writer.write(_unique(output_name(rel, c.suffix), used), c.data) if c.reason is None else None
            for key, value in (
                ("_reason", c.reason),
                ("_detail", c.detail),
                ("_raw_md5", c.raw_md5),
                ("_staged", staged),
                ("_out_md5", c.md5),
                ("_width", c.width),
                ("_height", c.height),
                ("phash", c.phash),
            ):
                cols[key].append(value)
    schema = {
        "_reason": pl.String,
        "_detail": pl.String,
        "_raw_md5": pl.String,
        "_staged": pl.String,
        "_out_md5": pl.String,
        "_width": pl.Int64,
        "_height": pl.Int64,
        "phash": pl.UInt64,
    }
    return pl.concat(
        [df.drop([c for c in schema if c in df.columns]), pl.DataFrame(cols, schema=schema)], how="horizontal"
    )


# --- phase 2: metadata only -------------------------------------------------------------------------------------------


def normalize_class_names(names: pl.Expr) -> pl.Expr:
    """NFKC (full-width letters, ligatures), trimmed, lower case, runs of whitespace/underscores -> '_'."""
    return names.str.normalize("NFKC").str.strip_chars().str.to_lowercase().str.replace_all(r"[\s_]+", "_")


def _rejections(
    frame: pl.DataFrame, reason: str | pl.Expr, detail: str | pl.Expr, duplicate_of: str | pl.Expr | None = None
) -> pl.DataFrame:
    lit = lambda v: pl.lit(v, pl.String) if v is None or isinstance(v, str) else v  # noqa: E731
    return frame.select(
        "_row",
        "image_id",
        "path",
        "class_name",
        lit(reason).alias("reason"),
        lit(detail).alias("detail"),
        lit(duplicate_of).alias("duplicate_of"),
    )


def _exact_duplicates(ok: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Same md5 = same bytes. Within one class, the first in manifest order is kept (`duplicate` for the others).
    Across classes the labels disagree and no rule can tell which is right, so every copy is quarantined as
    `label_conflict` (naming the classes): an image is never silently given one of its labels."""
    first = pl.when(pl.col("md5").is_not_null()).then(pl.col("image_id").first().over("md5"))
    n_classes = pl.when(pl.col("md5").is_not_null()).then(pl.col("class_name").n_unique().over("md5"))
    ok = ok.with_columns(first.alias("_first"), n_classes.fill_null(1).alias("_n_classes"))
    conflict = pl.col("_n_classes") > 1
    classes = (
        ok.filter(conflict).group_by("md5").agg(pl.col("class_name").unique().sort().str.join(", ").alias("_classes"))
    )
    conflicts = ok.filter(conflict).join(classes, on="md5", how="left", maintain_order="left")
    q_conflict = _rejections(
        conflicts,
        "label_conflict",
        pl.format("the same bytes are labelled with {} classes: {}", "_n_classes", "_classes"),
        pl.when(pl.col("_first") != pl.col("image_id")).then(pl.col("_first")),
    )
    is_dup = ~conflict & pl.col("_first").is_not_null() & (pl.col("_first") != pl.col("image_id"))
    q = _rejections(ok.filter(is_dup), "duplicate", pl.format("same md5 as {}", "_first"), pl.col("_first"))
    return ok.filter(~is_dup & ~conflict).drop("_first", "_n_classes"), pl.concat([q_conflict, q])


def _near_duplicates(ok: pl.DataFrame, cfg: CleanParams) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Adds dup_group (image_id of the group's first image; its own id when alone); drops or keeps the others."""
    t = cfg.near_dup_hamming
    if t and "phash" not in ok.columns:
        raise ValueError(f"clean.near_dup_hamming={t} needs a phash column (pipeline.data.dedup.phash64)")
    hashes = ok["phash"] if t else pl.Series("phash", [None] * ok.height, pl.UInt64)
    rep, stats = near_duplicate_groups(hashes, t)
    ids = ok["image_id"]
    ok = ok.with_columns(ids.gather(rep).alias("dup_group"), pl.Series("_rep_hash", hashes.gather(rep), pl.UInt64))
    in_group = pl.col("dup_group") != pl.col("image_id")
    sizes = ok.group_by("dup_group").len().filter(pl.col("len") > 1)
    info = {
        "groups": sizes.height,
        "images": int(sizes["len"].sum()),
        "candidate_pairs": stats.candidate_pairs,
        "capped_buckets": stats.capped_buckets,
    }
    q = _rejections(ok.head(0), "near_duplicate", "", None)
    if t and cfg.near_dup_action == "drop":
        later = ok.filter(in_group)
        bits = (pl.col("phash") ^ pl.col("_rep_hash")).bitwise_count_ones()
        q = _rejections(
            later,
            "near_duplicate",
            pl.format(
                "pHash {} bits from {} (clean.near_dup_hamming={}, groups are transitive)", bits, "dup_group", pl.lit(t)
            ),
            pl.col("dup_group"),
        )
        ok = ok.filter(~in_group)
    return ok.drop("_rep_hash"), q, info


def _class_limits(ok: pl.DataFrame, cfg: CleanParams) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Drop classes below min_per_class; cap the others at max_per_class (first N in manifest order)."""
    ok = ok.with_columns(
        pl.len().over("class_name").alias("_n"), pl.int_range(pl.len()).over("class_name").alias("_rank")
    )
    too_few = pl.col("_n") < cfg.min_per_class
    over = ~too_few & (pl.col("_rank") >= (cfg.max_per_class or 1 << 62))
    q = pl.concat(
        [
            _rejections(
                ok.filter(too_few), "too_few_in_class", f"class has fewer than clean.min_per_class={cfg.min_per_class}"
            ),
            _rejections(ok.filter(over), "over_class_cap", f"beyond clean.max_per_class={cfg.max_per_class}"),
        ]
    )
    return ok.filter(~too_few & ~over).drop("_n", "_rank"), q


def _contiguous_class_ids(df: pl.DataFrame) -> pl.DataFrame:
    """0..C-1 over the surviving classes, in the order of their original ids (a source's official ids stay put when
    nothing is dropped; the emoji and folder sources number classes by name, so that order is kept too)."""
    ids = (
        df.group_by("class_name")
        .agg(pl.col("class_id").min())
        .sort("class_id", "class_name")
        .with_row_index("_new")
        .select("class_name", pl.col("_new").cast(pl.Int64))
    )
    return (
        df.join(ids, on="class_name", how="left", maintain_order="left")
        .with_columns(pl.col("_new").alias("class_id"))
        .drop("_new")
    )


def select(
    df: pl.DataFrame, cfg: CleanParams, timings: dict[str, float] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Phase 2 (metadata only): which rows survive, and why the others do not.

    `df` is a manifest in manifest order; `md5` identifies exact duplicates, `phash` (UInt64) near-duplicates, and
    optional `_reason`/`_detail` columns carry phase-1 rejections. Returns (kept rows with dup_group and contiguous
    class ids, quarantine in manifest order, counts). Seconds per step go into `timings` if given (benchmarks).
    """
    clock = _Clock(timings)
    df = df.with_row_index("_row")
    classes_in = df["class_name"].n_unique()
    if cfg.normalize_class_names:
        df = df.with_columns(normalize_class_names(pl.col("class_name")))
    merged = classes_in - df["class_name"].n_unique()
    for col in ("_reason", "_detail"):  # phase-1 verdicts; absent when select runs on a manifest alone
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(col))
    failed = pl.col("_reason").is_not_null()
    rejected = [_rejections(df.filter(failed), pl.col("_reason"), pl.col("_detail"))]
    clock.lap("class names")
    ok, q_dup = _exact_duplicates(df.filter(~failed))
    clock.lap("exact duplicates")
    ok, q_near, near = _near_duplicates(ok, cfg)
    clock.lap("near duplicates")
    ok, q_class = _class_limits(ok, cfg)
    ok = _contiguous_class_ids(ok)
    clock.lap("class limits + ids")
    if near["groups"]:  # recount: the class limits may have removed group members
        multi = ok.group_by("dup_group").len().filter(pl.col("len") > 1)
        near.update(groups=multi.height, images=int(multi["len"].sum()))
    q = pl.concat(rejected + [q_dup, q_near, q_class]).sort("_row").drop("_row")
    counts = {
        "input": df.height,
        "kept": ok.height,
        "classes": ok["class_name"].n_unique(),
        "quarantined": q.height,
        "by_reason": {r: n for r, n in sorted(q.group_by("reason").len().iter_rows())},
        "class_names_merged": merged,
        "near_dup": near,
    }
    q = q.select(QUARANTINE_SCHEMA.keys()).cast(QUARANTINE_SCHEMA)
    clock.lap("quarantine + counts")
    return ok.drop("_row", "_reason", "_detail"), q, counts


class _Clock:
    """Seconds per step into a dict, when one is given."""

    def __init__(self, into: dict[str, float] | None):
        self.into, self.t = into, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        if self.into is not None:
            self.into[name] = self.into.get(name, 0.0) + now - self.t
        self.t = now


# --- phase 3 and the stage ----------------------------------------------------------------------------------------


def _commit(staged: list[str], staging: Path, out: Path, shard_size: int | None) -> list[str]:
    """Move the kept images out of staging: a rename per plain file, or a re-pack into consecutive shards."""
    if shard_size is None:
        for rel in staged:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, out / rel)
        return staged
    with images.ImageWriter(out, shard_size=shard_size) as writer:
        return [writer.write(output_name(rel, ""), images.read_bytes(staging, rel)) for rel in staged]


def clean(
    cfg: CleanParams, raw_dir: Path, out: Path, pool_min: int = POOL_MIN_IMAGES
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """raw_dir/manifest.parquet -> out/{manifest.parquet, quarantine.parquet, images/ or shards/}; returns counts
    too."""
    raw_dir, out = Path(raw_dir), Path(out)
    df = manifest.read(raw_dir)
    with outdir.replace_folder(out, "clean", inputs=[("--raw", raw_dir)]) as tmp:
        staging = tmp / STAGING
        shard_size = cfg.shard_size if is_sharded(df["path"]) else None
        checked = verify_images(df, raw_dir, staging, cfg, shard_size, pool_min)
        # Exact duplicates are judged on the bytes actually read, not on the md5 the source recorded.
        kept, q, counts = select(checked.with_columns(pl.col("_raw_md5").alias("md5")), cfg)
        paths = _commit(kept["_staged"].to_list(), staging, tmp, shard_size)
        shutil.rmtree(staging)
        kept = kept.with_columns(
            pl.Series("path", paths, pl.String),
            pl.col("_out_md5").alias("md5"),
            pl.col("_width").alias("width"),
            pl.col("_height").alias("height"),
        )
        kept = kept.drop([c for c in kept.columns if c.startswith("_")] + ([] if cfg.near_dup_hamming else ["phash"]))
        manifest.write(kept, tmp)
        write_parquet(tmp / QUARANTINE, q)
    return kept, q, counts
