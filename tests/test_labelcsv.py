"""The `csv` source (`class_id,dir` label CSVs over an image root), its shared label parsing, and the registry."""

from __future__ import annotations

import hashlib
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import CsvSource
from pipeline.data import labelcsv, manifest, registry
from pipeline.data.labelcsv import LabelFileError, from_csv, read_labels

# (split, class_id, dir) in release order; the test set holds a class-2 image of a new "artist" folder.
ROWS = [
    ("train", 0, "a/0.png"),
    ("train", 0, "a/1.png"),
    ("train", 1, "b/0.png"),
    ("train", 2, "c/0.png"),
    ("val", 0, "a/2.png"),
    ("val", 1, "b/1.png"),
    ("test", 1, "b/2.png"),
    ("test", 2, "x/c/1.png"),
]
NAMES = {0: "cat", 1: "dog", 2: "owl, snowy"}  # a comma inside a (quoted) name


def png(path: Path, color: tuple[int, int, int], size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_rows(path: Path, rows: list[tuple[int, str]], header: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["class_id,dir"] if header else []) + [f"{c},{d}" for c, d in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_dataset(base: Path, rows=ROWS, names: dict[int, str] | None = NAMES, images: bool = True) -> Path:
    """Images under base/, labels under base/labels/: val.csv has GLSim's header line, the others have none."""
    for i, (_, _, d) in enumerate(rows):
        if images:
            png(base / d, (40 * i % 256, 20, 200), (10 + i, 7 + i % 3))
    for split in ("train", "val", "test"):
        write_rows(base / "labels" / f"{split}.csv", [(c, d) for s, c, d in rows if s == split], header=split == "val")
    if names is not None:
        text = "".join(f'{i},"{n}"\n' if "," in n else f"{i},{n}\n" for i, n in names.items())
        (base / "labels" / labelcsv.CLASS_NAMES_FILE).write_text(text)
    return base


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def run_csv(base: Path, out: Path, **kw) -> pl.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    return from_csv(CsvSource(path=str(base), **kw), Path("/"), out)


# ----------------------------------------------------------------------------------------------------- csv source


def test_csv_rows_in_release_order_with_splits_and_names(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    df = run_csv(dataset, out)
    assert df["image_id"].to_list() == [d for _, _, d in ROWS]  # train, val (header skipped), test; file order
    assert df["split"].to_list() == [s for s, _, _ in ROWS]
    assert df["class_id"].to_list() == [c for _, c, _ in ROWS]
    assert df["class_name"].to_list() == [NAMES[c] for _, c, _ in ROWS]
    assert df["group"].to_list() == df["image_id"].to_list()  # no artist info: each image is its own group
    assert set(df["source"]) == {"csv"}
    on_disk = manifest.read(manifest.write(df, out))
    assert dict(on_disk.schema) == manifest.SCHEMA


def test_csv_copies_plain_files_keeping_dirs(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    df = run_csv(dataset, out)
    for i, row in enumerate(df.iter_rows(named=True)):
        assert row["path"] == f"images/{row['image_id']}"
        copied = (out / row["path"]).read_bytes()
        assert copied == (dataset / row["image_id"]).read_bytes()
        assert row["md5"] == hashlib.md5(copied).hexdigest()
        assert (row["width"], row["height"]) == (10 + i, 7 + i % 3)
    assert pl.read_parquet(out / labelcsv.MISSING).height == 0


def test_csv_default_class_names_without_file(tmp_path: Path) -> None:
    base = make_dataset(tmp_path / "ds", names=None)
    df = run_csv(base, tmp_path / "out")
    assert df["class_name"].to_list() == [f"class_{c}" for _, c, _ in ROWS]


def test_csv_separate_labels_folder_and_class_file(tmp_path: Path) -> None:
    base = make_dataset(tmp_path / "ds")
    (base / "labels").rename(tmp_path / "elsewhere")
    (tmp_path / "names.csv").write_text("id,name\n0,a\n1,b\n2,c\n")  # header accepted
    df = run_csv(base, tmp_path / "out", labels=str(tmp_path / "elsewhere"), class_names=str(tmp_path / "names.csv"))
    assert df["class_name"].to_list() == ["abc"[c] for _, c, _ in ROWS]


def test_csv_missing_class_file_given_explicitly(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        run_csv(dataset, tmp_path / "out", class_names=str(tmp_path / "nope.csv"))


def test_csv_missing_image_is_reported_not_fatal(dataset: Path, tmp_path: Path, capsys) -> None:
    (dataset / "b/1.png").unlink()
    out = tmp_path / "out"
    df = run_csv(dataset, out)
    assert "b/1.png" not in df["image_id"].to_list() and df.height == len(ROWS) - 1
    missing = pl.read_parquet(out / labelcsv.MISSING)
    assert missing.to_dicts() == [{"image_id": "b/1.png", "path": "b/1.png", "split": "val", "reason": "not found"}]
    assert "1 of 8 images missing" in capsys.readouterr().err


def test_csv_all_images_missing_is_an_error(tmp_path: Path) -> None:
    base = make_dataset(tmp_path / "ds", images=False)
    with pytest.raises(FileNotFoundError, match="none of the 8 images"):
        run_csv(base, tmp_path / "out")


def test_csv_registry_match_and_mismatch(tmp_path: Path, capsys) -> None:
    eight = [("train", c, f"{c}/0.png") for c in range(8)] + [("test", c, f"{c}/1.png") for c in range(8)]
    base = make_dataset(tmp_path / "ds", rows=eight, names=None)
    assert run_csv(base, tmp_path / "ok", dataset="ncfm").height == 16  # NCFM: 8 classes
    assert "trainval: expected 3,397 images, found 8" in capsys.readouterr().err  # sizes are only noted
    out = tmp_path / "bad"
    with pytest.raises(registry.DatasetMismatch, match=r"'cub'.*expected 200 classes, found 8"):
        run_csv(base, out, dataset="cub")
    assert not any(out.iterdir())  # checked before anything is copied


def test_csv_unknown_dataset_name_lists_keys(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'cubb'.*cub, nabirds"):
        run_csv(dataset, tmp_path / "out", dataset="cubb")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "../secret.png", "/etc/passwd", "a/../../x.png", "a\\b.png"])
def test_csv_unsafe_path_rejected_before_reading(tmp_path: Path, bad: str) -> None:
    base = make_dataset(tmp_path / "ds")
    png(tmp_path / "secret.png", (1, 2, 3), (4, 4))  # exists outside the root: must still never be read
    write_rows(base / "labels" / "test.csv", [(1, "b/2.png"), (2, bad)])
    out = tmp_path / "out"
    with pytest.raises(LabelFileError, match=r"test\.csv:2: unsafe image path"):
        run_csv(base, out)
    assert not any(out.iterdir())


# --------------------------------------------------------------------------------------------- label file errors


@pytest.mark.parametrize("line", ["abc,a/0.png", "0", "0,", "-1,a/0.png", "1.5,a/0.png", "0,a/0.png,1"])
def test_malformed_row_names_file_and_line(tmp_path: Path, line: str) -> None:
    labels = tmp_path / "labels"
    (labels / "train.csv").parent.mkdir(parents=True)
    (labels / "train.csv").write_text(f"0,a/0.png\n\n{line}\n")  # blank line 2 still counts
    with pytest.raises(LabelFileError, match=r"train\.csv:3: malformed row"):
        read_labels(labels, None)


def test_header_only_on_first_line(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    write_rows(labels / "train.csv", [(0, "a/0.png")], header=True)
    assert read_labels(labels, None)["dir"].to_list() == ["a/0.png"]
    (labels / "train.csv").write_text("0,a/0.png\nclass_id,dir\n")
    with pytest.raises(LabelFileError, match=r"train\.csv:2"):
        read_labels(labels, None)


def test_duplicate_path_names_both_rows(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    write_rows(labels / "train.csv", [(0, "a/0.png"), (1, "b/0.png")])
    write_rows(labels / "test.csv", [(0, "a/./0.png")])  # the same file, spelt differently
    message = r"test\.csv:1: duplicate image path 'a/0.png' \(already on .*train\.csv:1"
    with pytest.raises(LabelFileError, match=message):
        read_labels(labels, None)


def test_unknown_class_id_names_file_and_line(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    write_rows(labels / "val.csv", [(0, "a/0.png"), (7, "b/0.png")])
    (labels / "names.csv").write_text("0,cat\n1,dog\n")
    with pytest.raises(LabelFileError, match=r"val\.csv:2: class id 7 is not in .*names\.csv"):
        read_labels(labels, labels / "names.csv")


def test_duplicate_class_id_in_class_file(tmp_path: Path) -> None:
    labels = tmp_path / "labels"
    write_rows(labels / "val.csv", [(0, "a/0.png")])
    (labels / "names.csv").write_text("0,cat\n1,dog\n0,bird\n")
    with pytest.raises(LabelFileError, match=r"names\.csv:3: class id 0 already named on line 1"):
        read_labels(labels, labels / "names.csv")


def test_no_split_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train\.csv.*val\.csv.*test\.csv"):
        read_labels(tmp_path / "labels", None)


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_entries() -> None:
    assert registry.lookup("CUB").num_classes == 200
    assert registry.lookup("soy").key == "soylocal"  # GLSim's name
    daf = registry.lookup("daf")
    assert (daf.num_classes, daf.trainval, daf.test) == (3_263, 368_997, 94_440)
    assert {f"soyageingr{r}" for r in (1, 3, 4, 5, 6)} <= set(registry.keys())
    with pytest.raises(AttributeError):
        daf.num_classes = 1  # frozen


def test_registry_check_warns_when_not_strict(capsys) -> None:
    df = pl.DataFrame({"class_id": [0, 1], "split": ["train", "test"]})
    assert registry.check("pets", df, strict=False).key == "pets"
    assert "expected 37 classes, found 2" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_csv_writes_manifest(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli.main(["acquire", "csv", "--path", str(dataset), "--out", str(out)]) == 0
    assert manifest.read(out).height == len(ROWS)


def test_cli_csv_help_lists_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["acquire", "csv", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--path", "--labels", "--class-names", "--dataset", "--out"):
        assert flag in text


def test_cli_csv_bad_dataset_exit_2(dataset: Path, tmp_path: Path, capsys) -> None:
    code = cli.main(["acquire", "csv", "--path", str(dataset), "--out", str(tmp_path / "o"), "--dataset", "x"])
    assert code == 2 and "unknown dataset 'x'" in capsys.readouterr().err
