"""Issue 15 point 0: acquire never deletes what the project did not write, never reads outside its source, and a
failing import leaves the previous output untouched."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline.config import AcquireParams, CleanParams, CsvSource, FolderSource
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean, decode
from pipeline.outdir import MARKER, OutputFolderError


def png(path: Path, color=(10, 20, 30), size=(16, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def folder(path: str = "src") -> AcquireParams:
    return AcquireParams(source="folder", folder=FolderSource(path=path))


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# --- the output folder -------------------------------------------------------------------------------------------


def test_out_holding_an_unrelated_file_is_refused_and_the_file_survives(tmp_path: Path) -> None:
    png(tmp_path / "src" / "cat" / "a.png")
    keep = tmp_path / "mine" / "thesis.tex"
    keep.parent.mkdir()
    keep.write_text("years of work")
    with pytest.raises(OutputFolderError, match=r"mine is not empty and was not written by this project"):
        acquire(folder(), tmp_path, tmp_path / "mine")
    assert keep.read_text() == "years of work"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.tex"]


def test_cli_out_dot_in_a_clone_refuses_and_deletes_nothing(tmp_path: Path) -> None:
    """`acquire --out .` used to rmtree the whole clone, .git included (exit 0)."""
    png(tmp_path / "src" / "cat" / "a.png")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "params.yaml").write_text("base: {seed: 1}\n")
    before = tree(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "acquire", "folder", "--path", "src", "--out", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "contains the project" in res.stderr or "overlaps the input" in res.stderr
    assert tree(tmp_path) == before


def test_out_that_contains_the_project_is_refused(tmp_path: Path) -> None:
    project = tmp_path / "proj"
    png(project / "src" / "cat" / "a.png")
    with pytest.raises(OutputFolderError, match="contains the project"):
        acquire(folder(), project, tmp_path)
    assert (project / "src" / "cat" / "a.png").is_file()


def test_a_symlinked_out_is_refused(tmp_path: Path) -> None:
    png(tmp_path / "src" / "cat" / "a.png")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "raw").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputFolderError, match="is not a folder"):
        acquire(folder(), tmp_path, tmp_path / "raw")


def test_empty_or_new_out_is_accepted_and_marked(tmp_path: Path) -> None:
    png(tmp_path / "src" / "cat" / "a.png")
    (tmp_path / "empty").mkdir()
    for out in ("empty", "new/raw"):
        df = acquire(folder(), tmp_path, tmp_path / out)
        assert df.height == 1 and (tmp_path / out / MARKER).is_file()


def _csv_source(tmp_path: Path, rows: str) -> AcquireParams:
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", (200, 0, 0))
    labels = tmp_path / "labels"
    labels.mkdir(exist_ok=True)
    (labels / "train.csv").write_text(rows)
    return AcquireParams(source="csv", csv=CsvSource(path="imgs", labels="labels"))


def test_failing_import_leaves_the_previous_output_untouched(tmp_path: Path) -> None:
    cfg = _csv_source(tmp_path, "0,a.png\n1,b.png\n")
    acquire(cfg, tmp_path, tmp_path / "raw")
    before = tree(tmp_path / "raw")
    assert "manifest.parquet" in before
    (tmp_path / "labels" / "train.csv").write_text("0,a.png\nnot a row\n")  # a bad label CSV
    with pytest.raises(ValueError, match="malformed row"):
        acquire(cfg, tmp_path, tmp_path / "raw")
    assert tree(tmp_path / "raw") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs", "labels", "raw"]  # no temporary folder left


# --- symlinks, hidden folders ----------------------------------------------------------------------------------------


def test_folder_source_never_follows_links_out_of_or_back_into_the_root(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png(src / "cat" / "a.png")
    png(src / "dog" / "b.png", (1, 2, 3))
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2")
    png(tmp_path / "outside" / "o.png", (5, 5, 5))
    (src / "cat" / "x.jpg").symlink_to(secret)  # a file link out of the root
    (src / "linked_class").symlink_to(tmp_path / "outside", target_is_directory=True)  # a folder link out
    (src / "root_link").symlink_to(src, target_is_directory=True)  # a link back to the root
    (src / "cat" / "inner.png").symlink_to(src / "dog" / "b.png")  # inside the root: allowed
    png(src / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    png(src / ".hidden_class" / "h.png")
    df = acquire(folder(), tmp_path, tmp_path / "raw")
    assert sorted(df["path"].to_list()) == ["images/cat/a.png", "images/cat/inner.png", "images/dog/b.png"]
    assert sorted(df["class_name"].unique().to_list()) == ["cat", "dog"]
    skipped = dict(pl.read_parquet(tmp_path / "raw" / "skipped.parquet").iter_rows())
    assert skipped["cat/x.jpg"] == "link to a file outside the source root"
    assert skipped["linked_class"].startswith("symlinked folder")
    assert skipped["root_link"].startswith("symlinked folder")
    assert skipped["cat/.ipynb_checkpoints"] == "hidden folder"
    for p in (tmp_path / "raw").rglob("*"):
        assert b"hunter2" not in (p.read_bytes() if p.is_file() else b"")


def test_csv_source_never_reads_through_a_link_out_of_the_root(tmp_path: Path) -> None:
    cfg = _csv_source(tmp_path, "0,a.png\n1,b.png\n1,x.jpg\n")
    (tmp_path / "secret.txt").write_text("password=hunter2")
    (tmp_path / "imgs" / "x.jpg").symlink_to(tmp_path / "secret.txt")
    df = acquire(cfg, tmp_path, tmp_path / "raw")
    assert df.height == 2
    missing = pl.read_parquet(tmp_path / "raw" / "missing.parquet")
    assert missing.select("path", "reason").rows() == [("x.jpg", "links outside the image root (not read)")]
    assert all(b"hunter2" not in p.read_bytes() for p in (tmp_path / "raw").rglob("*") if p.is_file())


def test_quarantine_never_quotes_file_bytes() -> None:
    from pipeline.data.clean import Rejected

    with pytest.raises(Rejected) as exc:
        decode(b"password=hunter2 and more text", CleanParams())
    assert exc.value.reason == "not_an_image"
    assert "hunter2" not in exc.value.detail and "password" not in exc.value.detail


# --- EXIF orientation -----------------------------------------------------------------------------------------------


def _sideways_jpeg() -> bytes:
    """A 40x20 (landscape) picture stored rotated as 20x40 with Orientation=6 (rotate 90 deg clockwise to view)."""
    upright = Image.new("RGB", (40, 20), (255, 255, 255))
    upright.paste((255, 0, 0), (0, 0, 10, 20))  # red band on the left of the upright picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif, quality=95)
    return buf.getvalue()


def test_clean_applies_exif_orientation_and_records_the_upright_size(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "images" / "phone.jpg").write_bytes(_sideways_jpeg())
    png(raw / "images" / "plain.png")
    df = pl.DataFrame(
        {
            "image_id": ["phone", "plain"],
            "path": ["images/phone.jpg", "images/plain.png"],
            "class_id": [0, 0],
            "class_name": ["c", "c"],
            "source": ["t", "t"],
            "group": ["1", "2"],
            "md5": [None, None],
            "width": [None, None],
            "height": [None, None],
            "split": [None, None],
        },
        schema=manifest.SCHEMA,
    )
    manifest.write(df, raw)
    kept, _, _ = clean(CleanParams(min_per_class=1), raw, tmp_path / "clean")
    row = kept.filter(pl.col("image_id") == "phone").row(0, named=True)
    assert (row["width"], row["height"]) == (40, 20)
    with Image.open(tmp_path / "clean" / row["path"]) as im:
        assert im.size == (40, 20)
        r, g, b = im.convert("RGB").getpixel((3, 10))
        assert r > 200 and g < 60  # the red band is on the left, as a viewer shows it


# --- issue 23: loops, images outside a class, foreign files, messages ------------------------------------------------


def _loops(folder: Path) -> None:
    """`a.png -> b.png -> a.png` and `self.png -> self.png`: links that never resolve."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    (folder / "self.png").symlink_to("self.png")


def test_symlink_loops_in_a_folder_source_are_skipped_with_a_reason(tmp_path: Path) -> None:
    """Issue 23 case 3: a loop crashed acquire with `RuntimeError: Symlink loop` (a traceback, exit 1)."""
    png(tmp_path / "src" / "cat" / "ok.png")
    _loops(tmp_path / "src" / "cat")
    df = acquire(folder(), tmp_path, tmp_path / "raw")
    assert df["path"].to_list() == ["images/cat/ok.png"]
    skipped = dict(pl.read_parquet(tmp_path / "raw" / "skipped.parquet").iter_rows())
    assert {k: v.split(" (")[0] for k, v in skipped.items()} == {
        "cat/a.png": "symlink loop",
        "cat/b.png": "symlink loop",
        "cat/self.png": "symlink loop",
    }


def test_symlink_loops_in_a_csv_source_are_listed_as_missing(tmp_path: Path) -> None:
    cfg = _csv_source(tmp_path, "0,a.png\n1,b.png\n0,loop/a.png\n1,loop/self.png\n")
    _loops(tmp_path / "imgs" / "loop")
    df = acquire(cfg, tmp_path, tmp_path / "raw")
    assert sorted(df["image_id"].to_list()) == ["a.png", "b.png"]
    missing = dict(pl.read_parquet(tmp_path / "raw" / "missing.parquet").select("path", "reason").iter_rows())
    assert {k: v.split(" (")[0] for k, v in missing.items()} == {
        "loop/a.png": "symlink loop",
        "loop/self.png": "symlink loop",
    }


def test_an_image_directly_in_the_root_is_listed_as_skipped(tmp_path: Path) -> None:
    """Issue 23 case 7: it was ignored silently."""
    png(tmp_path / "src" / "cat" / "a.png")
    png(tmp_path / "src" / "stray.png")
    df = acquire(folder(), tmp_path, tmp_path / "raw")
    assert df.height == 1
    skipped = dict(pl.read_parquet(tmp_path / "raw" / "skipped.parquet").iter_rows())
    assert list(skipped) == ["stray.png"] and "belongs to no <class>/ folder" in skipped["stray.png"]


def test_a_rerun_refuses_to_replace_files_the_user_added_to_the_output(tmp_path: Path) -> None:
    """Issue 23 case 5: acquire into R, add R/mynotes.txt and R/myresults/, acquire again: both were deleted."""
    png(tmp_path / "src" / "cat" / "a.png")
    out = tmp_path / "R"
    acquire(folder(), tmp_path, out)
    acquire(folder(), tmp_path, out)  # the project's own output alone is replaced without a word
    (out / "mynotes.txt").write_text("my notes")
    (out / "myresults").mkdir()
    (out / "myresults" / "table.csv").write_text("a,b\n")
    (out / "images" / "cat" / "mine.txt").write_text("inside an output subfolder")
    before = tree(out)
    with pytest.raises(OutputFolderError) as info:
        acquire(folder(), tmp_path, out)
    message = str(info.value)
    assert "3 entries the project did not write" in message
    assert "mynotes.txt" in message and "myresults/" in message and "images/cat/mine.txt" in message
    assert "myresults/table.csv" not in message  # the folder is named once, not every file in it
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R", "src"]  # no temporary folder left


def test_csv_missing_file_messages_name_no_temporary_folder(tmp_path: Path, capsys) -> None:
    """Issue 23 case 7: the message named `.out.partial-XXXX/missing.parquet`, gone once the import ended."""
    cfg = _csv_source(tmp_path, "0,a.png\n1,gone.png\n")
    acquire(cfg, tmp_path, tmp_path / "raw")
    err = capsys.readouterr().err
    assert "1 of 2 images missing" in err and "missing.parquet" in err and ".partial-" not in err
    (tmp_path / "labels" / "train.csv").write_text("0,gone.png\n1,lost.png\n")
    with pytest.raises(FileNotFoundError) as info:
        acquire(cfg, tmp_path, tmp_path / "raw")
    assert "none of the 2 images" in str(info.value) and ".partial-" not in str(info.value)
    assert "gone.png (not found)" in str(info.value)


def test_cli_path_that_is_a_file_says_so(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 23 case 7: `--path /etc/hostname` said the folder "does not exist"."""
    from pipeline import cli

    (tmp_path / "hostname").write_text("box\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["acquire", "folder", "--path", str(tmp_path / "hostname"), "--out", "R"]) == 2
    assert f"--path: '{tmp_path / 'hostname'}' is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "R").exists()
