"""The `split` stage: DAF:re's per-class rule, seeded shuffling, group hold-out, and the guarantees checked."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from pydantic import ValidationError

from pipeline.config import SplitParams, SplitRatios
from pipeline.data import manifest
from pipeline.data.manifest import ManifestError
from pipeline.data.split import SplitError, by_group, check, per_class, per_class_counts, split

PER_CLASS = SplitParams(strategy="per_class")
STYLES = ("noto", "openmoji", "twemoji", "emojione")


# ----------------------------------------------------------------------------------------------------------- helpers


def dafre_rule(n: int) -> list[str]:
    """DAF:re's assignment of a class's n images, in order: first int(0.7 n) train, up to int(0.8 n) val, rest test."""
    t, v = int(0.7 * n), int(0.8 * n)
    return ["train"] * t + ["val"] * (v - t) + ["test"] * (n - v)


def frame(class_sizes: list[int], interleave: bool = False) -> pl.DataFrame:
    """A manifest with class c holding class_sizes[c] rows; rows of the classes interleaved if asked."""
    rows = []
    for c, n in enumerate(class_sizes):
        for i in range(n):
            rows.append(
                dict(
                    image_id=f"c{c}-{i:04d}",
                    path=f"images/c{c}/{i}.png",
                    class_id=c,
                    class_name=f"c{c}",
                    source="test",
                    group=STYLES[i % 4],
                    md5=f"{c}-{i}",
                    width=8,
                    height=8,
                    split=None,
                )
            )
    if interleave:
        rows.sort(key=lambda r: (int(r["image_id"].split("-")[1]), r["class_id"]))
    return manifest.validate(pl.DataFrame(rows, schema=manifest.SCHEMA), "test")


def splits_by_class(df: pl.DataFrame) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for cid, s in zip(df["class_id"], df["split"]):
        out.setdefault(cid, []).append(s)
    return out


def mismatches(sizes: list[int]) -> dict[int, tuple[list[str], list[str]]]:
    got = splits_by_class(per_class(frame(sizes), PER_CLASS, seed=0))
    return {n: (got[c], dafre_rule(n)) for c, n in enumerate(sizes) if got[c] != dafre_rule(n)}


def emoji_frame(n_classes: int = 5) -> pl.DataFrame:
    rows = [
        dict(
            image_id=f"{s}-{c}",
            path=f"images/{s}/{c}.png",
            class_id=c,
            class_name=f"e{c}",
            source="embedded",
            group=s,
            md5=f"{s}{c}",
            width=64,
            height=64,
            split=None,
        )
        for c in range(n_classes)
        for s in STYLES
    ]
    return pl.DataFrame(rows, schema=manifest.SCHEMA)


# ---------------------------------------------------------------------------------------------------------- per_class


def test_train_count_is_int_07n_for_every_size() -> None:
    sizes = list(range(1, 61))
    got = splits_by_class(per_class(frame(sizes), PER_CLASS, seed=0))
    for c, n in enumerate(sizes):
        assert got[c].count("train") == int(0.7 * n), n
        assert got[c][: int(0.7 * n)] == ["train"] * int(0.7 * n), n  # train first, in manifest order
        assert len(got[c]) == n


def test_per_class_matches_dafre_rule_where_float_sum_is_harmless() -> None:
    """Sizes whose 0.8 n is not an integer (so 0.7 + 0.1 != 0.8 in floating point changes nothing)."""
    sizes = [1, 2, 3, 4, 6, 7, 9, 11, 13, 23, 37, 49, 101]
    assert mismatches(sizes) == {}
    assert dafre_rule(7) == ["train"] * 4 + ["val"] + ["test"] * 2
    assert splits_by_class(per_class(frame([7]), PER_CLASS, seed=0))[0] == dafre_rule(7)


def test_per_class_matches_dafre_rule_for_1_to_60() -> None:
    """Includes n = 5, 10, 15, ...: 0.7 + 0.1 == 0.7999999999999999 must not move a val image to test."""
    assert mismatches(list(range(1, 61))) == {}


def test_per_class_matches_dafre_rule_for_dafre_like_sizes() -> None:
    assert mismatches([20, 21, 25, 33, 40, 57, 100, 250, 1019]) == {}


def test_per_class_uses_manifest_order_within_class() -> None:
    df = per_class(frame([7, 11], interleave=True), PER_CLASS, seed=0)
    assert df["image_id"].to_list() == frame([7, 11], interleave=True)["image_id"].to_list()  # rows not reordered
    for c, n in ((0, 7), (1, 11)):
        ids = df.filter(pl.col("class_id") == c)
        assert ids["split"].to_list() == dafre_rule(n)
        assert ids["image_id"].to_list() == [f"c{c}-{i:04d}" for i in range(n)]


def test_shuffle_is_seeded_and_changes_assignment() -> None:
    df = frame([30, 31, 47])
    cfg = SplitParams(strategy="per_class", shuffle=True)
    a = per_class(df, cfg, seed=42).sort("image_id")
    b = per_class(df, cfg, seed=42).sort("image_id")
    c = per_class(df, cfg, seed=7).sort("image_id")
    plain = per_class(df, PER_CLASS, seed=42).sort("image_id")
    assert a["split"].to_list() == b["split"].to_list()
    assert a["split"].to_list() != plain["split"].to_list()
    assert a["split"].to_list() != c["split"].to_list()
    for cid in range(3):  # the per-class counts do not depend on the order
        assert (
            a.filter(pl.col("class_id") == cid)["split"].value_counts().sort("split").rows()
            == plain.filter(pl.col("class_id") == cid)["split"].value_counts().sort("split").rows()
        )


def test_custom_ratios() -> None:
    cfg = SplitParams(strategy="per_class", ratios=SplitRatios(train=0.5, val=0.25, test=0.25))
    assert splits_by_class(per_class(frame([8]), cfg, seed=0))[0] == ["train"] * 4 + ["val"] * 2 + ["test"] * 2


def test_class_without_train_images_raises() -> None:
    df = frame([10, 1])  # int(0.7 * 1) == 0: the 1-image class has no train image
    with pytest.raises(SplitError, match="1 classes have no train images, e.g. \\['c1'\\]"):
        split(df, PER_CLASS, seed=0)


def test_split_counts_and_guarantees_per_class() -> None:
    out, counts = split(frame([7, 11, 13]), PER_CLASS, seed=0)
    assert counts["total"] == 31
    assert counts["images"] == {"train": 4 + 7 + 9, "val": 1 + 1 + 1, "test": 2 + 3 + 3}
    assert counts["classes"] == {"train": 3, "val": 3, "test": 3}
    assert out["image_id"].n_unique() == out.height == 31
    assert out["split"].is_in(manifest.SPLITS).all()


# -------------------------------------------------------------------------------------------------------------- group


def test_group_split_holds_out_whole_groups() -> None:
    cfg = SplitParams()  # strategy group, test twemoji, val emojione
    out, counts = split(emoji_frame(5), cfg, seed=0)
    assignment = {g: sorted(set(out.filter(pl.col("group") == g)["split"])) for g in STYLES}
    assert assignment == {"noto": ["train"], "openmoji": ["train"], "twemoji": ["test"], "emojione": ["val"]}
    assert counts["images"] == {"train": 10, "val": 5, "test": 5}
    assert counts["classes"] == {"train": 5, "val": 5, "test": 5}


def test_group_split_several_test_groups_no_val() -> None:
    cfg = SplitParams(test_groups=("twemoji", "openmoji"), val_groups=())
    out, counts = split(emoji_frame(3), cfg, seed=0)
    assert counts["images"] == {"train": 6, "val": 0, "test": 6}
    assert set(out.filter(pl.col("split") == "test")["group"]) == {"twemoji", "openmoji"}


def test_group_split_other_column() -> None:
    df = emoji_frame(4).with_columns((pl.col("class_id") % 2).cast(pl.String).alias("post"))
    out = by_group(df, SplitParams(group_column="post", test_groups=("1",), val_groups=()))
    assert out.filter(pl.col("post") == "1")["split"].unique().to_list() == ["test"]
    assert out.filter(pl.col("post") == "0")["split"].unique().to_list() == ["train"]


def test_unknown_groups_named() -> None:
    cfg = SplitParams(test_groups=("twemoji", "tweemoji"), val_groups=("emojone",))
    with pytest.raises(SplitError) as info:
        split(emoji_frame(3), cfg, seed=0)
    message = str(info.value)
    assert "groups ['emojone', 'tweemoji'] are not in column 'group'" in message
    assert "'twemoji'" in message  # listed among the present groups


def test_missing_group_column_named() -> None:
    with pytest.raises(SplitError, match="split.group_column: column 'artist' is not in the manifest"):
        split(emoji_frame(3), SplitParams(group_column="artist", test_groups=("x",), val_groups=()), seed=0)


def test_group_split_class_only_in_test_group_raises() -> None:
    df = pl.concat(
        [
            emoji_frame(3),
            pl.DataFrame(
                [
                    dict(
                        image_id="twemoji-99",
                        path="images/twemoji/99.png",
                        class_id=99,
                        class_name="only-twemoji",
                        source="embedded",
                        group="twemoji",
                        md5="t99",
                        width=64,
                        height=64,
                        split=None,
                    )
                ],
                schema=manifest.SCHEMA,
            ),
        ]
    )
    with pytest.raises(SplitError, match="1 classes have no train images, e.g. \\['only-twemoji'\\]"):
        split(df, SplitParams(), seed=0)


# --------------------------------------------------------------------------------------------------------- guarantees


def test_check_rejects_broken_splits() -> None:
    good, _ = split(emoji_frame(3), SplitParams(), seed=0)
    check(good, SplitParams())  # control: no error

    with pytest.raises(SplitError, match="some images have no split"):
        check(
            good.with_columns(
                pl.when(pl.col("image_id") == "noto-0").then(None).otherwise(pl.col("split")).alias("split")
            ),
            SplitParams(),
        )
    straddle = good.with_columns(
        pl.when(pl.col("image_id") == "twemoji-1").then(pl.lit("train")).otherwise(pl.col("split")).alias("split")
    )
    with pytest.raises(SplitError, match="groups in more than one split: \\['twemoji'\\]"):
        check(straddle, SplitParams())
    with pytest.raises(ManifestError, match="split must be one of"):
        check(good.with_columns(pl.lit("holdout").alias("split")), SplitParams())
    with pytest.raises(ManifestError, match="image_id is not unique"):
        check(pl.concat([good, good.head(1)]), SplitParams())


def test_every_image_in_exactly_one_split() -> None:
    for df, cfg in (
        (frame([23, 40, 9]), PER_CLASS),
        (emoji_frame(6), SplitParams()),
        (frame([23, 40, 9]), SplitParams(strategy="per_class", shuffle=True)),
    ):
        out, counts = split(df, cfg, seed=3)
        assert sorted(out["image_id"]) == sorted(df["image_id"])
        assert out["image_id"].n_unique() == df.height
        assert sum(counts["images"].values()) == df.height
        per_split = [set(out.filter(pl.col("split") == s)["image_id"]) for s in manifest.SPLITS]
        assert not (per_split[0] & per_split[1] or per_split[0] & per_split[2] or per_split[1] & per_split[2])


# ------------------------------------------------------------------------------------ DAF:re release reproduction


def rule_counts(n: int) -> tuple[int, int]:
    """(val, test) sizes of a class of n under DAF:re's rule, with its float arithmetic."""
    return int(0.8 * n) - int(0.7 * n), n - int(0.8 * n)


def smallest_n(val: int, test: int) -> int | None:
    """Smallest class size whose rule gives exactly (val, test); test = n - int(0.8 n) pins n to about 5 * test."""
    return next((n for n in range(max(1, 5 * test - 10), 5 * test + 11) if rule_counts(n) == (val, test)), None)


def release_like_manifest(val: pl.DataFrame, test: pl.DataFrame) -> tuple[pl.DataFrame, set[int]]:
    """Per class, in class order: int(0.7 n) synthetic train rows, the release's val rows, then its test rows.

    n is the smallest size that reproduces the class's val and test counts. For some classes no n does: the
    release's val has exactly one row fewer than the rule gives for every n that matches the test count (one val
    image lost after splitting, presumably). For those, the nearest rule-consistent order is used: the smallest n
    with rule counts (val + 1, test), with one placeholder row at the end of the val block. Returns the manifest
    and the set of such classes.
    """
    vc, tc = (dict(f.group_by("class_id").len().iter_rows()) for f in (val, test))
    by_class = {
        name: dict(f.group_by("class_id", maintain_order=True).agg("dir").iter_rows())
        for name, f in (("val", val), ("test", test))
    }
    ids, classes, padded = [], [], set()
    for c in sorted(vc):
        n = smallest_n(vc[c], tc[c])
        placeholder = []
        if n is None:
            n = smallest_n(vc[c] + 1, tc[c])
            assert n is not None, f"class {c}: no rule-consistent size for val {vc[c]} (+1), test {tc[c]}"
            placeholder = [f"placeholder/{c}.jpg"]
            padded.add(c)
        train = [f"train/{c}/{k}.jpg" for k in range(int(0.7 * n))]
        block = train + by_class["val"][c] + placeholder + by_class["test"][c]
        assert len(block) == n
        ids += block
        classes += [c] * n
    df = pl.DataFrame({"image_id": ids, "path": ids, "class_id": classes}).with_columns(
        pl.col("class_id").cast(pl.Int64),
        pl.col("class_id").cast(pl.String).alias("class_name"),
        pl.lit("dafre").alias("source"),
        pl.col("image_id").alias("group"),
        pl.col("image_id").alias("md5"),
        pl.lit(None, pl.Int64).alias("width"),
        pl.lit(None, pl.Int64).alias("height"),
        pl.lit(None, pl.String).alias("split"),
    )
    return manifest.validate(df.select(list(manifest.SCHEMA)), "release-like"), padded


def test_per_class_reproduces_dafre_release_val_and_test(dafre_labels: Path) -> None:
    """Done-when: per_class on a manifest ordered like the release gives its val.csv and test.csv row for row.

    Exactly, for all 94,440 test rows and, among val rows, for the 2,954 classes whose counts the rule can produce
    (43,125 of 46,050 val rows). For the other 309 classes (2,925 val rows) the release's val is one row short of
    anything the rule gives; there the release rows equal ours minus the one placeholder per class, in order.
    """

    def read(name: str) -> pl.DataFrame:
        schema = {"class_id": pl.Int64, "dir": pl.String}
        return pl.read_csv(dafre_labels / name, has_header=False, new_columns=list(schema), schema_overrides=schema)

    val, test = read("val.csv"), read("test.csv")
    assert (val.height, test.height) == (46_050, 94_440)
    df, padded = release_like_manifest(val, test)
    out, counts = split(df, PER_CLASS, seed=0)
    assert len(padded) == 309 and counts["classes"] == {"train": 3263, "val": 3263, "test": 3263}

    def rows(split_name: str) -> pl.DataFrame:
        return out.filter(pl.col("split") == split_name).select("class_id", pl.col("path").alias("dir"))

    placeholder = pl.col("dir").str.starts_with("placeholder/")
    assert rows("test").equals(test)  # all 94,440 rows, same order
    assert rows("val").filter(placeholder).height == 309  # every placeholder landed in val, as the rule says
    assert rows("val").filter(~placeholder).equals(val)  # 46,050 rows, same order
    solvable = pl.col("class_id").is_in(sorted(padded)).not_()
    exact = rows("val").filter(solvable)
    assert exact.equals(val.filter(solvable)) and exact.height == 43_125
    assert rows("test").filter(solvable).height == 87_663


# ---------------------------------------------------------------------------------------------------------- official


def test_official_keeps_the_source_split() -> None:
    df = frame([10, 10]).with_columns(
        pl.when(pl.int_range(pl.len()) % 5 == 0)
        .then(pl.lit("test"))
        .when(pl.int_range(pl.len()) % 5 == 1)
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
        .alias("split")
    )
    out, counts = split(df, SplitParams(strategy="official"), seed=0)
    assert out["split"].to_list() == df["split"].to_list()
    assert counts["images"] == {"train": 12, "val": 4, "test": 4} and counts["dup_group_moves"] == 0


def test_official_without_source_split_is_a_clear_error() -> None:
    with pytest.raises(SplitError, match="split.strategy 'official': 20 of 20 images have no split from their source"):
        split(frame([10, 10]), SplitParams(strategy="official"), seed=0)


# ------------------------------------------------------------------------------------------------ group by ratio


def test_group_by_ratio_holds_out_whole_groups_with_seed() -> None:
    df = frame([200, 180, 150]).with_columns(
        (pl.col("image_id").str.extract(r"-(\d+)$").cast(pl.Int64) // 3).cast(pl.String).alias("post")
    )
    cfg = SplitParams(group_column="post", group_assign="ratio", test_groups=(), val_groups=())
    a, counts = split(df, cfg, seed=1)
    b, _ = split(df, cfg, seed=1)
    c, _ = split(df, cfg, seed=2)
    assert a["split"].to_list() == b["split"].to_list() != c["split"].to_list()
    assert a.group_by("post").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height == 0
    assert abs(counts["images"]["test"] / df.height - 0.2) < 0.02  # within about one group of the ratio
    assert abs(counts["images"]["val"] / df.height - 0.1) < 0.02


def test_listed_groups_required_only_when_listing() -> None:
    with pytest.raises(ValidationError, match="at least one group"):
        SplitParams(test_groups=())
    SplitParams(group_assign="ratio", test_groups=())  # fine: ratio mode does not read the lists


# ------------------------------------------------------------------------------------- near-duplicate groups whole


def with_dup_groups(df: pl.DataFrame, groups: dict[str, str]) -> pl.DataFrame:
    """dup_group as clean writes it: the group's first image id, or the image's own id."""
    return df.with_columns(pl.col("image_id").replace(groups).alias("dup_group"))


def test_per_class_keeps_near_duplicate_groups_in_one_split() -> None:
    # class 0 (10 rows): rows 0-6 train, 7 val, 8-9 test; c0-0009 (test) is a near-duplicate of c0-0001 (train).
    # class 1 (10 rows): c1-0008 (test) and c1-0007 (val) form a group: the group follows c1-0007, its first row.
    df = with_dup_groups(frame([10, 10]), {"c0-0009": "c0-0001", "c1-0008": "c1-0007"})
    out, counts = split(df, PER_CLASS, seed=0)
    got = dict(zip(out["image_id"], out["split"]))
    assert (got["c0-0001"], got["c0-0009"]) == ("train", "train")
    assert (got["c1-0007"], got["c1-0008"]) == ("val", "val")
    assert counts["dup_group_moves"] == 2
    assert out.group_by("dup_group").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height == 0


def test_singleton_dup_groups_change_nothing() -> None:
    df = frame([23, 40, 9])
    plain, _ = split(df, PER_CLASS, seed=0)
    grouped, counts = split(df.with_columns(pl.col("image_id").alias("dup_group")), PER_CLASS, seed=0)
    assert grouped["split"].to_list() == plain["split"].to_list() and counts["dup_group_moves"] == 0


def test_group_split_moves_cross_artist_near_duplicates_and_checks() -> None:
    # twemoji-1 (test artist) is a near-duplicate of noto-1 (train artist, earlier in the manifest).
    df = with_dup_groups(emoji_frame(3), {"twemoji-1": "noto-1"})
    out, counts = split(df, SplitParams(), seed=0)
    got = dict(zip(out["image_id"], out["split"]))
    assert got["twemoji-1"] == got["noto-1"] == "train" and counts["dup_group_moves"] == 1
    assert counts["images"] == {"train": 7, "val": 3, "test": 2}


def test_check_rejects_straddling_near_duplicate_group() -> None:
    good, _ = split(with_dup_groups(frame([10]), {"c0-0009": "c0-0001"}), PER_CLASS, seed=0)
    broken = good.with_columns(
        pl.when(pl.col("image_id") == "c0-0009").then(pl.lit("test")).otherwise(pl.col("split")).alias("split")
    )
    with pytest.raises(SplitError, match=r"near-duplicate groups in more than one split: \['c0-0001'\]"):
        check(broken, PER_CLASS)


def test_check_rejects_same_file_or_bytes_in_two_splits() -> None:
    good, _ = split(frame([10]), PER_CLASS, seed=0)
    same_file = good.with_columns(
        pl.when(pl.col("image_id") == "c0-0009").then(pl.lit("images/c0/0.png")).otherwise(pl.col("path")).alias("path")
    )
    with pytest.raises(SplitError, match=r"files in more than one split: \['images/c0/0.png'\]"):
        check(same_file, PER_CLASS)
    same_md5 = good.with_columns(
        pl.when(pl.col("image_id") == "c0-0009").then(pl.lit("0-0")).otherwise(pl.col("md5")).alias("md5")
    )
    with pytest.raises(SplitError, match=r"images with the same md5 in more than one split: \['0-0'\]"):
        check(same_md5, PER_CLASS)


# ---------------------------------------------------------------------------------------------- outputs and columns


def test_per_class_counts_table() -> None:
    out, _ = split(frame([7, 11]), PER_CLASS, seed=0)
    table = per_class_counts(out)
    assert table.columns == ["class_id", "class_name", "train", "val", "test", "total"]
    assert table.rows() == [(0, "c0", 4, 1, 2, 7), (1, "c1", 7, 1, 3, 11)]


def test_extra_columns_pass_through_and_shuffle_keeps_row_order() -> None:
    df = frame([30, 31]).with_columns(pl.int_range(pl.len()).alias("post_id"), pl.lit("s").alias("rating"))
    out, _ = split(df, SplitParams(strategy="per_class", shuffle=True), seed=5)
    assert out.columns == df.columns
    assert out.drop("split").equals(df.drop("split"))


def test_split_stage_writes_per_class_csv(tmp_path: Path, monkeypatch) -> None:
    import runpy
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["acquire"]["embedded"]["path"] = str(repo / "datasets" / "emoji")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    manifest.write(emoji_frame(4), tmp_path / "clean")
    argv = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--clean",
        str(tmp_path / "clean"),
        "--out",
        str(tmp_path / "split" / "manifest.parquet"),
        "--metrics",
        str(tmp_path / "split.json"),
        "--per-class",
        str(tmp_path / "plots" / "split_counts.csv"),
    ]
    monkeypatch.setattr(sys, "argv", ["stages/split.py", *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(repo / "stages" / "split.py"), run_name="__main__")
    assert info.value.code == 0
    table = pl.read_csv(tmp_path / "plots" / "split_counts.csv")
    assert table.columns == ["class_id", "class_name", "train", "val", "test", "total"]
    assert table.rows()[0] == (0, "e0", 2, 1, 1, 4) and table.height == 4
