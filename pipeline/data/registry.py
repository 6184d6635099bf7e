"""Known datasets and their expected shape, so an import can be checked against what the papers used.

Numbers are those of the GLSim / ILA / DAF:re split CSVs (see docs/methods.md#dataset-registry):
`trainval` is what final training uses, `test` what is evaluated. A wrong folder, a truncated label file or a
different variant of a dataset usually shows up first as a different class count, which `check` reports.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class DatasetInfo:
    key: str  # registry name (params: acquire.csv.dataset)
    name: str  # display name
    num_classes: int
    trainval: int | None  # expected train + val images; None where not given or not applicable
    test: int | None  # expected test images
    split: str  # how the source split is made
    notes: str = ""  # folder / CSV notes
    aliases: tuple[str, ...] = ()  # other names the papers' code uses


_UFG = "Yu et al., ICCV 2021; files named <classid>_<idx>_<train|test>.png"

_ENTRIES = (
    DatasetInfo("cub", "CUB-200-2011", 200, 5_994, 5_794, "official", "CUB_200_2011/images, classid csv"),
    DatasetInfo("nabirds", "NABirds", 555, 23_929, 24_633, "official", "nabirds/images"),
    DatasetInfo("dogs", "Stanford Dogs", 120, 12_000, 8_580, "official .mat lists", "Images; top-k doubled"),
    DatasetInfo("cars", "Stanford Cars", 196, 8_144, 8_041, "official", "car_ims; resize IS/0.875"),
    DatasetInfo("aircraft", "FGVC-Aircraft (variant)", 100, 6_667, 3_333, "official trainval/test"),
    DatasetInfo("pets", "Oxford-IIIT Pets", 37, 3_680, 3_669, "official"),
    DatasetInfo("flowers", "Oxford Flowers-102", 102, 2_040, 6_149, "official"),
    DatasetInfo("food", "Food-101", 101, 75_750, 25_250, "official"),
    DatasetInfo("vegfru", "VegFru (veg200 + fru92)", 292, 43_800, 116_931, "official train+val / test"),
    DatasetInfo(
        "inat17",
        "iNaturalist 2017",
        5_089,
        579_184,
        95_986,
        "official train / official val as test",
        "CSVs not stored; sizes from the iNat17 release, unverified",
    ),
    DatasetInfo(
        "moe",
        "moeImouto (nagadomi animeface, Kaggle)",
        173,
        11_454,
        2_943,
        "80/20 per class (author-made)",
        "mean/std 0.5",
        aliases=("moeimouto",),
    ),
    DatasetInfo(
        "dafb",
        "DAF:re Full",
        3_263,
        322_947 + 46_050,
        94_440,
        "author split 0.7 / 0.1 / 0.2 per class",
        "fullMin256/ + labels/; mean/std 0.5",
        aliases=("danbooruFull",),
    ),
    DatasetInfo(
        "daf",
        "DAF:re Faces",
        3_263,
        322_947 + 46_050,
        94_440,
        "author split 0.7 / 0.1 / 0.2 per class",
        "faces/ + labels/; mean/std 0.5",
        aliases=("danbooruFaces", "dafre"),
    ),
    DatasetInfo("ncfm", "NCFM fish (Kaggle)", 8, 3_397, 380, "0.9 / 0.1", "fish.csv (3,777 rows)"),
    DatasetInfo(
        "cotton", "Cotton80 (UFG)", 80, 240, 240, "official (file suffix _train / _test)", f"cotton_square_new; {_UFG}"
    ),
    DatasetInfo(
        "soylocal", "SoyLocal (UFG)", 200, 600, 600, "official", f"soybean200_square; {_UFG}", aliases=("soy",)
    ),
    DatasetInfo("soyglobal", "SoyGlobal (UFG)", 1_938, 5_814, 5_814, "official", f"soybean2000; {_UFG}"),
    DatasetInfo(
        "soygene", "SoyGene (UFG)", 1_110, 12_763, 11_143, "official anno/train.txt, test.txt", f"images; {_UFG}"
    ),
    DatasetInfo(
        "soyageing",
        "SoyAgeing R1+R3+R4+R5+R6 (UFG)",
        198,
        4_950,
        4_950,
        "official",
        f"per-subset folders R*/images; {_UFG}",
    ),
    *(
        DatasetInfo(f"soyageingr{r}", f"SoyAgeing R{r} (UFG)", 198, 990, 990, "official", f"R{r}/images; {_UFG}")
        for r in (1, 3, 4, 5, 6)
    ),  # R2 is not used by the reference code
    DatasetInfo("imagenet", "ImageNet-1k val", 1_000, None, 50_000, "evaluation only"),
    DatasetInfo("sketch", "ImageNet-Sketch", 1_000, None, 50_889, "evaluation only"),
)

REGISTRY: dict[str, DatasetInfo] = {e.key: e for e in _ENTRIES}
_ALIASES: dict[str, str] = {a.lower(): e.key for e in _ENTRIES for a in e.aliases}


class DatasetMismatch(ValueError):
    """An imported dataset does not have the class count its registry entry expects."""


def keys() -> tuple[str, ...]:
    return tuple(REGISTRY)


def lookup(name: str) -> DatasetInfo:
    """The entry for a key or alias (case-insensitive); unknown names list the known keys."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(REGISTRY)}")
    return REGISTRY[key]


def source_dataset(acquire) -> str | None:
    """The registry key of the data an `acquire` section (pipeline.config.AcquireParams) imports, where it names one:
    acquire.csv.dataset for the csv source, daf / dafb for the DAF:re release's faces/ / fullMin256/; else None.
    GLSim's default top-k and the report's papers' numbers depend on it."""
    if acquire.source == "csv" and acquire.csv.dataset:
        return lookup(acquire.csv.dataset).key
    if acquire.source == "dafre":
        return "daf" if acquire.dafre.images == "faces" else "dafb"
    return None


def _size_notes(info: DatasetInfo, df: pl.DataFrame) -> list[str]:
    """Differences in split sizes, where the frame carries its source's split and the entry gives sizes.

    Only notes: a missing train.csv or a subset import changes sizes legitimately, the class count does not.
    """
    if "split" not in df.columns or df["split"].is_null().all():
        return []
    found = {
        "trainval": df.filter(pl.col("split").is_in(["train", "val"])).height,
        "test": df.filter(pl.col("split") == "test").height,
    }
    notes = []
    for part, expected in (("trainval", info.trainval), ("test", info.test)):
        if expected is not None and found[part] != expected:
            notes.append(f"{part}: expected {expected:,} images, found {found[part]:,}")
    return notes


def check(name: str, df: pl.DataFrame, *, strict: bool = True) -> DatasetInfo:
    """Compare a label table or manifest (columns class_id, optionally split) with the registry entry `name`.

    A different class count raises DatasetMismatch (strict) or is printed to stderr as a warning (strict=False,
    for sources whose users often import subsets). Split-size differences are always only printed.
    """
    info = lookup(name)
    found = df["class_id"].n_unique()
    where = f"dataset {info.key!r} ({info.name})"
    if found != info.num_classes:
        msg = f"{where}: expected {info.num_classes:,} classes, found {found:,}"
        if strict:
            raise DatasetMismatch(msg + " (wrong folder, label files or dataset name?)")
        print(f"warning: {msg} (a subset?)", file=sys.stderr)
    for note in _size_notes(info, df):
        print(f"note: {where}: {note}", file=sys.stderr)
    return info
