"""The `acquire` stage: the committed emoji set (embedded source), an ImageFolder tree (folder source), and the CLI."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import AcquireParams, EmbeddedSource, FolderSource
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.io import md5_file

REPO = Path(__file__).resolve().parents[1]
EMOJI = REPO / "datasets" / "emoji"
ALL_CATEGORIES = ("Smileys & Emotion", "People & Body")
STYLES = ("noto", "twemoji", "openmoji", "emojione")


def index_rows() -> list[dict[str, str]]:
    with (EMOJI / "index.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def embedded(**kw) -> AcquireParams:
    return AcquireParams(source="embedded", embedded=EmbeddedSource(path=str(EMOJI), **kw))


def png(path: Path, color=(10, 20, 30), size=(16, 12), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


@pytest.fixture(scope="module")
def emoji_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("acq") / "raw"
    df = acquire(embedded(categories=ALL_CATEGORIES), REPO, out)
    return df, out


# ---------------------------------------------------------------------------------------------------------- embedded


def test_embedded_all_categories_932_rows(emoji_all) -> None:
    df, _ = emoji_all
    assert df.height == 932
    assert df["class_name"].n_unique() == 233
    assert df.group_by("class_name").len()["len"].unique().to_list() == [4]  # every class drawn by 4 artists
    assert sorted(df["group"].unique()) == sorted(STYLES)
    assert df["source"].unique().to_list() == ["embedded"]


def test_embedded_manifest_schema_and_ids(emoji_all) -> None:
    df, out = emoji_all
    on_disk = manifest.read(out)  # validates the schema
    assert on_disk.columns == list(manifest.SCHEMA)
    assert dict(on_disk.schema) == manifest.SCHEMA
    assert on_disk.equals(df.select(on_disk.columns))
    assert on_disk["split"].null_count() == 932
    names = sorted(df["class_name"].unique())
    assert dict(zip(df["class_name"], df["class_id"])) == {n: i for i, n in enumerate(names)}  # sorted, contiguous
    index = {f"{r['style']}-{r['codepoint']}": r for r in index_rows()}
    assert set(df["image_id"]) == set(index)
    for row in df.iter_rows(named=True):
        src = index[row["image_id"]]
        assert row["group"] == src["style"] and row["class_name"] == src["class_name"]
        assert row["path"] == src["file"]  # images/<style>/<codepoint>.png, relative to out
        assert (row["width"], row["height"]) == (64, 64)


def test_embedded_files_copied_with_md5(emoji_all) -> None:
    df, out = emoji_all
    for row in df.iter_rows(named=True):
        copied = out / row["path"]
        assert copied.is_file()
        assert md5_file(copied) == row["md5"] == md5_file(EMOJI / row["path"]), row["image_id"]
    assert len([p for p in (out / "images").rglob("*") if p.is_file()]) == 932


def test_embedded_category_filter(tmp_path: Path) -> None:
    rows = [r for r in index_rows() if r["category"] == "People & Body"]
    df = acquire(embedded(categories=("People & Body",)), REPO, tmp_path / "raw")
    assert df.height == len(rows) == 420
    assert set(df["class_name"]) == {r["class_name"] for r in rows}
    assert df["class_id"].max() == df["class_name"].n_unique() - 1 == 104


def test_embedded_style_filter(tmp_path: Path) -> None:
    df = acquire(embedded(categories=ALL_CATEGORIES, styles=("noto", "twemoji")), REPO, tmp_path / "raw")
    assert df.height == 466
    assert sorted(df["group"].unique()) == ["noto", "twemoji"]


@pytest.mark.parametrize(
    "kw,key,bad",
    [
        (dict(categories=("Smileyz",)), "acquire.embedded.categories", "Smileyz"),
        (dict(categories=("People & Body", "Smileyz")), "acquire.embedded.categories", "Smileyz"),  # among good ones
        (dict(categories=ALL_CATEGORIES, styles=("noto", "apple")), "acquire.embedded.styles", "apple"),
    ],
    ids=["only_unknown", "unknown_among_known", "unknown_style"],
)
def test_embedded_unknown_category_or_style_is_a_clear_error(tmp_path: Path, kw, key, bad) -> None:
    with pytest.raises(ValueError) as info:
        acquire(embedded(**kw), REPO, tmp_path / "raw")
    message = str(info.value)
    assert key in message and repr(bad) in message and "index.csv" in message
    assert not (tmp_path / "raw" / "manifest.parquet").exists()


def test_acquire_replaces_its_own_earlier_output(tmp_path: Path) -> None:
    """A folder acquire wrote before (its marker lists every entry) is replaced whole: the old images are gone. A file
    the project did not write (issue 23) stops the re-run instead (tests/test_data_safety.py)."""
    acquire(embedded(categories=("People & Body",), styles=("twemoji",)), REPO, tmp_path / "raw")
    old = tmp_path / "raw" / "images" / "twemoji"
    assert any(old.iterdir())
    df = acquire(embedded(categories=("People & Body",), styles=("noto",)), REPO, tmp_path / "raw")
    assert not old.exists()
    assert df.height == 105
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".raw")]  # no temporary sibling left behind


# ------------------------------------------------------------------------------------------------------------ folder


def make_tree(root: Path) -> None:
    png(root / "cat" / "b.png", (1, 2, 3), size=(20, 10))
    png(root / "cat" / "a.JPG", (4, 5, 6))  # upper-case extension (saved as JPEG)
    png(root / "cat" / "sub" / "c.png", (7, 8, 9), size=(5, 6))
    (root / "cat" / "notes.txt").write_text("not an image")
    png(root / "ant" / "x.webp", (9, 9, 9))
    (root / "ant" / "broken.png").write_bytes(b"not really a png")
    (root / "stray.png").write_bytes(b"")  # a file at the top level is no class


def test_folder_source(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    out = tmp_path / "raw"
    df = acquire(AcquireParams(source="folder", folder=FolderSource(path="src")), tmp_path, out)
    assert df["image_id"].to_list() == ["ant/broken.png", "ant/x.webp", "cat/a.JPG", "cat/b.png", "cat/sub/c.png"]
    assert df["path"].to_list() == [f"images/{i}" for i in df["image_id"]]
    assert df["group"].to_list() == df["image_id"].to_list()  # each image its own group
    assert df["class_name"].to_list() == ["ant", "ant", "cat", "cat", "cat"]
    assert df["class_id"].to_list() == [0, 0, 1, 1, 1]
    assert df["source"].unique().to_list() == ["folder"]
    sizes = dict(zip(df["image_id"], zip(df["width"], df["height"])))
    assert sizes["cat/b.png"] == (20, 10) and sizes["cat/sub/c.png"] == (5, 6)
    assert sizes["ant/broken.png"] == (None, None)  # kept for `clean` to quarantine with a reason
    for row in df.iter_rows(named=True):
        assert md5_file(out / row["path"]) == row["md5"] == md5_file(tmp_path / "src" / row["image_id"])
    manifest.read(out)


def test_folder_without_images(tmp_path: Path) -> None:
    (tmp_path / "src" / "empty_class").mkdir(parents=True)
    with pytest.raises(ValueError, match="acquire.folder.path: no images found under"):
        acquire(AcquireParams(source="folder", folder=FolderSource(path="src")), tmp_path, tmp_path / "raw")


@pytest.mark.parametrize("out", ["src", ".", "src/cat/raw"], ids=["same", "parent", "inside"])
def test_acquire_refuses_to_delete_its_source(tmp_path: Path, out: str) -> None:
    """acquire replaces its output: an output overlapping the source (or holding the project) is refused."""
    png(tmp_path / "src" / "cat" / "a.png")
    with pytest.raises(ValueError, match=r"overlaps the input acquire.folder.path|contains the project"):
        acquire(AcquireParams(source="folder", folder=FolderSource(path="src")), tmp_path, tmp_path / out)
    assert (tmp_path / "src" / "cat" / "a.png").is_file()


# --------------------------------------------------------------------------------------------------------------- CLI


def test_cli_acquire_folder_subprocess(tmp_path: Path) -> None:
    make_tree(tmp_path / "src")
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "acquire", "folder", "--path", "src", "--out", "Y"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "5 images, 2 classes" in res.stdout
    df = manifest.read(tmp_path / "Y" / "manifest.parquet")
    assert df.height == 5
    for rel in df["path"]:
        assert not Path(rel).is_absolute() and rel.startswith("images/")
        assert (tmp_path / "Y" / rel).is_file()


def test_cli_acquire_missing_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["acquire", "folder", "--path", "nope", "--out", "Y"]) == 2
    assert "--path: folder 'nope' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "Y").exists()


def test_cli_acquire_embedded_default_path(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)  # --path defaults to datasets/emoji, relative to the working directory
    out = tmp_path / "Y"
    assert cli.main(["acquire", "embedded", "--out", str(out)]) == 0
    assert manifest.read(out).height == 932  # EmbeddedSource defaults: both categories, all four styles
    assert "classes" in capsys.readouterr().out


def test_cli_acquire_folder_without_path(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # argparse: a required flag is missing
        cli.main(["acquire", "folder", "--out", "Y"])
    assert exc.value.code == 2
    assert "--path" in capsys.readouterr().err
    assert not (tmp_path / "Y").exists()
