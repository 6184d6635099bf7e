"""Reading the upstream emoji packages: code points and metadata, the fonts and PNG sets of the four styles, and
fitting a drawing onto a canvas.

The build script (tools/build_emoji.py, which makes datasets/emoji) and the pretrain image pool
(pipeline/pretrain/pool.py, which renders emoji of other categories) share these readers. Only the standard library,
Pillow and numpy are used.
"""

import io
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

log = logging.getLogger(__name__)

STYLES: tuple[str, ...] = ("noto", "twemoji", "openmoji", "emojione")
DEFAULT_CATEGORIES: tuple[str, ...] = ("Smileys & Emotion", "People & Body")
DEFAULT_SIZE = 64
# Transparent border kept around the glyph: LANCZOS ringing and antialiased
# edges then never touch the image border, so nothing looks clipped.
DEFAULT_MARGIN = 2
INDEX_COLUMNS: tuple[str, ...] = ("file", "codepoint", "class_name", "category", "subcategory", "style")

VARIATION_SELECTOR_16 = 0xFE0F
# Fitzpatrick skin-tone modifiers are single code points but only meaningful
# as part of a sequence; as standalone classes they are just colour swatches.
SKIN_TONE_MODIFIERS = range(0x1F3FB, 0x1F400)

# Noto Color Emoji is a bitmap (CBDT) font with a single 109 px strike; other
# sizes fail to load. OpenMoji's COLRv0 font is vector, so it is rendered
# large and downsampled, like the bitmap sources.
NOTO_RENDER_PX = 109
OPENMOJI_RENDER_PX = 256
# A code point that no emoji font maps: whatever it renders is the font's
# .notdef ("missing glyph") drawing.
_UNMAPPED_CODEPOINT = 0x10FFFD


# --------------------------------------------------------------------------- #
# Code points and metadata
# --------------------------------------------------------------------------- #


def parse_codepoints(unified: str) -> tuple[int, ...]:
    """Parse a dash-separated hex sequence such as ``"263A-FE0F"``."""
    return tuple(int(part, 16) for part in unified.strip().split("-") if part)


def single_codepoint(unified: str) -> int | None:
    """Return the code point of a single-code-point emoji, else ``None``.

    A trailing U+FE0F (emoji presentation selector) is ignored: ``"263A-FE0F"``
    is the same drawing as ``"263A"``. Skin-tone modifiers, ZWJ sequences,
    keycaps, flags and any other multi-code-point sequence give ``None``.
    """
    points = parse_codepoints(unified)
    if len(points) == 2 and points[1] == VARIATION_SELECTOR_16:
        points = points[:1]
    if len(points) != 1:
        return None
    if points[0] in SKIN_TONE_MODIFIERS or points[0] == VARIATION_SELECTOR_16:
        return None
    return points[0]


def codepoint_hex(codepoint: int) -> str:
    """Upper-case hex, at least 4 digits (the Unicode convention): ``1F600``."""
    return f"{codepoint:04X}"


@dataclass(frozen=True)
class EmojiInfo:
    """Metadata of one emoji class, taken from emoji-data's ``emoji.json``."""

    codepoint: int
    class_name: str
    category: str
    subcategory: str
    twemoji_image: str  # file name inside img/twitter/64/


def load_emoji_catalog(emoji_json: Path) -> dict[int, EmojiInfo]:
    """Read ``emoji.json`` and keep the single-code-point entries.

    ``class_name`` is emoji-data's ``name`` in lower case (e.g. "grinning face").
    """
    entries = json.loads(emoji_json.read_text(encoding="utf-8"))
    catalog: dict[int, EmojiInfo] = {}
    for entry in sorted(entries, key=lambda e: e["unified"]):
        codepoint = single_codepoint(entry["unified"])
        if codepoint is None or not entry.get("has_img_twitter", True):
            continue
        if codepoint in catalog:
            # Both "X" and "X-FE0F" listed: keep the first, they are one drawing.
            log.warning("duplicate emoji.json entry for %s ignored", entry["unified"])
            continue
        catalog[codepoint] = EmojiInfo(
            codepoint=codepoint,
            class_name=entry["name"].strip().lower(),
            category=entry["category"],
            subcategory=entry.get("subcategory") or "",
            twemoji_image=entry["image"],
        )
    return catalog


def load_emojione_index(index_json: Path, png_dir: Path) -> dict[int, Path]:
    """Map code point -> PNG for the single-code-point emoji of gemojione."""
    index = json.loads(index_json.read_text(encoding="utf-8"))
    paths: dict[int, Path] = {}
    for key in sorted(index):
        unicode_seq = index[key]["unicode"]
        codepoint = single_codepoint(unicode_seq)
        if codepoint is None:
            continue
        png = png_dir / f"{unicode_seq.upper()}.png"
        if png.is_file():
            paths.setdefault(codepoint, png)
    return paths


def select_classes(
    catalog: dict[int, EmojiInfo], categories: Iterable[str], available: Iterable[set[int]]
) -> list[EmojiInfo]:
    """Emoji of the given categories present in every ``available`` set, by code point."""
    wanted = set(categories)
    common = set(catalog)
    for codepoints in available:
        common &= codepoints
    return [catalog[cp] for cp in sorted(common) if catalog[cp].category in wanted]


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def fit_to_canvas(image: Image.Image, size: int = DEFAULT_SIZE, margin: int = DEFAULT_MARGIN) -> Image.Image:
    """Crop ``image`` to its visible pixels and centre it on a transparent square.

    The glyph is scaled (LANCZOS, aspect ratio kept) so that its longer side
    fills ``size - 2 * margin`` pixels. Cropping first makes the four styles
    comparable: their sources have different paddings (Noto's 136x128
    bitmaps, Twemoji's ~2 px, OpenMoji's wide em box). Fully transparent
    pixels get RGB 0 so the PNG does not depend on hidden colour values.

    Raises ``ValueError`` for an image with no visible pixel.
    """
    if size <= 2 * margin:
        raise ValueError(f"size {size} leaves no room inside a margin of {margin}")
    rgba = image.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()
    if bbox is None:
        raise ValueError("image has no visible (non-transparent) pixel")
    glyph = rgba.crop(bbox)
    box = size - 2 * margin
    scale = box / max(glyph.width, glyph.height)
    new_size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    # Pillow resizes RGBA in premultiplied alpha, so edges do not pick up the
    # colour of transparent pixels.
    glyph = glyph.resize(new_size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(glyph, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return clear_transparent_rgb(canvas)


def clear_transparent_rgb(image: Image.Image) -> Image.Image:
    """Set RGB to 0 wherever alpha is 0 (canonical form, smaller PNGs)."""
    pixels = np.array(image.convert("RGBA"))
    pixels[pixels[..., 3] == 0] = 0
    return Image.fromarray(pixels)  # uint8 HxWx4 -> RGBA


def png_bytes(image: Image.Image) -> bytes:
    """Encode an RGBA image as PNG deterministically.

    Pillow writes no tIME/tEXt chunks unless asked; fixed settings make the
    bytes depend only on the pixels (and the Pillow/zlib build).
    """
    buffer = io.BytesIO()
    image.convert("RGBA").save(buffer, format="PNG", optimize=True, compress_level=9)
    return buffer.getvalue()


class FontRenderer:
    """Draw single emoji from a colour font (CBDT bitmaps or COLR layers)."""

    def __init__(self, font_path: Path, pixel_size: int) -> None:
        # BASIC layout: one code point -> one glyph via the cmap, so the result
        # does not depend on whether Pillow was built with libraqm.
        self.font = ImageFont.truetype(str(font_path), pixel_size, layout_engine=ImageFont.Layout.BASIC)
        self.pixel_size = pixel_size
        self._notdef = self._draw(_UNMAPPED_CODEPOINT)

    def _draw(self, codepoint: int) -> np.ndarray:
        # Canvas three em wide with the pen at one em: room for any overhang.
        side = 3 * self.pixel_size
        image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(image).text(
            (self.pixel_size, self.pixel_size), chr(codepoint), font=self.font, embedded_color=True
        )
        return np.array(image)

    def render(self, codepoint: int) -> Image.Image | None:
        """The glyph of ``codepoint`` or ``None`` when the font lacks it.

        A missing glyph draws either nothing or the font's .notdef box, so
        both are treated as absent.
        """
        pixels = self._draw(codepoint)
        alpha = pixels[..., 3]
        if not alpha.any() or np.array_equal(pixels, self._notdef):
            return None
        # Ink on the canvas border means the glyph was cut off; that would be
        # a bug in the canvas geometry, not a missing emoji, so fail loudly.
        if alpha[0].any() or alpha[-1].any() or alpha[:, 0].any() or alpha[:, -1].any():
            raise RuntimeError(f"U+{codepoint_hex(codepoint)} is clipped at {self.pixel_size} px")
        return Image.fromarray(pixels)  # uint8 HxWx4 -> RGBA


def load_png(path: Path) -> Image.Image:
    """Open a (possibly palette) PNG as RGBA, fully read so the file closes."""
    with Image.open(path) as image:
        return image.convert("RGBA")


# --------------------------------------------------------------------------- #
# Package layout
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class PackagePaths:
    """Files used from the unpacked packages."""

    noto_font: Path
    openmoji_font: Path
    emoji_json: Path
    twemoji_png_dir: Path
    emojione_index: Path
    emojione_png_dir: Path


def _find_file(root: Path, name: str, must_contain: str = "") -> Path:
    """First (sorted) file called ``name`` under ``root`` whose path contains ``must_contain``.

    Searching instead of hard-coding full paths keeps the builder working
    whether a package was unpacked with or without its top-level folder.
    """
    matches = sorted(p for p in root.rglob(name) if p.is_file() and must_contain in p.as_posix())
    if not matches:
        raise FileNotFoundError(f"{name} not found under {root} (run tools/fetch_emoji_packages.sh first)")
    return matches[0]


def locate_packages(packages: Path) -> PackagePaths:
    """Find the needed files in the folder filled by ``fetch_emoji_packages.sh``."""
    emoji_json = _find_file(packages / "twemoji", "emoji.json")
    emojione_index = _find_file(packages / "emojione", "index.json", "gemojione")
    paths = PackagePaths(
        noto_font=_find_file(packages / "noto", "NotoColorEmoji.ttf"),
        openmoji_font=_find_file(packages / "openmoji", "glyf_colr0.ttf"),
        emoji_json=emoji_json,
        twemoji_png_dir=emoji_json.parent / "img" / "twitter" / "64",
        emojione_index=emojione_index,
        emojione_png_dir=emojione_index.parent.parent / "assets" / "png",
    )
    for folder in (paths.twemoji_png_dir, paths.emojione_png_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing image folder {folder}")
    return paths
