"""The optional `faces` stage: find the anime face in each image (animeface), crop around it, record what is dropped.

The DAG is always acquire -> faces -> clean. With `faces.enabled: false` this stage is a fast pass-through (the input
images hard-linked, the same manifest with empty face columns), so turning it on or off never changes the DAG.

Enabled, every image is decoded, composited on white and (if large) downscaled, then passed to animeface. The output
manifest keeps the input's columns plus the face box in ORIGINAL pixel coordinates; the image becomes the box grown by
`faces.margin` on each side. Dropped images go to rejected.parquet with a reason (no_face, low_confidence,
several_faces, unreadable): undecodable input is recorded here rather than crashing, and `clean` never sees it.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL
import polars as pl
from PIL import Image

from pipeline import outdir
from pipeline.data import images, manifest
from pipeline.data.clean import Rejected, to_rgb, upright
from pipeline.data_config import FacesParams
from pipeline.io import write_parquet
from pipeline.progress import progress

REJECTED = "rejected.parquet"
REJECTED_SCHEMA = {
    "image_id": pl.String,
    "path": pl.String,
    "class_name": pl.String,
    "reason": pl.String,
    "detail": pl.String,
}
# Added to the manifest. Box: x1/y1 exclusive, in pixels of the original (uncropped, unscaled) image; null when the
# image passed through or was kept whole. faces_found: detections scoring at least faces.threshold.
FACE_SCHEMA = {
    "face_x0": pl.Int64,
    "face_y0": pl.Int64,
    "face_x1": pl.Int64,
    "face_y1": pl.Int64,
    "face_score": pl.Float64,
    "faces_found": pl.Int64,
}
WHITE = (255, 255, 255)
JPEG_QUALITY = 95


class FacesError(ValueError):
    """The face detector cannot run here (package missing, incompatible Pillow). A ValueError: the stage exits 2."""


@dataclass(frozen=True)
class Face:
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive) in pixels of the image given to detect()
    score: float  # animeface likelihood in 0..1


# --- detection ----------------------------------------------------------------------------------------------------


def load_animeface_detector() -> Callable:
    """animeface.detect, imported on first use so the disabled pass-through needs neither the package nor a check."""
    major = int(PIL.__version__.split(".")[0])
    if major >= 12:
        # animeface 2.0.3 hands Image.getdata() to its C extension; with Pillow >= 12 it returns no faces at all,
        # without an error, so every image would be dropped as no_face. Refuse loudly instead.
        raise FacesError(
            f"animeface finds no faces with Pillow {PIL.__version__} (>= 12): "
            "install the pinned pillow==11.3.0 from requirements.txt"
        )
    try:
        import animeface
    except ImportError as exc:
        raise FacesError("faces.enabled needs the animeface package: pip install animeface==2.0.3") from exc
    return animeface.detect


def _downscale(im: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(im.size) <= max_side:
        return im
    scale = max_side / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def detect(image: Image.Image, cfg: FacesParams) -> list[Face]:
    """Every face animeface finds in `image`, best score first, boxes in `image`'s own pixel coordinates.

    No threshold is applied here (see `choose`). Transparency is composited on white first: animeface drops the alpha
    channel itself, so colours stored under fully transparent pixels would be seen, moving boxes and even producing
    invisible faces, and one Ren'Py sprite (Lucy, mad) is only found when composited. Images larger than
    cfg.max_side are downscaled for speed and the boxes scaled back.
    """
    animeface_detect = load_animeface_detector()
    rgb = to_rgb(image, WHITE)
    small = _downscale(rgb, cfg.max_side)
    sx, sy = small.width / rgb.width, small.height / rgb.height
    found = []
    for f in animeface_detect(small):
        b = f.face.pos
        # floor/ceil: the mapped box never loses a pixel of the face to rounding
        box = (
            max(0, math.floor(b.x / sx)),
            max(0, math.floor(b.y / sy)),
            min(rgb.width, math.ceil((b.x + b.width) / sx)),
            min(rgb.height, math.ceil((b.y + b.height) / sy)),
        )
        found.append(Face(box=box, score=float(f.likelihood)))
    return sorted(found, key=lambda f: f.score, reverse=True)


def choose(found: list[Face], cfg: FacesParams) -> Face | None:
    """The face to crop to, applying threshold and one_face_only. None: keep the image whole (no_face == 'keep').

    Raises Rejected(no_face | low_confidence | several_faces) when the image is to be dropped.
    """
    confident = [f for f in found if f.score >= cfg.threshold]
    if not confident:
        if cfg.no_face == "keep":
            return None
        if not found:
            raise Rejected("no_face", "animeface found no face")
        raise Rejected("low_confidence", f"best score {found[0].score:.3f} < faces.threshold={cfg.threshold}")
    if cfg.one_face_only and len(confident) > 1:
        raise Rejected(
            "several_faces",
            f"{len(confident)} faces score >= faces.threshold={cfg.threshold} and faces.one_face_only is set",
        )
    return max(confident, key=lambda f: f.score)


def crop_box(box: tuple[int, int, int, int], size: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """`box` grown by round(margin * its width/height) on each side, clipped to an image of `size` (w, h)."""
    x0, y0, x1, y1 = box
    pad_x, pad_y = round(margin * (x1 - x0)), round(margin * (y1 - y0))
    return max(0, x0 - pad_x), max(0, y0 - pad_y), min(size[0], x1 + pad_x), min(size[1], y1 + pad_y)


# --- reading and writing images -----------------------------------------------------------------------------------


def _load(root: Path, rel: str) -> tuple[bytes, Image.Image]:
    """(original bytes, fully decoded image), or Rejected('unreadable'): missing, unsafe path, corrupt, bomb, ..."""
    try:
        data = images.read_bytes(root, rel)
        im = Image.open(io.BytesIO(data))
        im.load()  # decode now: truncated or corrupt data must fail here, not halfway through a crop
        im = upright(im)[0]  # detect and crop upright, as clean and viewers show the image
    except Exception as exc:  # any decoder error is a property of the input, never a reason to stop the stage
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc}") from None
    return data, im


def _member(rel: str) -> str:
    """The input image's name inside its shard or images/ folder: the output uses the same name."""
    shard_mark = images.SHARD_SUFFIX + "/"
    name = rel.split(shard_mark, 1)[1] if shard_mark in rel else rel
    return name.removeprefix("images/")


def _crop_name(rel: str, png: bool) -> str:
    """Output name of a crop: a suffix that matches its format is appended if missing (as in clean: appended rather
    than replaced, so x.webp and x.jpg cannot collide)."""
    name = _member(rel)
    suffixes = (".png",) if png else (".jpg", ".jpeg")
    return name if name.lower().endswith(suffixes) else name + suffixes[0]


def _encode(im: Image.Image, png: bool) -> bytes:
    buf = io.BytesIO()
    if png:
        im.save(buf, format="PNG")  # keeps mode, palette and transparency: clean composites later, on its background
    else:
        if im.mode not in ("RGB", "L", "CMYK"):  # JPEG has no alpha; white, as used for detection
            im = to_rgb(im, WHITE)
        im.save(buf, format="JPEG", quality=JPEG_QUALITY, icc_profile=im.info.get("icc_profile"))
    return buf.getvalue()


def _shard_size(paths: pl.Series) -> int | None:
    """None for plain-file input; else the input's largest shard, so the output keeps about its layout."""
    shard = paths.str.extract(r"^(.*?\.tar)/", 1).drop_nulls()
    if shard.is_empty():
        return None
    return int(shard.value_counts()["count"].max())


def _storage_file(root: Path, rel: str) -> str:
    """The file that holds image `rel`: the tar shard for a shard member, else `rel` itself."""
    parts = images.safe_relpath(rel).parts
    for i, part in enumerate(parts[:-1], start=1):
        if part.endswith(images.SHARD_SUFFIX) and root.joinpath(*parts[:i]).is_file():
            return "/".join(parts[:i])
    return rel


def _link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:  # EXDEV (another filesystem), EPERM (no hard links there), EMLINK: same bytes, just slower
        shutil.copy2(src, dest)


# --- the stage ----------------------------------------------------------------------------------------------------


def _null_faces(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns(pl.lit(None, dtype).alias(name) for name, dtype in FACE_SCHEMA.items())


def _pass_through(df: pl.DataFrame, raw: Path, dest: Path) -> tuple[pl.DataFrame, list[dict], dict]:
    """Hard-link every image file (or shard) the manifest names; the manifest itself is unchanged."""
    files, missing = set(), 0
    for rel in df["path"]:
        try:
            files.add(_storage_file(raw, rel))
        except ValueError:  # unsafe path: never followed; clean reports the row
            missing += 1
    for rel in progress(sorted(files), total=len(files), desc="faces (pass-through)", unit="file"):
        if (raw / rel).is_file():
            _link_or_copy(raw / rel, dest / rel)
        else:
            missing += 1  # kept in the manifest: clean quarantines it as missing, with the reason
    metrics = {
        "kept": df.height,
        "faces_kept": 0,
        "kept_whole": df.height,
        "mean_detect_s": None,
        "missing_files": missing,
    }
    return _null_faces(df), [], metrics


def _crop_all(cfg: FacesParams, df: pl.DataFrame, raw: Path, dest: Path) -> tuple[pl.DataFrame, list[dict], dict]:
    """Detect, choose and crop image by image; returns (kept rows, rejected rows, counts)."""
    kept, rejected, seconds, names = [], [], [], set()
    with images.ImageWriter(dest, shard_size=_shard_size(df["path"])) as writer:
        for row in progress(df.iter_rows(named=True), total=df.height, desc="faces", unit="img"):
            try:
                data, im = _load(raw, row["path"])
                start = time.perf_counter()
                found = detect(im, cfg)
                seconds.append(time.perf_counter() - start)
                face = choose(found, cfg)
            except Rejected as r:
                rejected.append(
                    dict(
                        image_id=row["image_id"],
                        path=row["path"],
                        class_name=row["class_name"],
                        reason=r.reason,
                        detail=r.detail,
                    )
                )
                continue
            if face is None:  # kept whole: the original bytes, not a re-encode
                name, out_bytes, size, cols = _member(row["path"]), data, im.size, {"faces_found": 0}
            else:
                png = im.format == "PNG"  # the decoded format, not the suffix: misnamed files stay what they are
                crop = im.crop(crop_box(face.box, im.size, cfg.margin))
                name, out_bytes, size = _crop_name(row["path"], png), _encode(crop, png), crop.size
                cols = dict(
                    zip(("face_x0", "face_y0", "face_x1", "face_y1"), face.box),
                    face_score=face.score,
                    faces_found=sum(f.score >= cfg.threshold for f in found),
                )
            if name in names:  # two shards may hold the same member name: keep both, apart
                name = f"{row['image_id']}/{name}"
            names.add(name)
            rel = writer.write(name, out_bytes)
            kept.append(
                {
                    **row,
                    **dict.fromkeys(FACE_SCHEMA),
                    **cols,
                    "path": rel,
                    "md5": hashlib.md5(out_bytes).hexdigest(),
                    "width": size[0],
                    "height": size[1],
                }
            )
    schema = {**{c: t for c, t in df.schema.items() if c not in FACE_SCHEMA}, **FACE_SCHEMA}
    out_df = pl.DataFrame(kept, schema=schema) if kept else pl.DataFrame(schema=schema)
    faces_kept = out_df["face_score"].is_not_null().sum()
    metrics = {
        "kept": out_df.height,
        "faces_kept": int(faces_kept),
        "kept_whole": out_df.height - int(faces_kept),
        "mean_detect_s": round(sum(seconds) / len(seconds), 4) if seconds else None,
    }
    return out_df, rejected, metrics


def faces(cfg: FacesParams, raw: Path, out: Path) -> tuple[pl.DataFrame, dict]:
    """raw/manifest.parquet (+ images) -> out/{manifest.parquet, rejected.parquet, images or shards}.

    Returns the output manifest and the metrics (counts, rejections by reason, mean detection time, enabled flag).
    """
    raw, out = Path(raw), Path(out)
    df = manifest.read(raw)
    outdir.check_writable(out, "faces", inputs=[("--raw", raw)])
    if cfg.enabled:
        load_animeface_detector()  # fail before any work if the detector cannot run
    df = df.drop([c for c in FACE_SCHEMA if c in df.columns])  # a re-run on faces output recomputes them
    with outdir.replace_folder(out, "faces", inputs=[("--raw", raw)]) as tmp:
        if cfg.enabled:
            out_df, rejected, counts = _crop_all(cfg, df, raw, tmp)
        else:
            out_df, rejected, counts = _pass_through(df, raw, tmp)
        rejected_df = pl.DataFrame(rejected, schema=REJECTED_SCHEMA)
        write_parquet(tmp / REJECTED, rejected_df)
        manifest.write(out_df, tmp)  # last: a manifest means the folder is complete
    by_reason = {r: n for r, n in sorted(rejected_df.group_by("reason").len().iter_rows())}
    metrics = {
        "enabled": cfg.enabled,
        "input": df.height,
        **counts,
        "rejected": rejected_df.height,
        "by_reason": by_reason,
    }
    return out_df, metrics
