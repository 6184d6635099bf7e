"""Checks of the committed emoji dataset (datasets/emoji) and its builder's helpers.

Runs on the files in the repository only: no package download, no font.
"""

from __future__ import annotations

import csv
import struct
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.emoji_sources import INDEX_COLUMNS, STYLES, fit_to_canvas, png_bytes, single_codepoint
from tools.build_emoji import index_csv_bytes, index_rows

DATASET = Path(__file__).resolve().parents[1] / "datasets" / "emoji"
EXPECTED_HEADER = ["file", "codepoint", "class_name", "category", "subcategory", "style"]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, str]]:
    with (DATASET / "index.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == EXPECTED_HEADER
        return list(reader)


def test_builder_and_tests_agree_on_columns() -> None:
    assert list(INDEX_COLUMNS) == EXPECTED_HEADER
    assert set(STYLES) == {"noto", "twemoji", "openmoji", "emojione"}


def test_every_listed_file_is_a_64px_rgba_png(rows: list[dict[str, str]]) -> None:
    for row in rows:
        path = DATASET / row["file"]
        assert path.is_file(), row["file"]
        assert row["file"] == f"images/{row['style']}/{row['codepoint']}.png"
        with Image.open(path) as image:
            assert image.format == "PNG", row["file"]
            assert image.mode == "RGBA", row["file"]
            assert image.size == (64, 64), row["file"]


def test_no_unlisted_images(rows: list[dict[str, str]]) -> None:
    listed = {row["file"] for row in rows}
    on_disk = {p.relative_to(DATASET).as_posix() for p in (DATASET / "images").rglob("*") if p.is_file()}
    assert on_disk == listed


def test_four_styles_per_class_and_enough_classes(rows: list[dict[str, str]]) -> None:
    styles_by_class: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        styles_by_class[row["codepoint"]].append(row["style"])
    assert len(styles_by_class) >= 200
    for codepoint, styles in styles_by_class.items():
        assert sorted(styles) == sorted(STYLES), codepoint


def test_codepoint_style_pairs_unique_and_well_formed(rows: list[dict[str, str]]) -> None:
    pairs = Counter((row["codepoint"], row["style"]) for row in rows)
    assert max(pairs.values()) == 1
    for row in rows:
        assert row["codepoint"] == row["codepoint"].upper()
        assert single_codepoint(row["codepoint"]) == int(row["codepoint"], 16)
        assert row["class_name"] and row["class_name"] == row["class_name"].lower()


def test_one_name_and_category_per_class(rows: list[dict[str, str]]) -> None:
    meta = {(row["codepoint"], row["class_name"], row["category"], row["subcategory"]) for row in rows}
    assert len(meta) == len({row["codepoint"] for row in rows})
    # Distinct classes must also have distinct names (they are used as labels).
    assert len({m[1] for m in meta}) == len(meta)


def test_both_categories_present(rows: list[dict[str, str]]) -> None:
    categories = Counter(row["category"] for row in rows)
    assert set(categories) == {"Smileys & Emotion", "People & Body"}


def test_rows_sorted_by_codepoint_then_style(rows: list[dict[str, str]]) -> None:
    keys = [(int(row["codepoint"], 16), row["style"]) for row in rows]
    assert keys == sorted(keys)


def test_images_are_not_blank_and_keep_a_transparent_border(rows: list[dict[str, str]]) -> None:
    # A failed render would be empty; a clipped one would touch the border.
    for row in rows[::7]:  # a spread-out sample keeps the test fast
        with Image.open(DATASET / row["file"]) as image:
            alpha = image.getchannel("A")
            bbox = alpha.getbbox()
        assert bbox is not None, row["file"]
        left, top, right, bottom = bbox
        assert min(left, top) >= 1 and max(right, bottom) <= 63, (row["file"], bbox)


def test_licences_and_attribution_shipped() -> None:
    for name in ("Apache-2.0.txt", "OFL-1.1.txt", "CC-BY-4.0.txt", "CC-BY-SA-4.0.txt"):
        text = (DATASET / "LICENSES" / name).read_text(encoding="utf-8")
        assert len(text) > 3000, name  # a full text, not a pointer to one
    attribution = (DATASET / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for word in ("noto", "twemoji", "openmoji", "emojione", "tools/fetch_emoji_packages.sh"):
        assert word in attribution


# --------------------------------------------------------------------------- #
# Pure helpers of tools/build_emoji.py and pipeline/data/emoji_sources.py on synthetic input
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("unified", "expected"),
    [
        ("1F600", 0x1F600),
        ("263A-FE0F", 0x263A),  # presentation selector is not a sequence
        ("1F44D-1F3FB", None),  # skin tone
        ("1F468-200D-1F469-200D-1F467", None),  # ZWJ family
        ("0023-FE0F-20E3", None),  # keycap
        ("1F1EB-1F1F7", None),  # flag
        ("1F3FD", None),  # bare skin-tone modifier
    ],
)
def test_single_codepoint(unified: str, expected: int | None) -> None:
    assert single_codepoint(unified) == expected


def test_fit_to_canvas_centres_and_scales_keeping_aspect() -> None:
    # A 40x10 opaque red bar in the top-left corner of a 100x80 image.
    source = Image.new("RGBA", (100, 80), (0, 255, 0, 0))  # hidden green must vanish
    source.paste((255, 0, 0, 255), (0, 0, 40, 10))
    result = fit_to_canvas(source, size=64, margin=2)

    assert result.size == (64, 64) and result.mode == "RGBA"
    # Longer side fills 60 px, aspect 4:1 kept -> 60x15, centred.
    assert result.getchannel("A").getbbox() == (2, 24, 62, 39)
    assert result.getpixel((32, 31)) == (255, 0, 0, 255)
    assert result.getpixel((0, 0)) == (0, 0, 0, 0)


def test_fit_to_canvas_rejects_empty_image() -> None:
    with pytest.raises(ValueError):
        fit_to_canvas(Image.new("RGBA", (10, 10)), size=64)


def _png_chunk_types(data: bytes) -> list[bytes]:
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        chunk_type = data[offset + 4 : offset + 8]
        payload = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(chunk_type + payload) == crc
        types.append(chunk_type)
        offset += 12 + length
    return types


def test_png_bytes_is_deterministic_and_has_no_metadata() -> None:
    image = fit_to_canvas(Image.new("RGBA", (5, 9), (10, 20, 30, 200)), size=16, margin=1)
    first, second = png_bytes(image), png_bytes(image.copy())
    assert first == second
    assert _png_chunk_types(first) == [b"IHDR", b"IDAT", b"IEND"]


def test_index_csv_layout() -> None:
    from pipeline.data.emoji_sources import EmojiInfo

    infos = [
        EmojiInfo(0x1F600, "grinning face", "Smileys & Emotion", "face-smiling", "1f600.png"),
        EmojiInfo(0x263A, "white smiling face", "Smileys & Emotion", "face-affection", "263a-fe0f.png"),
    ]
    lines = index_csv_bytes(index_rows(infos)).decode("utf-8").splitlines()
    assert lines[0] == ",".join(EXPECTED_HEADER)
    # Numeric code-point order (263A before 1F600), styles alphabetical.
    assert lines[1].startswith("images/emojione/263A.png,263A,white smiling face,")
    assert lines[5] == "images/emojione/1F600.png,1F600,grinning face,Smileys & Emotion,face-smiling,emojione"
    assert len(lines) == 1 + 2 * len(STYLES)
