"""The `clean` stage: decode-verify, normalise to RGB, drop exact duplicates and rare classes.

Nothing is lost silently: every dropped image lands in quarantine.parquet with a reason (and, for duplicates, the
image it duplicated); the run continues whatever the input.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image
from pipeline.progress import progress

from pipeline.config import CleanParams
from pipeline.data import manifest
from pipeline.io import md5_file, write_parquet

QUARANTINE = "quarantine.parquet"
QUARANTINE_SCHEMA = {"image_id": pl.String, "path": pl.String, "class_name": pl.String, "reason": pl.String,
                     "detail": pl.String, "duplicate_of": pl.String}


class Rejected(Exception):
    """An image that cannot be used; `reason` is a short metrics key, `detail` says what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited on `background` (DAF:re Full used white)."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        # 16-bit modes are scaled by their full range (a dark image stays dark); 32-bit "I" has no declared range,
        # so values that fit in 8 bits are taken as 8-bit data.
        peak = 255.0 if im.mode == "I" and arr.max() <= 255 else 65535.0
        im = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        canvas = Image.new("RGB", im.size, background)
        canvas.paste(im, mask=im.getchannel("A"))
        return canvas
    return im.convert("RGB") if im.mode != "RGB" else im


def load_clean(path: Path, cfg: CleanParams) -> tuple[Image.Image, bool]:
    """Open, verify and normalise one image. Returns (RGB image, changed?) or raises Rejected."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise Rejected("missing", str(exc)) from None
    if size == 0:
        raise Rejected("empty_file", "0 bytes")
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = cfg.max_image_pixels  # Pillow's own guard follows the configured limit
            im = Image.open(path)
            w, h = im.size
            if w * h > cfg.max_image_pixels:
                raise Rejected("too_many_pixels", f"{w}x{h} > clean.max_image_pixels={cfg.max_image_pixels}")
            im.load()  # full decode: catches truncated and corrupt data
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("too_many_pixels", str(exc)) from None
    except Image.UnidentifiedImageError:
        raise Rejected("not_an_image", "no image decoder recognises the content") from None
    except Exception as exc:  # truncated streams, bad CRCs, ...
        raise Rejected("corrupt", f"{type(exc).__name__}: {exc}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit  # process-global: leave it as found
    original_mode = im.mode
    rgb = to_rgb(im, cfg.background)
    changed = original_mode != "RGB"
    if cfg.resize_short_side and min(rgb.size) > cfg.resize_short_side:
        scale = cfg.resize_short_side / min(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
        changed = True
    return rgb, changed


def clean(cfg: CleanParams, raw_dir: Path, out: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """raw_dir/manifest.parquet -> out/{manifest.parquet, quarantine.parquet, images/}; returns counts too."""
    df = manifest.read(raw_dir)
    if out.exists():
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True)
    kept, quarantined = [], []
    seen_md5: dict[str, str] = {}
    for row in progress(df.iter_rows(named=True), total=df.height, desc="clean", unit="img"):
        src = raw_dir / row["path"]
        try:
            if row["md5"] in seen_md5:
                raise Rejected("duplicate", "same md5 as an earlier image")
            im, changed = load_clean(src, cfg)
        except Rejected as r:
            dup = seen_md5.get(row["md5"]) if r.reason == "duplicate" else None
            quarantined.append(dict(image_id=row["image_id"], path=row["path"], class_name=row["class_name"],
                                    reason=r.reason, detail=r.detail, duplicate_of=dup))
            continue
        seen_md5[row["md5"]] = row["image_id"]
        # Converted images become PNG; the original suffix stays in the name so x.jpg and x.png cannot collide.
        rel = row["path"] if not changed or row["path"].lower().endswith(".png") else row["path"] + ".png"
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if changed:
            im.save(dest, format="PNG")
        else:
            shutil.copyfile(src, dest)  # already clean RGB: keep the original bytes (no JPEG re-encoding)
        kept.append({**row, "path": rel, "md5": md5_file(dest), "width": im.width, "height": im.height})

    clean_df = pl.DataFrame(kept, schema=df.schema) if kept else df.clear()
    clean_df, rare = _per_class_limits(clean_df, cfg)
    quarantined += rare
    q = pl.DataFrame(quarantined, schema=QUARANTINE_SCHEMA)
    # Re-index classes to contiguous ids over what survived (sorted by name: stable across runs).
    names = sorted(clean_df["class_name"].unique().to_list())
    ids = pl.DataFrame({"class_name": names, "new_id": list(range(len(names)))}, schema={"class_name": pl.String, "new_id": pl.Int64})
    clean_df = clean_df.join(ids, on="class_name", how="left", maintain_order="left").with_columns(
        pl.col("new_id").alias("class_id")).drop("new_id")
    manifest.write(clean_df, out)
    write_parquet(out / QUARANTINE, q)
    for row in rare:  # their files were written before the per-class counts were known
        (out / row["path"]).unlink(missing_ok=True)
    counts = {"input": df.height, "kept": clean_df.height, "classes": len(names), "quarantined": q.height,
              "by_reason": {r: n for r, n in sorted(q.group_by("reason").len().iter_rows())}}
    return clean_df, q, counts


def _per_class_limits(df: pl.DataFrame, cfg: CleanParams) -> tuple[pl.DataFrame, list[dict]]:
    """Drop classes below min_per_class; cap at max_per_class (first N in manifest order)."""
    df = df.with_columns(pl.int_range(pl.len()).over("class_name").alias("_rank"),
                         pl.len().over("class_name").alias("_n"))
    too_few = df.filter(pl.col("_n") < cfg.min_per_class)
    over = df.filter((pl.col("_n") >= cfg.min_per_class) & (pl.col("_rank") >= (cfg.max_per_class or 1 << 62)))
    rejected = [dict(image_id=r["image_id"], path=r["path"], class_name=r["class_name"], reason=reason,
                     detail=detail, duplicate_of=None)
                for frame, reason, detail in (
                    (too_few, "too_few_in_class", f"class has fewer than clean.min_per_class={cfg.min_per_class}"),
                    (over, "over_class_cap", f"beyond clean.max_per_class={cfg.max_per_class}"))
                for r in frame.iter_rows(named=True)]
    drop = set(too_few["image_id"]) | set(over["image_id"])
    return df.filter(~pl.col("image_id").is_in(list(drop))).drop("_rank", "_n"), rejected
