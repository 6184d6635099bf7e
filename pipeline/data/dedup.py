"""Near-duplicate search over 64-bit perceptual hashes, without comparing every pair.

Two images are near-duplicates when the Hamming distance of their 64-bit pHashes is at most t. Comparing all pairs is
quadratic (463k images: 10^11 pairs), so the search uses multi-index hashing:

1. Identical hashes are collapsed first (they are at distance 0). Blank or near-blank images share one hash by the
   thousand; collapsing them keeps them out of the band buckets below.
2. The 64 bits are cut into t + 1 bands. By the pigeonhole principle, two hashes that differ in at most t bits agree
   exactly on at least one band. So candidates are only the pairs that share a band value (a sort per band), and
   each candidate is verified with a popcount of the XOR.
3. Verified pairs are edges; connected components (union-find) are the near-duplicate groups. Grouping is transitive
   on purpose: if a~b and b~c, all three must land in one split, even when a and c are further apart than t.

Bounded worst case: a band bucket holding more than MAX_BUCKET distinct hashes (a band value shared by very many
images, e.g. a flat background) is not compared exhaustively. Its hashes are sorted and each is compared with its
WINDOW successors only. A pair inside such a bucket is still found through any of its other t bands; it is missed
only when every band it shares exactly is an oversized bucket. The cost per band is then at most
sum(min(size, MAX_BUCKET)^2) / 2 + WINDOW * N comparisons instead of N^2 / 2, and SearchStats reports how many
buckets were capped so a run can tell.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from PIL import Image

HASH_BITS = 64
MAX_BUCKET = 2048  # distinct hashes per band bucket compared exhaustively (at most ~2M pairs per bucket)
WINDOW = 64  # oversized buckets: each hash is compared with this many successors in hash order


@dataclass
class SearchStats:
    """What the search did: enough to see it is sub-quadratic and whether the giant-bucket guard kicked in."""

    hashes: int = 0  # non-null hashes searched
    unique_hashes: int = 0
    bands: int = 0
    candidate_pairs: int = 0  # pairs compared with a popcount (summed over bands; a pair may count twice)
    verified_pairs: int = 0  # candidates within the threshold (summed over bands)
    capped_buckets: int = 0  # buckets above MAX_BUCKET, compared along a window only


def phash64(im: Image.Image) -> int:
    """imagehash's pHash (DCT of a 32x32 grey image, 8x8 low frequencies vs. their median) as an unsigned int."""
    import imagehash  # imported here: scipy is slow to import and only needed when near-dup search is on

    bits = np.packbits(imagehash.phash(im).hash.flatten())  # row-major, first bit most significant: hex(str(h))
    return int.from_bytes(bits.tobytes(), "big")


def band_layout(max_distance: int) -> list[tuple[int, int]]:
    """(shift, width) of the max_distance + 1 bands that cover the 64 bits, widths differing by at most one."""
    n_bands = max_distance + 1
    if not 1 <= n_bands <= HASH_BITS:
        raise ValueError(f"max_distance must be in 0..{HASH_BITS - 1}, got {max_distance}")
    base, extra = divmod(HASH_BITS, n_bands)
    layout, shift = [], 0
    for b in range(n_bands):
        width = base + (1 if b < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def popcount(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _band_edges(
    h: np.ndarray, shift: int, width: int, max_distance: int, stats: SearchStats, max_bucket: int, window: int
) -> list[np.ndarray]:
    """Verified pairs (2 x k arrays of indices into h) among hashes that share this band's value."""
    mask = np.uint64((1 << width) - 1)
    key = (h >> np.uint64(shift)) & mask
    order = np.lexsort((h, key))  # by band value, then by hash: windows of a capped bucket see similar hashes
    k_sorted = key[order]
    n = len(h)
    starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
    sizes = np.diff(np.r_[starts, n])
    stats.capped_buckets += int((sizes > max_bucket).sum())
    # For each sorted position: how many later positions of its bucket it is compared with.
    bucket_end = np.repeat(starts + sizes, sizes)
    reach = bucket_end - np.arange(n) - 1
    reach = np.where(np.repeat(sizes, sizes) > max_bucket, np.minimum(reach, window), reach)
    active = np.flatnonzero(reach > 0)
    edges = []
    d = 1
    # Offset d pairs position p with p + d: one vectorised pass per offset, over the positions that still have a
    # partner that far away. The total work equals the number of candidate pairs, never N^2.
    while active.size:
        a, b = order[active], order[active + d]
        stats.candidate_pairs += active.size
        close = popcount(h[a] ^ h[b]) <= max_distance
        if close.any():
            edges.append(np.stack([a[close], b[close]]))
            stats.verified_pairs += int(close.sum())
        d += 1
        active = active[reach[active] >= d]
    return edges


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Union-find over n nodes: label[i] = smallest node index of i's connected component.

    Vectorised: every round hooks the larger root of each still-split edge under the smaller one, then compresses
    paths by pointer jumping. Labels only decrease, so it converges; the component minimum is its only fixed point.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = edges[0].astype(np.int64), edges[1].astype(np.int64)
    while True:
        while True:  # full path compression
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        split = ra != rb
        if not split.any():
            return parent
        a, b, ra, rb = a[split], b[split], ra[split], rb[split]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))


def near_duplicate_groups(
    hashes: pl.Series, max_distance: int, max_bucket: int = MAX_BUCKET, window: int = WINDOW
) -> tuple[np.ndarray, SearchStats]:
    """For each row, the index of the earliest row (in the given order) of its near-duplicate group.

    Rows with a null hash are their own group. max_distance 0 disables the search (every row alone); identical
    hashes are still grouped only when max_distance >= 1, matching `clean.near_dup_hamming: 0` = off.
    """
    n = len(hashes)
    label = np.arange(n, dtype=np.int64)
    stats = SearchStats()
    if max_distance <= 0 or n == 0:
        return label, stats
    rows = pl.DataFrame({"h": hashes.cast(pl.UInt64)}).with_row_index("row").drop_nulls("h")
    stats.hashes = rows.height
    # One node per distinct hash, numbered by first occurrence: node order is row order, so the smallest node of a
    # component is the one holding its earliest row.
    uniq = rows.group_by("h").agg(pl.col("row").min().alias("first")).sort("first").with_row_index("node")
    stats.unique_hashes = uniq.height
    h = uniq["h"].to_numpy()
    layout = band_layout(max_distance)
    stats.bands = len(layout)
    edges = [
        e for shift, width in layout for e in _band_edges(h, shift, width, max_distance, stats, max_bucket, window)
    ]
    node_label = components(uniq.height, np.concatenate(edges, axis=1) if edges else np.zeros((2, 0), np.int64))
    first_row = uniq["first"].to_numpy().astype(np.int64)
    node_of_row = rows.join(uniq.select("h", "node"), on="h", how="left")
    label[node_of_row["row"].to_numpy()] = first_row[node_label[node_of_row["node"].to_numpy()]]
    return label, stats
