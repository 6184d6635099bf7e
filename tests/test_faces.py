"""The `faces` stage on real anime artwork: the MIT-licensed Ren'Py sprites in tests/fixtures/renpy (ATTRIBUTION.md).

Library level (detect, the crop/reject rules, pass-through, shards) and the DVC entry point as a real process.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from PIL import Image

from pipeline.config import FacesParams
from pipeline.data import images, manifest
from pipeline.data.faces import FACE_SCHEMA, REJECTED, FacesError, detect, faces
from pipeline.io import md5_file
from tests.conftest import REPO, run_cmd, write_tiny_params

FIXTURES = REPO / "tests/fixtures/renpy"
SPRITES = [
    "sylvie_blue_normal.png",
    "sylvie_green_giggle.png",
    "sylvie_blue_giggle.png",
    "eileen_happy.png",
    "lucy_happy.png",
]
BACKGROUND = "bg_lecturehall.jpg"  # a scene without anyone in it
ON = FacesParams(enabled=True)


def _sprite(name: str) -> Image.Image:
    im = Image.open(FIXTURES / name)
    im.load()
    return im


def _encoded(im: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **save)
    return buf.getvalue()


def _side_by_side(*names: str) -> bytes:
    """Several sprites on one transparent canvas: a picture with several faces."""
    parts = [_sprite(n).convert("RGBA") for n in names]
    canvas = Image.new("RGBA", (sum(p.width for p in parts), max(p.height for p in parts)), (0, 0, 0, 0))
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width
    return _encoded(canvas, "PNG")


def make_raw(dest: Path, files: dict[str, bytes], shard_size: int | None = None, missing: tuple[str, ...] = ()) -> Path:
    """An acquire-style output folder: images (plain files or tar shards) + manifest, one class per image."""
    rows = []
    with images.ImageWriter(dest, shard_size=shard_size) as writer:
        for i, (name, data) in enumerate(files.items()):
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
            except Exception:
                w = h = None  # as acquire records undecodable files
            rel = writer.write(name, data)
            rows.append(
                dict(
                    image_id=name,
                    path=rel,
                    class_id=i,
                    class_name=name.split("_")[0],
                    source="renpy",
                    group=name,
                    md5=hashlib.md5(data).hexdigest(),
                    width=w,
                    height=h,
                    split=None,
                )
            )
    for i, name in enumerate(missing, start=len(rows)):  # in the manifest, never written
        rows.append(
            dict(
                image_id=name,
                path=f"images/{name}",
                class_id=i,
                class_name="gone",
                source="renpy",
                group=name,
                md5="f" * 32,
                width=None,
                height=None,
                split=None,
            )
        )
    manifest.write(pl.DataFrame(rows, schema=manifest.SCHEMA), dest)
    return dest


# --- detect() -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPRITES)
def test_detect_finds_the_face_of_every_sprite(name):
    im = _sprite(name)
    found = detect(im, ON)
    assert len(found) == 1 and found[0].score >= 0.85
    x0, y0, x1, y1 = found[0].box
    assert 0 <= x0 < x1 <= im.width and 0 <= y0 < y1 <= im.height
    # full-body sprites: the head is in the upper part, and a face is a sizeable square-ish box
    assert y1 < 0.45 * im.height
    assert 0.15 * im.width < x1 - x0 < 0.8 * im.width and 0.75 < (x1 - x0) / (y1 - y0) < 1.33


def test_detect_finds_nothing_in_a_background_or_a_flat_image():
    assert detect(_sprite(BACKGROUND), ON) == []
    assert detect(Image.new("RGB", (64, 64), (200, 120, 40)), ON) == []


def test_detect_composites_transparency_so_invisible_pixels_hold_no_face():
    """Lucy painted into fully transparent pixels beside Eileen: only Eileen is visible, only Eileen is found."""
    import animeface

    lucy = _sprite("lucy_happy.png").convert("RGBA").convert("RGB")  # alpha dropped: the sprite on its matte
    eileen = _sprite("eileen_happy.png")
    canvas = Image.new("RGBA", (lucy.width + eileen.width, 360))
    hidden = lucy.convert("RGBA")
    hidden.putalpha(0)
    canvas.paste(hidden, (0, 0))
    canvas.paste(eileen, (lucy.width, 0))
    assert len(animeface.detect(canvas)) == 2  # animeface alone drops alpha and sees the hidden face
    found = detect(canvas, ON)
    assert len(found) == 1 and found[0].box[0] >= lucy.width


def test_max_side_downscales_for_detection_and_maps_boxes_back():
    im = _sprite("sylvie_blue_normal.png")
    big = im.convert("RGBA").resize((im.width * 2, im.height * 2), Image.Resampling.LANCZOS)
    small_box = detect(im, ON)[0].box
    big_box = detect(big, FacesParams(enabled=True, max_side=im.height))[0].box  # detected at about im's size
    assert all(abs(b - 2 * s) <= 4 for b, s in zip(big_box, small_box)), (big_box, small_box)


# --- the stage, enabled -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cropped(tmp_path_factory) -> dict:
    """One enabled run over sprites (PNG RGBA and palette, JPEG, WebP), a background, a broken and a missing file."""
    tmp = tmp_path_factory.mktemp("faces")
    eileen_jpg = _encoded(Image.open(FIXTURES / "eileen_happy.png").convert("RGB"), "JPEG", quality=95)
    files = {
        "sylvie_blue_normal.png": (FIXTURES / "sylvie_blue_normal.png").read_bytes(),
        "eileen_happy.jpg": eileen_jpg,
        "lucy_happy.webp": _encoded(_sprite("lucy_happy.png").convert("RGBA"), "WEBP", lossless=True),
        BACKGROUND: (FIXTURES / BACKGROUND).read_bytes(),
        "broken.png": b"\x89PNG\r\n\x1a\n not really a png",
    }
    raw = make_raw(tmp / "raw", files, missing=("gone.png",))
    df, metrics = faces(ON, raw, tmp / "out")
    return dict(raw=raw, out=tmp / "out", df=df, metrics=metrics, files=files)


def test_crops_are_the_face_box_plus_margin(cropped):
    df, out = cropped["df"], cropped["out"]
    assert df["image_id"].to_list() == ["sylvie_blue_normal.png", "eileen_happy.jpg", "lucy_happy.webp"]
    assert manifest.read(out).equals(df)
    for row in df.iter_rows(named=True):
        original = Image.open(io.BytesIO(cropped["files"][row["image_id"]]))
        box_w, box_h = row["face_x1"] - row["face_x0"], row["face_y1"] - row["face_y0"]
        pad_x, pad_y = round(0.25 * box_w), round(0.25 * box_h)
        expected = (
            min(original.width, row["face_x1"] + pad_x) - max(0, row["face_x0"] - pad_x),
            min(original.height, row["face_y1"] + pad_y) - max(0, row["face_y0"] - pad_y),
        )
        with images.open_image(out, row["path"]) as crop:
            assert crop.size == expected == (row["width"], row["height"])
        assert md5_file(out / row["path"]) == row["md5"]
        assert row["face_score"] >= 0.85 and row["faces_found"] == 1


def test_output_keeps_png_and_writes_jpeg_otherwise(cropped):
    paths = dict(cropped["df"].select("image_id", "path").iter_rows())
    assert paths == {
        "sylvie_blue_normal.png": "images/sylvie_blue_normal.png",
        "eileen_happy.jpg": "images/eileen_happy.jpg",
        "lucy_happy.webp": "images/lucy_happy.webp.jpg",
    }
    with images.open_image(cropped["out"], paths["sylvie_blue_normal.png"]) as im:
        assert im.format == "PNG" and "transparency" in im.info  # clean composites later, on its own background
    for key in ("eileen_happy.jpg", "lucy_happy.webp"):
        with images.open_image(cropped["out"], paths[key]) as im:
            assert im.format == "JPEG" and im.mode == "RGB"


def test_manifest_schema_and_rejections(cropped):
    df, out = cropped["df"], cropped["out"]
    assert {c: df.schema[c] for c in FACE_SCHEMA} == FACE_SCHEMA
    assert set(manifest.read(cropped["raw"]).columns) | set(FACE_SCHEMA) == set(df.columns)
    rejected = pl.read_parquet(out / REJECTED)
    assert rejected.columns == ["image_id", "path", "class_name", "reason", "detail"]
    assert dict(rejected.select("image_id", "reason").iter_rows()) == {
        BACKGROUND: "no_face",
        "broken.png": "unreadable",
        "gone.png": "unreadable",
    }
    m = cropped["metrics"]
    assert m["enabled"] is True and m["input"] == 6 and m["kept"] == m["faces_kept"] == 3
    assert m["rejected"] == 3 and m["by_reason"] == {"no_face": 1, "unreadable": 2}
    assert 0 < m["mean_detect_s"] < 5
    assert not list(out.parent.glob(".out.*"))  # the staging folder was renamed into place


def test_no_face_keep_keeps_the_image_whole(tmp_path):
    data = (FIXTURES / BACKGROUND).read_bytes()
    raw = make_raw(tmp_path / "raw", {BACKGROUND: data, "lucy_happy.png": (FIXTURES / "lucy_happy.png").read_bytes()})
    df, metrics = faces(FacesParams(enabled=True, no_face="keep"), raw, tmp_path / "out")
    whole = df.filter(pl.col("image_id") == BACKGROUND).row(0, named=True)
    assert whole["faces_found"] == 0 and whole["face_x0"] is None and whole["face_score"] is None
    assert images.read_bytes(tmp_path / "out", whole["path"]) == data  # the original bytes, not a re-encode
    assert (whole["width"], whole["height"]) == (320, 180)
    assert metrics["kept_whole"] == 1 and metrics["faces_kept"] == 1 and metrics["rejected"] == 0


def test_one_face_only_rejects_pictures_with_two_faces(tmp_path):
    raw = make_raw(tmp_path / "raw", {"pair.png": _side_by_side("sylvie_blue_normal.png", "eileen_happy.png")})
    df, metrics = faces(ON, raw, tmp_path / "one")
    assert df.height == 0 and metrics["by_reason"] == {"several_faces": 1}
    df, _ = faces(FacesParams(enabled=True, one_face_only=False), raw, tmp_path / "any")
    assert df["faces_found"].to_list() == [2]


def test_threshold_rejects_low_confidence(tmp_path):
    raw = make_raw(tmp_path / "raw", {"giggle.png": (FIXTURES / "sylvie_blue_giggle.png").read_bytes()})
    df, metrics = faces(FacesParams(enabled=True, threshold=0.999), raw, tmp_path / "out")  # it scores ~0.96
    assert df.height == 0 and metrics["by_reason"] == {"low_confidence": 1}
    detail = pl.read_parquet(tmp_path / "out" / REJECTED)["detail"][0]
    assert "faces.threshold=0.999" in detail


def test_shard_input_gives_shard_output(tmp_path):
    names = ["sylvie_blue_normal.png", "sylvie_green_giggle.png", "lucy_happy.png"]
    raw = make_raw(tmp_path / "raw", {n: (FIXTURES / n).read_bytes() for n in names}, shard_size=2)
    df, _ = faces(ON, raw, tmp_path / "out")
    assert df.height == 3 and all(".tar/" in p for p in df["path"])
    assert len(list((tmp_path / "out/shards").glob("*.tar"))) == 2  # the input's shard size is kept
    for row in df.iter_rows(named=True):
        with Image.open(io.BytesIO(images.read_bytes(tmp_path / "out", row["path"]))) as im:
            assert im.size == (row["width"], row["height"])


def test_output_folder_must_not_overlap_the_input(tmp_path):
    raw = make_raw(tmp_path / "raw", {BACKGROUND: (FIXTURES / BACKGROUND).read_bytes()})
    with pytest.raises(ValueError, match="overlaps"):
        faces(ON, raw, raw)
    assert manifest.read(raw).height == 1


def test_pillow_12_is_refused_instead_of_finding_no_faces(tmp_path, monkeypatch):
    raw = make_raw(tmp_path / "raw", {BACKGROUND: (FIXTURES / BACKGROUND).read_bytes()})
    monkeypatch.setattr("PIL.__version__", "12.0.0")
    with pytest.raises(FacesError, match="Pillow 12"):
        faces(ON, raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the stage, disabled ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [None, 2])
def test_disabled_hard_links_and_keeps_the_manifest(tmp_path, shard_size):
    files = {n: (FIXTURES / n).read_bytes() for n in ("eileen_happy.png", "lucy_happy.png", BACKGROUND)}
    raw = make_raw(tmp_path / "raw", files, shard_size=shard_size)
    df, metrics = faces(FacesParams(enabled=False), raw, tmp_path / "out")
    before = manifest.read(raw)
    after = manifest.read(tmp_path / "out")
    assert after.equals(df) and after.select(before.columns).equals(before)
    assert after.select(list(FACE_SCHEMA)).null_count().row(0) == (3,) * len(FACE_SCHEMA)
    stored = {p.split(".tar/")[0] + ".tar" if ".tar/" in p else p for p in before["path"]}
    for rel in stored:
        assert (tmp_path / "out" / rel).stat().st_ino == (raw / rel).stat().st_ino
    assert pl.read_parquet(tmp_path / "out" / REJECTED).height == 0
    assert metrics["enabled"] is False and metrics["kept"] == 3 and metrics["mean_detect_s"] is None


# --- the DVC entry point ------------------------------------------------------------------------------------------


def _params(tmp_path: Path, **faces_section) -> Path:
    path = write_tiny_params(tmp_path, tmp_path)  # the embedded dataset path only has to exist
    params = yaml.safe_load(path.read_text())
    params["faces"].update(faces_section)
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _stage(tmp_path: Path, params: Path) -> subprocess.CompletedProcess:
    """stages/faces.py as DVC runs it (cwd: the repo root), on tmp_path/raw."""
    args = [
        "--params",
        params,
        "--raw",
        tmp_path / "raw",
        "--out",
        tmp_path / "out",
        "--metrics",
        tmp_path / "metrics/faces.json",
    ]
    return run_cmd([sys.executable, str(REPO / "stages/faces.py"), *map(str, args)], cwd=REPO)


def test_stage_script_crops_and_writes_metrics(tmp_path):
    make_raw(tmp_path / "raw", {n: (FIXTURES / n).read_bytes() for n in ("eileen_happy.png", BACKGROUND)})
    proc = _stage(tmp_path, _params(tmp_path, enabled=True))
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics/faces.json").read_text())
    assert metrics["enabled"] is True and metrics["kept"] == 1 and metrics["by_reason"] == {"no_face": 1}
    assert manifest.read(tmp_path / "out").height == 1


def test_stage_script_rejects_a_bad_threshold(tmp_path):
    make_raw(tmp_path / "raw", {BACKGROUND: (FIXTURES / BACKGROUND).read_bytes()})
    proc = _stage(tmp_path, _params(tmp_path, threshold=2))
    assert proc.returncode == 2
    assert "faces.threshold" in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "metrics").exists()
