"""Grouped splits for folder datasets: <class>/<group>/<image> trees never straddle train/val/test (acquire.folder.group
+ split.group_assign: ratio_per_class), through acquire -> clean -> split, near-duplicate groups included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.config import AcquireParams, CleanParams, ParamsError, SplitParams, validate_section
from pipeline.data.acquire import acquire, folder_group
from pipeline.data.clean import clean
from pipeline.data.split import split

CLASSES, GROUPS, PER_GROUP = ("alice", "bob", "carol"), ("ep1", "ep2", "ep3", "ep4", "ep5"), 3


def _tree(root: Path) -> None:
    """<class>/<episode>/<frame>.png, every frame its own random picture; one frame of alice/ep4 is a re-encoded
    copy of alice/ep1's first frame with a pixel changed (a near-duplicate that links the two episodes)."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        for g in GROUPS:
            (root / c / g).mkdir(parents=True)
            for i in range(PER_GROUP):
                pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(4, 0).repeat(4, 1)
                Image.fromarray(pixels).save(root / c / g / f"frame{i}.png")
    twin = np.asarray(Image.open(root / "alice" / "ep1" / "frame0.png")).copy()
    twin[0, 0] = (twin[0, 0].astype(int) + 1) % 256
    Image.fromarray(twin).save(root / "alice" / "ep4" / "frame0.png")


def _pipeline(tmp_path: Path, group: str, assign: str = "ratio_per_class") -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    _tree(tmp_path / "src")
    cfg = validate_section(AcquireParams, {"source": "folder", "folder": {"path": "src", "group": group}}, "test")
    raw = acquire(cfg, tmp_path, tmp_path / "raw")
    cleaned, _, _ = clean(
        CleanParams(min_per_class=1, near_dup_hamming=4, workers=1), tmp_path / "raw", tmp_path / "clean"
    )
    scfg = SplitParams(strategy="group", group_assign=assign, ratios={"train": 0.6, "val": 0.2, "test": 0.2})
    out, metrics = split(cleaned, scfg, seed=3)
    return raw, out, metrics


def _splits_per(df: pl.DataFrame, key: str) -> pl.DataFrame:
    return df.group_by(key).agg(pl.col("split").n_unique().alias("n"), pl.col("split").first())


def test_subfolder_groups_never_straddle_splits(tmp_path):
    raw, out, metrics = _pipeline(tmp_path, "subfolder")
    assert sorted(raw["group"].unique()) == sorted(f"{c}/{g}" for c in CLASSES for g in GROUPS)
    per_group = _splits_per(out, "group")
    assert per_group["n"].max() == 1  # every episode in exactly one split
    assert _splits_per(out, "dup_group")["n"].max() == 1
    linked = out.filter(pl.col("group").is_in(["alice/ep1", "alice/ep4"]))["split"].unique()
    assert linked.len() == 1  # the near-duplicate joined the two episodes into one draw
    assert metrics["dup_group_moves"] == 0  # nothing had to be moved after the draw
    for c in CLASSES:  # each class keeps train, and with 5 episodes also holds some out
        assert {"train", "test"} <= set(out.filter(pl.col("class_name") == c)["split"])


def test_image_groups_would_mix_frames_of_one_episode(tmp_path):
    _, out, _ = _pipeline(tmp_path, "image")
    episodes = out.with_columns(pl.col("path").str.extract(r"^images/([^/]+/[^/]+)/").alias("episode"))
    assert episodes["episode"].n_unique() == len(CLASSES) * len(GROUPS)
    assert _splits_per(episodes, "episode")["n"].max() > 1  # what acquire.folder.group: subfolder prevents


def test_pattern_groups_and_their_validation():
    assert folder_group("alice/shot12_f001.png", r"pattern:/(shot\d+)_") == "shot12"
    assert folder_group("alice/shot12_f001.png", r"pattern:shot\d+") == "shot12"  # no capture group: the match
    assert folder_group("alice/poster.png", r"pattern:/(shot\d+)_") == "alice/poster.png"  # unmatched: its own
    assert folder_group("alice/ep1/f.png", "subfolder") == "alice/ep1"
    assert folder_group("alice/f.png", "subfolder") == "alice/f.png"
    with pytest.raises(ParamsError, match=r"acquire\.folder\.group.*not a valid regular expression"):
        validate_section(
            AcquireParams,
            {"source": "folder", "folder": {"path": "x", "group": "pattern:(a"}},
            "test",
            prefix="acquire.",
        )
    with pytest.raises(ParamsError, match=r"acquire\.folder\.group.*expected image, subfolder or pattern"):
        validate_section(
            AcquireParams, {"source": "folder", "folder": {"path": "x", "group": "video"}}, "test", prefix="acquire."
        )


def test_ratio_per_class_refuses_groups_spanning_classes():
    df = pl.DataFrame({"image_id": ["a", "b", "c"], "class_name": ["x", "y", "x"], "group": ["g", "g", "h"]})
    with pytest.raises(ValueError, match=r"groups of 'group' hold images of several classes.*\['g'\]"):
        split(df, SplitParams(strategy="group", group_assign="ratio_per_class"), seed=0)
