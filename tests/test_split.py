"""The `split` stage: DAF:re's per-class rule, seeded shuffling, group hold-out, and the guarantees checked."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.config import SplitParams, SplitRatios
from pipeline.data import manifest
from pipeline.data.manifest import ManifestError
from pipeline.data.split import SplitError, by_group, check, per_class, split

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
            rows.append(dict(image_id=f"c{c}-{i:04d}", path=f"images/c{c}/{i}.png", class_id=c, class_name=f"c{c}",
                             source="test", group=STYLES[i % 4], md5=f"{c}-{i}", width=8, height=8, split=None))
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
    rows = [dict(image_id=f"{s}-{c}", path=f"images/{s}/{c}.png", class_id=c, class_name=f"e{c}", source="embedded",
                 group=s, md5=f"{s}{c}", width=64, height=64, split=None)
            for c in range(n_classes) for s in STYLES]
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
        assert (a.filter(pl.col("class_id") == cid)["split"].value_counts().sort("split").rows()
                == plain.filter(pl.col("class_id") == cid)["split"].value_counts().sort("split").rows())


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
    df = pl.concat([emoji_frame(3), pl.DataFrame([dict(
        image_id="twemoji-99", path="images/twemoji/99.png", class_id=99, class_name="only-twemoji",
        source="embedded", group="twemoji", md5="t99", width=64, height=64, split=None)], schema=manifest.SCHEMA)])
    with pytest.raises(SplitError, match="1 classes have no train images, e.g. \\['only-twemoji'\\]"):
        split(df, SplitParams(), seed=0)


# --------------------------------------------------------------------------------------------------------- guarantees

def test_check_rejects_broken_splits() -> None:
    good, _ = split(emoji_frame(3), SplitParams(), seed=0)
    check(good, SplitParams())  # control: no error

    with pytest.raises(SplitError, match="some images have no split"):
        check(good.with_columns(pl.when(pl.col("image_id") == "noto-0").then(None).otherwise(pl.col("split"))
                                .alias("split")), SplitParams())
    straddle = good.with_columns(pl.when(pl.col("image_id") == "twemoji-1").then(pl.lit("train"))
                                 .otherwise(pl.col("split")).alias("split"))
    with pytest.raises(SplitError, match="groups in more than one split: \\['twemoji'\\]"):
        check(straddle, SplitParams())
    with pytest.raises(ManifestError, match="split must be one of"):
        check(good.with_columns(pl.lit("holdout").alias("split")), SplitParams())
    with pytest.raises(ManifestError, match="image_id is not unique"):
        check(pl.concat([good, good.head(1)]), SplitParams())


def test_every_image_in_exactly_one_split() -> None:
    for df, cfg in ((frame([23, 40, 9]), PER_CLASS), (emoji_frame(6), SplitParams()),
                    (frame([23, 40, 9]), SplitParams(strategy="per_class", shuffle=True))):
        out, counts = split(df, cfg, seed=3)
        assert sorted(out["image_id"]) == sorted(df["image_id"])
        assert out["image_id"].n_unique() == df.height
        assert sum(counts["images"].values()) == df.height
        per_split = [set(out.filter(pl.col("split") == s)["image_id"]) for s in manifest.SPLITS]
        assert not (per_split[0] & per_split[1] or per_split[0] & per_split[2] or per_split[1] & per_split[2])
