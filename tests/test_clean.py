"""The `clean` stage on a corpus of bad and odd images: every bad one quarantined with its reason, no good one lost.

The corpus is an ImageFolder tree made here with Pillow/numpy and turned into a raw manifest by the real `acquire`
folder source, so the manifest (md5, sizes, ids) is exactly what the pipeline would produce.
"""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.config import AcquireParams, CleanParams, FolderSource
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import QUARANTINE, QUARANTINE_SCHEMA, Rejected, load_clean, to_rgb
from pipeline.io import md5_file
from pipeline.outdir import OutputFolderError

WHITE = (255, 255, 255)
SIZE = 32  # valid images are 32x32 = 1024 pixels; max_image_pixels below is 2000


# ----------------------------------------------------------------------------------------------------------- helpers


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def solid_rgb(color: tuple[int, int, int], size: int = SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def noise_rgb(seed: int, size: int = SIZE) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def p_with_transparency() -> Image.Image:
    im = Image.new("P", (SIZE, SIZE), 0)
    im.putpalette([0, 255, 0] + [255, 0, 0] + [0, 0, 0] * 254)  # index 0 green (transparent), 1 red
    im.paste(1, (SIZE // 2, 0, SIZE, SIZE))  # right half red, left half transparent
    return im


def la_image() -> Image.Image:
    arr = np.zeros((SIZE, SIZE, 2), np.uint8)
    arr[..., 0] = 50
    arr[:, SIZE // 2 :, 1] = 255  # left half alpha 0, right half opaque grey 50
    return Image.fromarray(arr, "LA")


def rgba_image() -> Image.Image:
    arr = np.zeros((SIZE, SIZE, 4), np.uint8)
    arr[..., 2] = 255  # blue everywhere
    arr[:, : SIZE // 2, 3] = 0  # left half fully transparent
    arr[:, SIZE // 2 :, 3] = 255  # right half opaque
    arr[:4, SIZE // 2 :, 3] = 128  # a half-transparent band on top of the right half
    return Image.fromarray(arr, "RGBA")


def i16_image(value: int) -> Image.Image:
    return Image.fromarray(np.full((SIZE, SIZE), value, np.uint16))  # mode I;16


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(arr: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot save 16-bit RGB or LA): color_type 2 = RGB, 4 = grey + alpha."""
    h, w = arr.shape[:2]
    rows = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def png_bomb(width: int, height: int) -> bytes:
    """A decompression bomb's header: a valid PNG that claims width x height pixels, with a tiny body."""
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + png_chunk(b"IEND", b"")
    )


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def acquire_folder(src: Path, out: Path) -> pl.DataFrame:
    return acquire(AcquireParams(source="folder", folder=FolderSource(path=str(src))), src.parent, out)


# --------------------------------------------------------------------------------------------------------- the corpus

VALID_ALPHA = {  # image_id -> expected mode when opened before cleaning
    "alpha/cmyk.jpg": "CMYK",
    "alpha/i16.png": "I;16",
    "alpha/l.png": "L",
    "alpha/la.png": "LA",
    "alpha/p_trans.png": "P",
    "alpha/rgb.jpg": "RGB",
    "alpha/rgba.png": "RGBA",
    "alpha/gif_trans.gif": "P",
    "alpha/la16.png": "RGBA",
    "alpha/one_bit.png": "1",
    "alpha/p_plain.png": "P",
    "alpha/rgb16.png": "RGB",
    "alpha/rgba.webp": "RGBA",
}
BAD_REASONS = {
    "alpha/big.png": "too_many_pixels",
    "alpha/bomb.png": "too_many_pixels",
    "alpha/empty.png": "empty_file",
    "alpha/bad_header.png": "corrupt",
    "alpha/html.png": "not_an_image",
    "alpha/jpeg_garbage.jpg": "corrupt",
    "alpha/random.jpg": "not_an_image",
    "alpha/text.jpg": "not_an_image",
    "alpha/trunc.jpg": "corrupt",
    "alpha/trunc.png": "corrupt",
    "alpha/zz_dup_of_rgb.jpg": "duplicate",
}
RARE = {"beta/b0.png", "beta/b1.png"}  # 2 images < min_per_class=3
GAMMA = {f"gamma/g{i}.png" for i in range(4)}
CFG = CleanParams(min_per_class=3, max_image_pixels=2000)


def make_corpus(src: Path) -> None:
    a = src / "alpha"
    write(a / "cmyk.jpg", jpeg_bytes(Image.new("CMYK", (SIZE, SIZE), (0, 255, 255, 0))))  # pure red in CMYK
    write(a / "i16.png", png_bytes(i16_image(40000)))
    write(a / "l.png", png_bytes(Image.new("L", (SIZE, SIZE), 77)))
    write(a / "la.png", png_bytes(la_image()))
    write(a / "p_trans.png", png_bytes(p_with_transparency(), transparency=0))
    rgb_jpg = write(a / "rgb.jpg", jpeg_bytes(noise_rgb(1)))
    write(a / "rgba.png", png_bytes(rgba_image()))
    write(a / "big.png", png_bytes(solid_rgb((1, 2, 3), size=100)))  # 10000 px > max_image_pixels=2000
    write(a / "empty.png", b"")
    write(a / "html.png", b"<!doctype html><html><body><h1>404 Not Found</h1></body></html>\n")
    write(a / "text.jpg", b"this is a caption, not a JPEG\n")
    write(a / "trunc.jpg", truncated(jpeg_bytes(noise_rgb(2, size=40))))
    write(a / "trunc.png", truncated(png_bytes(noise_rgb(3, size=40))))
    write(a / "zz_dup_of_rgb.jpg", rgb_jpg.read_bytes())  # same bytes, later in manifest order
    write(a / "bomb.png", png_bomb(100_000, 100_000))  # 10^10 pixels claimed by a 1 kB file
    write(a / "random.jpg", np.random.default_rng(4).integers(0, 256, 600, dtype=np.uint8).tobytes())
    bad_header = bytearray(png_bytes(noise_rgb(5)))
    bad_header[30] ^= 0xFF  # PNG signature, then an IHDR whose CRC does not match
    write(a / "bad_header.png", bytes(bad_header))
    write(a / "jpeg_garbage.jpg", jpeg_bytes(noise_rgb(6))[:20] + bytes(range(256)) * 2)  # SOI, then noise
    red16 = np.zeros((SIZE, SIZE, 3), np.uint16)
    red16[..., 0], red16[..., 2] = 65535, 30000
    write(a / "rgb16.png", png16(red16, 2))
    grey_alpha16 = np.zeros((SIZE, SIZE, 2), np.uint16)
    grey_alpha16[..., 0] = 20000
    grey_alpha16[:, SIZE // 2 :, 1] = 65535  # left half transparent
    write(a / "la16.png", png16(grey_alpha16, 4))
    pal = Image.new("P", (SIZE, SIZE), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    write(a / "p_plain.png", png_bytes(pal))
    gif = p_with_transparency()
    buf = io.BytesIO()
    gif.save(buf, format="GIF", transparency=0)
    write(a / "gif_trans.gif", buf.getvalue())
    bits = Image.new("1", (SIZE, SIZE), 0)
    bits.paste(1, (0, 0, SIZE // 2, SIZE))  # left half white
    write(a / "one_bit.png", png_bytes(bits))
    buf = io.BytesIO()
    rgba_image().save(buf, format="WEBP", lossless=True)
    write(a / "rgba.webp", buf.getvalue())
    write(src / "beta" / "b0.png", png_bytes(solid_rgb((10, 0, 0))))
    write(src / "beta" / "b1.png", png_bytes(solid_rgb((20, 0, 0))))
    for i in range(4):
        write(src / "gamma" / f"g{i}.png", png_bytes(solid_rgb((0, 40 + i, 0))))


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    from pipeline.data.clean import clean

    base = tmp_path_factory.mktemp("clean")
    src = base / "src"
    make_corpus(src)
    raw = acquire_folder(src, base / "raw")
    out = base / "clean"
    pil_limit = Image.MAX_IMAGE_PIXELS
    try:
        df, q, counts = clean(CFG, base / "raw", out)
    finally:  # belt and braces: Pillow's limit is process-global
        Image.MAX_IMAGE_PIXELS = pil_limit
    return dict(src=src, raw_dir=base / "raw", raw=raw, out=out, df=df, q=q, counts=counts)


# ------------------------------------------------------------------------------------------------------------- tests


def test_corpus_is_what_it_claims(cleaned) -> None:
    """Guard for the test itself: the valid files really have the modes under test."""
    src = cleaned["src"]
    for image_id, mode in VALID_ALPHA.items():
        with Image.open(src / image_id) as im:
            assert im.mode == mode, image_id
    assert (src / "alpha" / "empty.png").stat().st_size == 0
    assert md5_file(src / "alpha" / "rgb.jpg") == md5_file(src / "alpha" / "zz_dup_of_rgb.jpg")
    assert cleaned["raw"].height == len(VALID_ALPHA) + len(BAD_REASONS) + len(RARE) + len(GAMMA)


def test_bad_images_quarantined_with_reason(cleaned) -> None:
    q = cleaned["q"]
    reasons = dict(zip(q["image_id"], q["reason"]))
    expected = {**BAD_REASONS, **{i: "too_few_in_class" for i in RARE}}
    assert reasons == expected
    details = dict(zip(q["image_id"], q["detail"]))
    assert details["alpha/empty.png"] == "0 bytes"
    assert "100x100" in details["alpha/big.png"] or "10000 pixels" in details["alpha/big.png"]
    assert "decompression-bomb guard" in details["alpha/bomb.png"]
    assert "clean.max_image_pixels=2000" in details["alpha/bomb.png"]
    assert "truncated" in details["alpha/trunc.jpg"] and "truncated" in details["alpha/trunc.png"]
    assert details["alpha/bad_header.png"] == "PNG signature, but no decoder accepts the header"
    assert details["alpha/text.jpg"].startswith("no image decoder recognises the content")


def test_duplicate_points_at_first_image(cleaned) -> None:
    q = cleaned["q"]
    dup = dict(zip(q["image_id"], q["duplicate_of"]))
    assert dup["alpha/zz_dup_of_rgb.jpg"] == "alpha/rgb.jpg"
    assert [k for k, v in dup.items() if v is not None] == ["alpha/zz_dup_of_rgb.jpg"]


def test_no_valid_image_dropped(cleaned) -> None:
    df = cleaned["df"]
    assert set(df["image_id"]) == set(VALID_ALPHA) | GAMMA
    assert set(df["image_id"]).isdisjoint(cleaned["q"]["image_id"])
    assert set(df["image_id"]) | set(cleaned["q"]["image_id"]) == set(cleaned["raw"]["image_id"])


def test_counts_by_reason(cleaned) -> None:
    assert cleaned["counts"] == {
        "input": 30,
        "kept": 17,
        "classes": 2,
        "quarantined": 13,
        "by_reason": {
            "corrupt": 4,
            "duplicate": 1,
            "empty_file": 1,
            "not_an_image": 3,
            "too_few_in_class": 2,
            "too_many_pixels": 2,
        },
        "class_names_merged": 0,
        "near_dup": {"groups": 0, "images": 0, "candidate_pairs": 0, "capped_buckets": 0},
    }


def test_outputs_on_disk_match_returned_frames(cleaned) -> None:
    out = cleaned["out"]
    on_disk = manifest.read(out)
    assert on_disk.equals(cleaned["df"].select(on_disk.columns))
    q = pl.read_parquet(out / QUARANTINE)
    assert q.schema == pl.Schema(QUARANTINE_SCHEMA)
    assert q.equals(cleaned["q"])


def test_kept_images_are_rgb_files_with_matching_metadata(cleaned) -> None:
    out = cleaned["out"]
    for row in cleaned["df"].iter_rows(named=True):
        path = out / row["path"]
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB", row["image_id"]
            assert im.size == (row["width"], row["height"]) == (SIZE, SIZE)
        assert md5_file(path) == row["md5"]
    files = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*") if p.is_file()}
    assert files == set(cleaned["df"]["path"])  # no stray file of a quarantined or rare image


def test_converted_images_become_png_and_rgb_jpeg_is_copied_unchanged(cleaned) -> None:
    paths = dict(zip(cleaned["df"]["image_id"], cleaned["df"]["path"]))
    assert paths["alpha/rgb.jpg"] == "images/alpha/rgb.jpg"
    assert (cleaned["out"] / paths["alpha/rgb.jpg"]).read_bytes() == (cleaned["src"] / "alpha/rgb.jpg").read_bytes()
    assert paths["gamma/g0.png"] == "images/gamma/g0.png"  # RGB PNG: also copied as is
    for image_id in set(VALID_ALPHA) - {"alpha/rgb.jpg"}:  # re-encoded: PNG named after the original
        stem = "images/" + image_id.rsplit(".", 1)[0]
        assert paths[image_id].endswith(".png") and paths[image_id].startswith(stem), image_id


def pixels(cleaned, image_id: str) -> np.ndarray:
    path = cleaned["out"] / dict(zip(cleaned["df"]["image_id"], cleaned["df"]["path"]))[image_id]
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=int)


def test_transparency_composited_on_white(cleaned) -> None:
    h = SIZE // 2
    p = pixels(cleaned, "alpha/p_trans.png")
    assert tuple(p[0, 0]) == WHITE and tuple(p[0, -1]) == (255, 0, 0)
    la = pixels(cleaned, "alpha/la.png")
    assert tuple(la[10, 0]) == WHITE and tuple(la[10, -1]) == (50, 50, 50)
    rgba = pixels(cleaned, "alpha/rgba.png")
    assert (rgba[:, :h] == 255).all()  # alpha 0 -> white, whatever the colour underneath
    assert tuple(rgba[10, -1]) == (0, 0, 255)
    r, g, b = rgba[0, -1]  # alpha 128 of blue over white
    assert abs(r - 127) <= 2 and abs(g - 127) <= 2 and b == 255


def test_other_modes_converted(cleaned) -> None:
    assert tuple(pixels(cleaned, "alpha/rgb16.png")[5, 5]) == (255, 0, 117)  # 16-bit RGB: top byte per channel
    la16 = pixels(cleaned, "alpha/la16.png")
    assert tuple(la16[3, 0]) == WHITE and tuple(la16[3, -1]) == (78, 78, 78)  # 16-bit grey + alpha on white
    assert tuple(pixels(cleaned, "alpha/p_plain.png")[5, 5]) == (10, 20, 30)
    gif = pixels(cleaned, "alpha/gif_trans.gif")
    assert tuple(gif[0, 0]) == WHITE and tuple(gif[0, -1]) == (255, 0, 0)
    one = pixels(cleaned, "alpha/one_bit.png")
    assert tuple(one[0, 0]) == WHITE and tuple(one[0, -1]) == (0, 0, 0)
    webp = pixels(cleaned, "alpha/rgba.webp")
    assert tuple(webp[10, 0]) == WHITE and tuple(webp[10, -1]) == (0, 0, 255)
    assert tuple(pixels(cleaned, "alpha/l.png")[5, 5]) == (77, 77, 77)
    assert tuple(pixels(cleaned, "alpha/i16.png")[5, 5]) == (156, 156, 156)  # 40000 / 65535 * 255
    r, g, b = pixels(cleaned, "alpha/cmyk.jpg")[16, 16]
    assert r > 230 and g < 25 and b < 25


def test_class_ids_contiguous_after_dropping_rare_class(cleaned) -> None:
    raw_ids = dict(zip(cleaned["raw"]["class_name"], cleaned["raw"]["class_id"]))
    assert raw_ids == {"alpha": 0, "beta": 1, "gamma": 2}
    ids = dict(zip(cleaned["df"]["class_name"], cleaned["df"]["class_id"]))
    assert ids == {"alpha": 0, "gamma": 1}


def test_rare_class_files_removed(cleaned) -> None:
    out = cleaned["out"]
    assert "beta" not in cleaned["df"]["class_name"].to_list()
    assert not [p for p in (out / "images" / "beta").rglob("*") if p.is_file()]
    q = cleaned["q"].filter(pl.col("reason") == "too_few_in_class")
    assert q["detail"].to_list() == ["class has fewer than clean.min_per_class=3"] * 2


def test_manifest_order_preserved(cleaned) -> None:
    raw_order = [i for i in cleaned["raw"]["image_id"] if i in set(cleaned["df"]["image_id"])]
    assert cleaned["df"]["image_id"].to_list() == raw_order


def test_max_per_class_caps_in_manifest_order(tmp_path: Path) -> None:
    from pipeline.data.clean import clean

    src = tmp_path / "src"
    for i in range(6):
        write(src / "a" / f"a{i}.png", png_bytes(solid_rgb((i, 100, 0))))
    for i in range(2):
        write(src / "b" / f"b{i}.png", png_bytes(solid_rgb((i, 0, 100))))
    acquire_folder(src, tmp_path / "raw")
    df, q, counts = clean(CleanParams(min_per_class=2, max_per_class=4), tmp_path / "raw", tmp_path / "out")
    assert df["image_id"].to_list() == ["a/a0.png", "a/a1.png", "a/a2.png", "a/a3.png", "b/b0.png", "b/b1.png"]
    assert dict(zip(q["image_id"], q["reason"])) == {"a/a4.png": "over_class_cap", "a/a5.png": "over_class_cap"}
    assert counts["by_reason"] == {"over_class_cap": 2}
    assert not (tmp_path / "out" / "images" / "a" / "a4.png").exists()
    assert not (tmp_path / "out" / "images" / "a" / "a5.png").exists()
    assert (tmp_path / "out" / "images" / "a" / "a3.png").is_file()


def test_rerun_replaces_output(tmp_path: Path) -> None:
    from pipeline.data.clean import clean

    src = tmp_path / "src"
    for i in range(4):
        write(src / "a" / f"a{i}.png", png_bytes(solid_rgb((i, 1, 2))))
    acquire_folder(src, tmp_path / "raw")
    clean(CleanParams(), tmp_path / "raw", tmp_path / "out")
    first = (tmp_path / "out" / "manifest.parquet").read_bytes()
    clean(CleanParams(), tmp_path / "raw", tmp_path / "out")
    assert (tmp_path / "out" / "manifest.parquet").read_bytes() == first  # deterministic bytes
    # A file the project did not write stops the re-run and survives it (issue 23).
    stale = write(tmp_path / "out" / "images" / "stale.png", png_bytes(solid_rgb((9, 9, 9))))
    with pytest.raises(OutputFolderError, match=r"1 entries the project did not write \(images/stale.png\)"):
        clean(CleanParams(), tmp_path / "raw", tmp_path / "out")
    assert stale.exists() and (tmp_path / "out" / "manifest.parquet").read_bytes() == first


def test_missing_file_rejected(tmp_path: Path) -> None:
    with pytest.raises(Rejected) as info:
        load_clean(tmp_path / "gone.png", CleanParams())
    assert info.value.reason == "missing"


def test_to_rgb_uses_configured_background() -> None:
    out = to_rgb(rgba_image(), (10, 20, 30))
    assert out.mode == "RGB"
    assert out.getpixel((0, 10)) == (10, 20, 30)
    assert out.getpixel((SIZE - 1, 10)) == (0, 0, 255)


def test_resize_short_side(tmp_path: Path) -> None:
    path = write(tmp_path / "wide.png", png_bytes(Image.new("RGB", (80, 40), (5, 6, 7))))
    im, changed = load_clean(path, CleanParams(resize_short_side=20))
    assert im.size == (40, 20) and changed is True
    im, changed = load_clean(path, CleanParams(resize_short_side=64))
    assert im.size == (80, 40) and changed is False


# ------------------------------------------------------------------------------------- regressions of fixed bugs


def test_converted_name_does_not_collide_with_existing_png(tmp_path: Path) -> None:
    """x.jpg (converted to PNG) and x.png (converted too) in one class folder must stay two files."""
    from pipeline.data.clean import clean

    src = tmp_path / "src"
    write(src / "a" / "x.jpg", jpeg_bytes(Image.new("L", (SIZE, SIZE), 30)))  # mode L -> converted
    write(src / "a" / "x.png", png_bytes(rgba_image()))  # mode RGBA -> converted
    write(src / "a" / "y.png", png_bytes(solid_rgb((1, 1, 1))))
    acquire_folder(src, tmp_path / "raw")
    df, _, _ = clean(CleanParams(min_per_class=1), tmp_path / "raw", tmp_path / "out")
    assert df.height == 3
    assert df["path"].n_unique() == 3
    for row in df.iter_rows(named=True):
        assert md5_file(tmp_path / "out" / row["path"]) == row["md5"], row["image_id"]


def test_max_image_pixels_above_pil_limit_is_honoured(tmp_path: Path, monkeypatch) -> None:
    """clean.max_image_pixels may be raised above Pillow's own limit (scaled down: 1000 px stands for 89.5 Mpx)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write(tmp_path / "ok.png", png_bytes(solid_rgb((1, 2, 3), size=40)))  # 1600 px
    try:
        im, _ = load_clean(path, CleanParams(max_image_pixels=100_000))
    except Rejected as r:
        pytest.fail(f"quarantined as {r.reason}: {r.detail}")
    assert im.size == (40, 40)


def test_dark_16bit_image_stays_dark() -> None:
    out = to_rgb(i16_image(200), WHITE)
    assert out.getpixel((0, 0)) == (1, 1, 1)  # 200 / 65535 * 255 = 0.78


def test_rejected_propagates_through_context_manager() -> None:
    @contextmanager
    def step():
        yield

    with pytest.raises(Rejected) as info:
        with step():
            raise Rejected("corrupt", "demo")
    assert (info.value.reason, info.value.detail) == ("corrupt", "demo")


# ------------------------------------------------------------------------------------------------ regressions


def test_load_clean_leaves_pillow_limit_alone(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 89_478_485)  # restored after the test whatever happens
    small = write(tmp_path / "small.png", png_bytes(solid_rgb((1, 2, 3), size=10)))
    load_clean(small, CleanParams(max_image_pixels=1000))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    with Image.open(write(tmp_path / "big.png", png_bytes(solid_rgb((4, 5, 6), size=64)))) as im:  # 4096 px
        im.load()


# ------------------------------------------------------------------------------------------- sharded input (DAF:re)


def manifest_rows(entries: list[dict]) -> pl.DataFrame:
    """A raw manifest for hand-placed files; extra source columns (post_id, artist, split, face_score) included."""
    rows = [
        dict(
            image_id=e["id"],
            path=e["path"],
            class_id=e["class_id"],
            class_name=f"c{e['class_id']}",
            source="dafre",
            group=str(e["post_id"]),
            md5=None,
            width=None,
            height=None,
            split=e["split"],
            post_id=e["post_id"],
            artist=f"artist{e['post_id'] % 3}",
            face_score=0.9,
        )
        for e in entries
    ]
    schema = {**manifest.SCHEMA, "post_id": pl.Int64, "artist": pl.String, "face_score": pl.Float64}
    return pl.DataFrame(rows, schema=schema)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Raw images in tar shards of 3, as the DAF:re source writes them, with bad members and bad paths mixed in."""
    from pipeline.data import images
    from pipeline.data.clean import clean

    base = tmp_path_factory.mktemp("sharded")
    raw = base / "raw"
    splits = ["train", "train", "val", "test"]
    entries = []
    with images.ImageWriter(raw, shard_size=3) as writer:
        for i in range(8):
            data = (
                jpeg_bytes(noise_rgb(100 + i)) if i % 2 else png_bytes(rgba_image() if i == 2 else noise_rgb(100 + i))
            )
            entries.append(
                dict(
                    id=f"img{i}",
                    path=writer.write(f"{i % 4:04d}/{1000 + i}.jpg", data),
                    class_id=i % 2,
                    post_id=1000 + i,
                    split=splits[i % 4],
                )
            )
        # Same member name as img0, in a later shard: both must survive, under distinct names.
        entries.append(
            dict(
                id="same_name",
                path=writer.write("0000/1000.jpg", png_bytes(noise_rgb(7))),
                class_id=0,
                post_id=2000,
                split="train",
            )
        )
        entries.append(
            dict(id="empty", path=writer.write("0001/empty.jpg", b""), class_id=1, post_id=3000, split="test")
        )
        entries.append(
            dict(
                id="trunc",
                path=writer.write("0001/trunc.jpg", truncated(jpeg_bytes(noise_rgb(9)))),
                class_id=1,
                post_id=3001,
                split="test",
            )
        )
    entries.append(dict(id="gone", path="shards/00000.tar/0009/gone.jpg", class_id=0, post_id=4000, split="val"))
    entries.append(dict(id="escape", path="../outside.jpg", class_id=0, post_id=4001, split="val"))
    manifest.write(manifest_rows(entries), raw)
    out = base / "clean"
    df, q, counts = clean(CleanParams(min_per_class=1, shard_size=4), raw, out)
    return dict(raw=raw, out=out, df=df, q=q, counts=counts)


def test_sharded_input_gives_sharded_output(sharded) -> None:
    from pipeline.data import images

    out, df = sharded["out"], sharded["df"]
    assert df.height == 9
    assert all(p.startswith("shards/") for p in df["path"])
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]  # 4+4+1
    assert not (out / "images").exists() and not (out / ".staging").exists()
    assert df["path"].n_unique() == df.height
    for row in df.iter_rows(named=True):
        data = images.read_bytes(out, row["path"])
        assert hashlib_md5(data) == row["md5"], row["image_id"]
        with images.open_image(out, row["path"]) as im:
            im.load()
            assert im.mode == "RGB" and im.size == (row["width"], row["height"]), row["image_id"]


def test_sharded_bad_members_and_paths_quarantined(sharded) -> None:
    reasons = dict(zip(sharded["q"]["image_id"], sharded["q"]["reason"]))
    assert reasons == {"empty": "empty_file", "trunc": "corrupt", "gone": "missing", "escape": "unsafe_path"}


def test_source_columns_and_official_split_pass_through(sharded) -> None:
    df = sharded["df"]
    assert {"post_id", "artist", "face_score", "dup_group"} <= set(df.columns)
    assert df.schema["post_id"] == pl.Int64 and df.schema["face_score"] == pl.Float64
    row = df.filter(pl.col("image_id") == "img3").row(0, named=True)
    assert (row["post_id"], row["artist"], row["split"], row["face_score"]) == (1003, "artist1", "test", 0.9)
    assert df["split"].to_list() == ["train", "train", "val", "test"] * 2 + ["train"]
    assert df["dup_group"].to_list() == df["image_id"].to_list()  # near-dup search off: every image alone


def hashlib_md5(data: bytes) -> str:
    import hashlib

    return hashlib.md5(data).hexdigest()


# ---------------------------------------------------------------------------------------- metadata rules (select)


def meta_frame(rows: list[tuple[str, int, str, str | None]]) -> pl.DataFrame:
    """(image_id, class_id, class_name, md5) rows -> a manifest for clean.select (no images needed)."""
    return pl.DataFrame(
        [
            dict(
                image_id=i,
                path=f"images/{i}.png",
                class_id=c,
                class_name=n,
                source="t",
                group=i,
                md5=m,
                width=8,
                height=8,
                split=None,
            )
            for i, c, n, m in rows
        ],
        schema=manifest.SCHEMA,
    )


def test_class_name_normalisation_merges_spellings() -> None:
    from pipeline.data.clean import select

    df = meta_frame(
        [
            ("a", 0, "Hatsune Miku", "1"),
            ("b", 1, "hatsune_miku", "2"),
            ("c", 2, " HATSUNE  MIKU ", "3"),
            ("d", 3, "Ｒｅｉ", "4"),
            ("e", 4, "rei", "5"),
            ("f", 5, "a__b", "6"),
        ]
    )
    kept, q, counts = select(df, CleanParams(min_per_class=1, normalize_class_names=True))
    assert kept["class_name"].to_list() == ["hatsune_miku"] * 3 + ["rei", "rei", "a_b"]
    assert kept["class_id"].to_list() == [0, 0, 0, 1, 1, 2]  # contiguous, in the order of the original ids
    assert counts["class_names_merged"] == 3 and q.height == 0
    kept, _, counts = select(df, CleanParams(min_per_class=1))  # off by default: names untouched
    assert kept["class_name"].n_unique() == 6 and counts["class_names_merged"] == 0


def test_normalised_names_count_together_for_min_per_class() -> None:
    from pipeline.data.clean import select

    df = meta_frame([("a", 0, "Rei", "1"), ("b", 1, "rei", "2"), ("c", 2, "asuka", "3")])
    kept, q, _ = select(df, CleanParams(min_per_class=2, normalize_class_names=True))
    assert kept["image_id"].to_list() == ["a", "b"]
    assert dict(zip(q["image_id"], q["reason"])) == {"c": "too_few_in_class"}


def test_exact_duplicate_across_classes_is_a_label_conflict() -> None:
    """Issue 15: the same bytes under two classes used to keep the first class's label silently. Every copy goes to
    quarantine as label_conflict, naming both classes; a duplicate within one class keeps its first copy."""
    from pipeline.data.clean import select

    df = meta_frame(
        [
            ("a", 0, "x", "same"),
            ("b", 1, "y", "other"),
            ("c", 1, "y", "same"),
            ("d", 0, "x", None),
            ("e", 0, "x", None),
            ("f", 0, "x", "same"),
            ("g", 1, "y", "other"),
        ]
    )
    kept, q, counts = select(df, CleanParams(min_per_class=1))
    assert kept["image_id"].to_list() == ["b", "d", "e"]  # unknown md5s are never duplicates of each other
    assert q.select("image_id", "reason", "detail", "duplicate_of").rows() == [
        ("a", "label_conflict", "the same bytes are labelled with 2 classes: x, y", None),
        ("c", "label_conflict", "the same bytes are labelled with 2 classes: x, y", "a"),
        ("f", "label_conflict", "the same bytes are labelled with 2 classes: x, y", "a"),
        ("g", "duplicate", "same md5 as b", "b"),
    ]
    assert counts["by_reason"] == {"duplicate": 1, "label_conflict": 3}


def test_original_class_ids_kept_when_nothing_is_dropped() -> None:
    """An official numbering (DAF:re: by tag id, not by name) survives clean when no class goes."""
    from pipeline.data.clean import select

    df = meta_frame([("a", 0, "zeta", "1"), ("b", 1, "alpha", "2"), ("c", 2, "mid", "3")])
    kept, _, _ = select(df, CleanParams(min_per_class=1))
    assert dict(zip(kept["class_name"], kept["class_id"])) == {"zeta": 0, "alpha": 1, "mid": 2}


# ------------------------------------------------------------------------------------------------ near-duplicates


def smooth_image(seed: int, size: int = 128) -> Image.Image:
    """A photo-like image: low-frequency structure, so a perceptual hash is stable under re-encoding and resizing."""
    small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((size, size), Image.Resampling.BICUBIC)


NEAR_DUPS = {"x/a_jpeg.jpg": "x/a.png", "x/a_small.png": "x/a.png", "y/a_cross_class.jpg": "x/a.png"}


@pytest.fixture(scope="module")
def near_dup_raw(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("near")
    src = base / "src"
    a = smooth_image(1)
    write(src / "x" / "a.png", png_bytes(a))
    write(
        src / "x" / "a_jpeg.jpg",
        jpeg_bytes(
            a.copy(),
        ),
    )  # re-encoded
    write(src / "x" / "a_small.png", png_bytes(a.resize((100, 100), Image.Resampling.LANCZOS)))  # resized
    write(src / "x" / "b.png", png_bytes(smooth_image(2)))
    write(src / "y" / "a_cross_class.jpg", jpeg_bytes(a.resize((90, 90))))  # same picture, labelled y
    write(src / "y" / "c.png", png_bytes(smooth_image(3)))
    acquire_folder(src, base / "raw")
    return base / "raw"


def test_near_dup_corpus_is_what_it_claims(near_dup_raw) -> None:
    from pipeline.data.dedup import phash64

    hashes = {}
    for p in sorted((near_dup_raw / "images").rglob("*.*")):
        with Image.open(p) as im:
            hashes[p.relative_to(near_dup_raw / "images").as_posix()] = phash64(im.convert("RGB"))
    dist = lambda i, j: bin(hashes[i] ^ hashes[j]).count("1")  # noqa: E731
    assert all(dist(dup, first) <= 4 for dup, first in NEAR_DUPS.items())
    assert (
        min(dist(i, j) for i in ("x/a.png", "x/b.png", "y/c.png") for j in ("x/a.png", "x/b.png", "y/c.png") if i < j)
        > 12
    )


def test_near_duplicates_dropped_name_the_image_they_duplicate(near_dup_raw, tmp_path) -> None:
    from pipeline.data.clean import clean

    df, q, counts = clean(
        CleanParams(min_per_class=1, near_dup_hamming=4, near_dup_action="drop"), near_dup_raw, tmp_path / "out"
    )
    assert df["image_id"].to_list() == ["x/a.png", "x/b.png", "y/c.png"]
    assert dict(zip(q["image_id"], q["duplicate_of"])) == NEAR_DUPS
    assert set(q["reason"]) == {"near_duplicate"}
    assert all(d.startswith("pHash ") and "clean.near_dup_hamming=4" in d for d in q["detail"])
    assert counts["near_dup"]["groups"] == 0  # nothing left to group: the later copies are gone
    assert df.schema["phash"] == pl.UInt64


def test_near_duplicates_grouped_keep_every_image(near_dup_raw, tmp_path) -> None:
    from pipeline.data.clean import clean

    df, q, counts = clean(CleanParams(min_per_class=1, near_dup_hamming=4), near_dup_raw, tmp_path / "out")
    assert q.height == 0 and df.height == 6
    groups = dict(zip(df["image_id"], df["dup_group"]))
    assert groups == {**NEAR_DUPS, "x/a.png": "x/a.png", "x/b.png": "x/b.png", "y/c.png": "y/c.png"}
    assert counts["near_dup"] == {
        "groups": 1,
        "images": 4,
        "candidate_pairs": counts["near_dup"]["candidate_pairs"],
        "capped_buckets": 0,
    }


def test_worker_processes_give_the_same_result(near_dup_raw, tmp_path) -> None:
    from pipeline.data.clean import clean

    cfg = CleanParams(min_per_class=1, near_dup_hamming=4, workers=2)
    inline = clean(cfg, near_dup_raw, tmp_path / "inline", pool_min=10_000)
    pooled = clean(cfg, near_dup_raw, tmp_path / "pooled", pool_min=0)
    assert inline[0].equals(pooled[0]) and inline[1].equals(pooled[1]) and inline[2] == pooled[2]
    for rel in inline[0]["path"]:
        assert (tmp_path / "inline" / rel).read_bytes() == (tmp_path / "pooled" / rel).read_bytes()


def test_resize_and_jpeg_reencode(tmp_path: Path) -> None:
    from pipeline.data.clean import clean

    src = tmp_path / "src"
    write(src / "a" / "wide.png", png_bytes(smooth_image(4).resize((300, 200))))
    write(src / "a" / "small.jpg", jpeg_bytes(noise_rgb(8)))  # 32 px, below the short side: copied byte for byte
    acquire_folder(src, tmp_path / "raw")
    df, _, _ = clean(
        CleanParams(min_per_class=1, resize_short_side=100, reencode="jpeg", jpeg_quality=90),
        tmp_path / "raw",
        tmp_path / "out",
    )
    rows = {r["image_id"]: r for r in df.iter_rows(named=True)}
    assert rows["a/wide.png"]["path"] == "images/a/wide.png.jpg"
    assert (rows["a/wide.png"]["width"], rows["a/wide.png"]["height"]) == (150, 100)
    with Image.open(tmp_path / "out" / rows["a/wide.png"]["path"]) as im:
        assert im.format == "JPEG" and im.size == (150, 100)
    assert rows["a/small.jpg"]["path"] == "images/a/small.jpg"
    assert (tmp_path / "out/images/a/small.jpg").read_bytes() == (src / "a/small.jpg").read_bytes()


def test_a_900_megapixel_header_quotes_one_limit() -> None:
    """Issue 23 case 7: the message quoted clean.max_image_pixels and, from Pillow's text, twice that."""
    cfg = CleanParams()
    from pipeline.data.clean import decode

    with pytest.raises(Rejected) as info:
        decode(png_bomb(30_000, 30_000), cfg)
    detail = info.value.detail
    assert info.value.reason == "too_many_pixels"
    assert "900000000 pixels" in detail and f"clean.max_image_pixels={cfg.max_image_pixels}" in detail
    assert str(2 * cfg.max_image_pixels) not in detail
