"""Near-duplicate search (pipeline/data/dedup.py): same groups as the O(N^2) definition, sub-quadratic work, bounded
giant buckets; and the benchmark's clean + split pipeline at 20k rows finding what it planted."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.data.dedup import HASH_BITS, MAX_BUCKET, band_layout, components, near_duplicate_groups, phash64


def brute_force_groups(hashes: list[int | None], t: int) -> list[int]:
    """The definition: union of all pairs within t bits; label = earliest row of the component."""
    parent = list(range(len(hashes)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(hashes)):
        for j in range(i + 1, len(hashes)):
            if t and None not in (hashes[i], hashes[j]) and bin(hashes[i] ^ hashes[j]).count("1") <= t:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(hashes))]


def clustered_hashes(seed: int, n: int = 400, centres: int = 40, max_flips: int = 7) -> list[int | None]:
    """Hashes around a few centres (1..max_flips bits away), some null: many pairs near every threshold."""
    rng = np.random.default_rng(seed)
    base = [int(x) for x in rng.integers(0, 2**63, size=centres, dtype=np.int64)]
    out: list[int | None] = []
    for _ in range(n):
        h = base[int(rng.integers(centres))] << 1 | int(rng.integers(2))
        for bit in rng.choice(HASH_BITS, size=int(rng.integers(0, max_flips + 1)), replace=False):
            h ^= 1 << int(bit)
        out.append(None if rng.random() < 0.05 else h)
    return out


def groups(hashes: list[int | None], t: int, **kw) -> list[int]:
    return near_duplicate_groups(pl.Series(hashes, dtype=pl.UInt64), t, **kw)[0].tolist()


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 8])
def test_multi_index_search_equals_brute_force(t: int) -> None:
    for seed in range(3):
        hashes = clustered_hashes(seed * 10 + t)
        assert groups(hashes, t) == brute_force_groups(hashes, t), (t, seed)


def test_zero_threshold_disables_search() -> None:
    hashes = [5, 5, 7, None]
    assert groups(hashes, 0) == [0, 1, 2, 3]


def test_identical_hashes_and_nulls() -> None:
    assert groups([9, None, 9, 9 ^ 0b11, None, 1 << 63], 2) == [0, 1, 0, 0, 4, 5]


def test_top_bit_and_extreme_values() -> None:
    top = (1 << 64) - 1
    assert groups([top, top ^ 1, 0, 1], 1) == [0, 0, 2, 2]


def test_grouping_is_transitive() -> None:
    a = 0
    b = a ^ 0b1111  # 4 bits from a
    c = b ^ 0b1111_0000  # 4 from b, 8 from a
    assert groups([a, b, c], 4) == [0, 0, 0]


def test_band_layout_covers_64_bits_with_t_plus_1_bands() -> None:
    for t in range(0, 16):
        layout = band_layout(t)
        assert len(layout) == t + 1
        assert sum(w for _, w in layout) == HASH_BITS
        assert [s for s, _ in layout] == list(np.cumsum([0] + [w for _, w in layout[:-1]]))
        assert max(w for _, w in layout) - min(w for _, w in layout) <= 1


def test_components_labels_are_component_minimum() -> None:
    edges = np.array([[5, 3, 1, 7], [3, 1, 0, 8]])
    assert components(10, edges).tolist() == [0, 0, 2, 0, 4, 0, 6, 7, 7, 9]
    assert components(3, np.zeros((2, 0), np.int64)).tolist() == [0, 1, 2]


def test_search_is_sub_quadratic_on_random_hashes() -> None:
    n = 20_000
    hashes = pl.Series(np.random.default_rng(0).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True))
    _, stats = near_duplicate_groups(hashes, 4)
    # 5 bands of 12-13 bits: about 5 * n^2 / 2 / 2^13 candidates, not n^2 / 2 = 2e8.
    assert stats.candidate_pairs < 0.001 * n * n / 2
    assert stats.unique_hashes == n and stats.bands == 5 and stats.capped_buckets == 0


def test_giant_bucket_is_capped_but_found_through_other_bands() -> None:
    rng = np.random.default_rng(1)
    n = MAX_BUCKET + 1000
    hashes = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    shift, width = band_layout(4)[0]
    hashes &= ~np.uint64(((1 << width) - 1) << shift)  # every hash shares band 0: one oversized bucket
    near = hashes[10] ^ np.uint64(0b101 << 40)  # 2 bits from row 10, outside band 0
    series = pl.Series(np.append(hashes, near))
    label, stats = near_duplicate_groups(series, 4)
    assert stats.capped_buckets == 1
    assert label[-1] == 10  # found through an exact band other than the crowded one
    # Bounded: the capped bucket costs at most WINDOW comparisons per hash, not n^2 / 2.
    assert stats.candidate_pairs < 100 * n


def test_blank_images_collapse_before_banding() -> None:
    hashes = [0x8000_0000_0000_0001] * 5000 + [0x8000_0000_0000_0003]
    label, stats = near_duplicate_groups(pl.Series(hashes, dtype=pl.UInt64), 4)
    assert stats.unique_hashes == 2 and stats.candidate_pairs <= 5
    assert set(label.tolist()) == {0}


def test_phash64_matches_imagehash_hex() -> None:
    import imagehash

    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8), "RGB")
    assert phash64(im) == int(str(imagehash.phash(im)), 16)


# -------------------------------------------------------------------------------- the benchmark's pipeline, small


@pytest.fixture(scope="module")
def bench():
    from benchmarks.clean_split import run

    return run(n_rows=20_000, n_classes=150, hamming=4, seed=3)


def test_benchmark_finds_planted_near_duplicates(bench) -> None:
    kept, planted = bench["kept"], bench["planted"]
    groups = dict(zip(kept["image_id"], kept["dup_group"]))
    both = [(dup, src) for dup, src in planted.near.items() if dup in groups and src in groups]
    assert len(both) > 0.9 * len(planted.near) > 150  # a few fall to the class limits; the rest are checked
    assert all(groups[dup] == src for dup, src in both)
    blank = [b for b in planted.blank if b in groups]
    assert {groups[b] for b in blank} == {blank[0]}
    # Nothing else was grouped: random 64-bit hashes are ~32 bits apart.
    grouped = {i for i, g in groups.items() if i != g} | {g for i, g in groups.items() if i != g}
    assert grouped <= set(planted.near) | set(planted.near.values()) | set(planted.blank)
    assert bench["counts"]["near_dup"]["capped_buckets"] == 1  # the crowded band value


def test_benchmark_finds_exact_duplicates_and_limits(bench) -> None:
    q = bench["quarantine"]
    dups = q.filter(pl.col("reason") == "duplicate")
    assert dict(zip(dups["image_id"], dups["duplicate_of"])) == bench["planted"].exact
    # Issue 15: the same bytes under two classes quarantine both copies, never keep the first label silently.
    conflicts = bench["planted"].conflicts
    assert len(conflicts) > 10
    assert set(q.filter(pl.col("reason") == "label_conflict")["image_id"]) == set(conflicts) | set(conflicts.values())
    counts = bench["counts"]
    assert counts["class_names_merged"] == bench["planted"].renamed_classes > 0
    sizes = bench["kept"].group_by("class_name").len()["len"]
    assert sizes.min() >= 20 and sizes.max() <= 5000
    assert counts["kept"] + counts["quarantined"] == bench["rows"]


def test_benchmark_split_keeps_groups_whole(bench) -> None:
    out = bench["split"]
    assert out.group_by("dup_group").agg(pl.col("split").n_unique()).filter(pl.col("split") > 1).height == 0
    assert bench["split_counts"]["classes"]["train"] == out["class_id"].n_unique()
    assert bench["split_counts"]["dup_group_moves"] > 0
