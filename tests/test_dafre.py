"""The `dafre` source on a release-shaped folder built from the REAL DAF:re label files (tests/fixtures/dafre-labels).

Creating 140k images would be too slow for the suite, so a deterministic subset of the real rows (every 470th,
about 300) gets real tiny JPEGs and the rest are missing: that checks the real size and format of the labels, the
missing-image report, and the tar shards at once. Expected values are computed here with the csv module, not with
the code under test.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import math
import shutil
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import DafreSource
from pipeline.data import dafre, images, labelcsv, manifest
from pipeline.data.labelcsv import LabelFileError

REPO = Path(__file__).resolve().parents[1]
VAL_ROWS, TEST_ROWS, CLASSES = 46_050, 94_440, 3_263
EVERY = 470  # subset of rows that get an image
SHARD = 64


def csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="") as f:
        return list(csv.reader(f))


def jpeg(path: Path, size: tuple[int, int], color=(200, 120, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, quality=60)
    return path


def size_of(i: int) -> tuple[int, int]:
    return 8 + i % 5, 6 + i % 3


def run_dafre(base: Path, out: Path, **kw) -> pl.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    return dafre.from_dafre(DafreSource(path=str(base), **kw), Path("/"), out)


def small_release(
    base: Path,
    splits: dict[str, list[tuple[int, str]]],
    header: bool = False,
    names: str = "0,morrigan_aensland\n1,uchiha_sasuke\n",
    folder: str = "faces",
) -> Path:
    """A hand-made release: the given label rows, an image for each, the given class-name file."""
    (base / "labels").mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = (["class_id,dir"] if header else []) + [f"{c},{d}" for c, d in rows]
        (base / "labels" / f"{split}.csv").write_text("\n".join(lines) + "\n")
        for i, (_, d) in enumerate(rows):
            if ".." not in d:
                jpeg(base / folder / d, size_of(i))
    if names is not None:
        (base / "labels" / labelcsv.CLASS_NAMES_FILE).write_text(names)
    return base


# ------------------------------------------------------------------------------------------ the real label files


@pytest.fixture(scope="module")
def real_release(tmp_path_factory, dafre_labels: Path) -> dict:
    """Release folder with the real val/test/class-name files (no train.csv, as offline) and ~300 real JPEGs."""
    labels = dafre_labels
    base = tmp_path_factory.mktemp("dafre") / "release"
    (base / "labels").mkdir(parents=True)
    for name in ("val.csv", "test.csv", labelcsv.CLASS_NAMES_FILE):
        shutil.copyfile(labels / name, base / "labels" / name)
    rows = [("val", *r) for r in csv_rows(labels / "val.csv")] + [("test", *r) for r in csv_rows(labels / "test.csv")]
    present = {}
    for i in range(0, len(rows), EVERY):
        split, class_id, d = rows[i]
        present[d] = (split, int(class_id), size_of(i), jpeg(base / "faces" / d, size_of(i)))
    out = base.parent / "out"
    df = run_dafre(base, out, shard_size=SHARD)
    manifest.write(df, out)
    names = {int(i): n for i, n in csv_rows(labels / labelcsv.CLASS_NAMES_FILE)}
    return {"base": base, "out": out, "df": df, "rows": rows, "present": present, "names": names}


def test_real_label_files_parse_to_full_size(dafre_labels: Path) -> None:
    """The real size and format: every row of the real val/test files in the label table, 3,263 classes."""
    labels = dafre_labels
    table = dafre.label_table(labels)
    counts = dict(table.group_by("split").len().iter_rows())
    assert counts == {"val": VAL_ROWS, "test": TEST_ROWS}
    assert table["class_id"].n_unique() == CLASSES
    assert table["split"].to_list() == ["val"] * VAL_ROWS + ["test"] * TEST_ROWS  # release order
    assert table["image_id"].n_unique() == VAL_ROWS + TEST_ROWS
    assert table.row(0, named=True) | {"file": None} == {
        "split": "val",
        "file": None,
        "line": 1,
        "class_id": 0,
        "class_name": "morrigan_aensland",
        "dir": "0933/194933.jpg",
        "post_id": 194933,
        "image_id": "dafre-194933",
        "group": "post-194933",
        "official_class_id": 0,
    }
    assert labelcsv.read_class_names(labels / labelcsv.CLASS_NAMES_FILE).height == CLASSES


def test_real_release_rows_and_missing_add_up(real_release: dict) -> None:
    df, out, present = real_release["df"], real_release["out"], real_release["present"]
    assert df.height == len(present) > 250
    missing = pl.read_parquet(out / labelcsv.MISSING)
    assert missing.columns == ["image_id", "path", "split", "reason"]
    assert missing.height + df.height == VAL_ROWS + TEST_ROWS
    assert set(missing["reason"]) == {"not found"}
    splits = pl.concat([df.select("split"), missing.select("split")])["split"].value_counts()
    assert dict(splits.iter_rows()) == {"val": VAL_ROWS, "test": TEST_ROWS}
    assert set(missing["path"]).isdisjoint(present)


def test_real_release_manifest_matches_label_rows(real_release: dict) -> None:
    df, present, names = real_release["df"], real_release["present"], real_release["names"]
    assert len(names) == CLASSES
    on_disk = manifest.read(real_release["out"])
    assert on_disk.equals(df)
    expected_order = [d for _, _, d in real_release["rows"] if d in present]
    assert [f"dafre-{Path(d).stem}" for d in expected_order] == df["image_id"].to_list()  # release order kept
    for row in df.iter_rows(named=True):
        d = row["path"].split("/", 2)[2]  # shards/NNNNN.tar/<dir>
        split, class_id, size, _ = present[d]
        assert (row["split"], row["class_id"], row["official_class_id"]) == (split, class_id, class_id)
        assert row["class_name"] == names[class_id]
        assert (row["width"], row["height"]) == size
        post = int(Path(d).stem)
        assert (row["post_id"], row["group"], row["source"]) == (post, f"post-{post}", "dafre")
    first = df.row(0, named=True)
    assert (first["class_id"], first["class_name"]) == (0, "morrigan_aensland")  # first val row is class 0


def test_real_release_tar_shards(real_release: dict) -> None:
    df, out, present = real_release["df"], real_release["out"], real_release["present"]
    shards = sorted((out / "shards").glob("*.tar"))
    assert len(shards) == math.ceil(df.height / SHARD)
    assert not list((out / "shards").glob("*.partial"))
    assert not (out / "images").exists()
    for row in df.iter_rows(named=True):
        data = images.read_bytes(out, row["path"])
        assert hashlib.md5(data).hexdigest() == row["md5"]
        assert data == present[row["path"].split("/", 2)[2]][3].read_bytes()


def test_registry_subset_only_warns(tmp_path: Path, capsys) -> None:
    base = small_release(tmp_path / "rel", {"test": [(0, "0291/1796291.jpg")]})
    assert run_dafre(base, tmp_path / "out").height == 1
    assert "expected 3,263 classes, found 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- hand-made releases


def test_glsim_header_copies_and_train_first(tmp_path: Path) -> None:
    base = small_release(
        tmp_path / "rel",
        {
            "test": [(1, "0001/1001.jpg")],
            "val": [(0, "0002/1002.jpg")],
            "train": [(1, "0003/1003.jpg"), (0, "0004/1004.jpg")],
        },
        header=True,
    )
    df = run_dafre(base, tmp_path / "out", shard_size=None)
    assert df["image_id"].to_list() == ["dafre-1003", "dafre-1004", "dafre-1002", "dafre-1001"]
    assert df["split"].to_list() == ["train", "train", "val", "test"]
    assert df["class_name"].to_list() == ["uchiha_sasuke", "morrigan_aensland", "morrigan_aensland", "uchiha_sasuke"]
    assert df["path"][0] == "images/0003/1003.jpg" and (tmp_path / "out" / df["path"][0]).is_file()  # plain files


def test_full_images_folder(tmp_path: Path) -> None:
    base = small_release(tmp_path / "rel", {"val": [(0, "0002/1002.jpg")]}, folder="fullMin256")
    with pytest.raises(FileNotFoundError, match=r"faces/\) .*faces does not exist"):
        run_dafre(base, tmp_path / "out")
    assert run_dafre(base, tmp_path / "out", images="fullMin256")["image_id"].to_list() == ["dafre-1002"]


def test_class_name_file_required(tmp_path: Path) -> None:
    base = small_release(tmp_path / "rel", {"val": [(0, "0002/1002.jpg")]}, names=None)
    with pytest.raises(FileNotFoundError, match=r"class-name file .*classid_classname\.csv does not exist"):
        run_dafre(base, tmp_path / "out")


def test_a_split_file_required(tmp_path: Path) -> None:
    base = small_release(tmp_path / "rel", {})
    (base / "faces").mkdir()
    with pytest.raises(FileNotFoundError, match=r"labels/train\.csv.*labels/val\.csv.*labels/test\.csv"):
        run_dafre(base, tmp_path / "out")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(0, "0002/1002.jpg"), (5, "0003/1003.jpg")], r"val\.csv:2: class id 5 is not in .*classid_classname\.csv"),
        ([(0, "0002/1002.jpg"), (1, "0002/1002.jpg")], r"val\.csv:2: duplicate image path '0002/1002.jpg'"),
        ([(0, "0002/1002.jpg"), (1, "0102/1002.jpg")], r"val\.csv:2: duplicate image id 'dafre-1002'"),
        ([(0, "0002/1002.jpg"), (1, "0002/abc.jpg")], r"val\.csv:2: '0002/abc.jpg' is not a DAF:re image path"),
        ([(0, "../../etc/passwd")], r"val\.csv:1: unsafe image path '../../etc/passwd'"),
    ],
)
def test_bad_label_rows_name_file_and_line(tmp_path: Path, rows, message: str) -> None:
    base = small_release(tmp_path / "rel", {"val": rows})
    (base / "faces").mkdir(exist_ok=True)
    out = tmp_path / "out"
    with pytest.raises(LabelFileError, match=message):
        run_dafre(base, out)
    assert not any(out.iterdir())  # rejected before any image is read or written


def test_malformed_row(tmp_path: Path) -> None:
    base = small_release(tmp_path / "rel", {"val": [(0, "0002/1002.jpg")]})
    (base / "labels" / "test.csv").write_text("0,0003/1003.jpg\n0;0004/1004.jpg\n")
    with pytest.raises(LabelFileError, match=r"test\.csv:2: malformed row '0;0004/1004.jpg'"):
        run_dafre(base, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------- CLI


def test_cli_dafre_writes_manifest(tmp_path: Path) -> None:
    base = small_release(tmp_path / "rel", {"val": [(0, "0002/1002.jpg"), (1, "0003/1003.jpg"), (1, "0004/1004.jpg")]})
    out = tmp_path / "out"
    assert cli.main(["acquire", "dafre", "--path", str(base), "--out", str(out), "--shard-size", "2"]) == 0
    df = manifest.read(out)
    assert df["image_id"].to_list() == ["dafre-1002", "dafre-1003", "dafre-1004"]
    assert len(list((out / "shards").glob("*.tar"))) == 2


def test_cli_dafre_help_lists_flags(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["acquire", "dafre", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--path", "--images", "faces", "fullMin256", "--shard-size", "--out"):
        assert flag in text


def test_cli_dafre_missing_path_exit_2(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-release"
    assert cli.main(["acquire", "dafre", "--path", str(missing), "--out", str(tmp_path / "out")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_section_only_given_keys() -> None:
    parser = argparse.ArgumentParser()
    dafre.add_cli_arguments(parser)
    assert dafre.section_from_cli(parser.parse_args(["--path", "p"])) == {"path": "p"}
    args = parser.parse_args(["--path", "p", "--images", "fullMin256", "--shard-size", "0"])
    assert dafre.section_from_cli(args) == {"path": "p", "images": "fullMin256", "shard_size": None}
    assert dafre.section_from_cli(parser.parse_args(["--path", "p", "--shard-size", "16"]))["shard_size"] == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "p", "--shard-size", "-3"])


# ------------------------------------------------------------------ snapshots of the dataset as GLSim lays it out


def test_glsim_layout_labels_beside_the_image_folder(tmp_path: Path) -> None:
    """GLSim's data/daf layout (its configs/datasets/dafb.yaml): train/val/test/train_val/classid_classname CSVs
    with headers next to fullMin256/. train_val.csv repeats train + val rows and must not be imported."""
    base = tmp_path / "DAFB"
    rows = {
        "train": [(0, "0545/676545.jpg"), (1, "0950/1390950.jpg")],
        "val": [(1, "0011/11.jpg")],
        "test": [(0, "0012/12.jpg")],
    }
    for split, items in rows.items():
        (base).mkdir(exist_ok=True)
        (base / f"{split}.csv").write_text("class_id,dir\n" + "".join(f"{c},{d}\n" for c, d in items))
        for i, (_, d) in enumerate(items):
            jpeg(base / "fullMin256" / d, size_of(i))
    (base / "train_val.csv").write_text(
        "class_id,dir\n" + "".join(f"{c},{d}\n" for c, d in rows["train"] + rows["val"])
    )
    (base / labelcsv.CLASS_NAMES_FILE).write_text("class_id,class_name\n0,morrigan_aensland\n1,uchiha_sasuke\n")
    df = run_dafre(base, tmp_path / "out", images="fullMin256", shard_size=None)
    assert df["image_id"].to_list() == ["dafre-676545", "dafre-1390950", "dafre-11", "dafre-12"]
    assert df["split"].to_list() == ["train", "train", "val", "test"]
    assert df["class_name"].to_list() == ["morrigan_aensland", "uchiha_sasuke", "uchiha_sasuke", "morrigan_aensland"]


def test_a_snapshot_of_the_packed_release_names_the_archives(tmp_path: Path) -> None:
    base = tmp_path / "snap"
    base.mkdir()
    for name in ("dafre_full.tar.gz", "labels.tar.gz"):
        (base / name).write_bytes(b"\x1f\x8b")
    with pytest.raises(
        FileNotFoundError,
        match=r"holds the release archives \['dafre_full.tar.gz', "
        r"'labels.tar.gz'\], not unpacked: run .*tar xzf dafre_full.tar.gz",
    ):
        run_dafre(base, tmp_path / "out", images="fullMin256")
