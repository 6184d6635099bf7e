"""Benchmark: the metadata part of `clean` and the `split` stage at DAF:re scale, without decoding an image.

A synthetic manifest of 463,437 rows over 3,263 classes with a DAF:re-like long tail (min 20, median 47 per class)
carries precomputed 64-bit pHashes and md5s. Planted in it: exact duplicates (same md5), near-duplicates
(a copy of an earlier row's hash with 1..t bits flipped, some in another class), a block of "blank" images sharing
one hash, a block of distinct hashes sharing one band value (more than dedup.MAX_BUCKET: exercises the
giant-bucket guard) and class names spelt two ways (merged by normalisation). Then it runs clean.select (class
names, exact and near duplicates, per-class min/max, class ids) and split (per_class + the guarantees check), and
prints seconds per phase and the peak RSS (resource.getrusage). Image decoding is per image and parallel: not here.

    python benchmarks/clean_split.py                     # DAF:re scale
    python benchmarks/clean_split.py --rows 20000 --classes 200 --hamming 6

Target (issue): at most 10 minutes on 2 cores, peak memory under 4 GB, near-duplicate search not quadratic.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import polars as pl

from pipeline.config import CleanParams, SplitParams
from pipeline.data import manifest
from pipeline.data.clean import select
from pipeline.data.dedup import MAX_BUCKET, band_layout
from pipeline.data.split import split

DAFRE_ROWS, DAFRE_CLASSES = 463_437, 3_263


@dataclass
class Planted:
    near: dict[str, str] = field(default_factory=dict)  # near-duplicate image_id -> the earlier image it copies
    exact: dict[str, str] = field(default_factory=dict)  # exact duplicate -> the earlier image with its md5
    conflicts: dict[str, str] = field(default_factory=dict)  # the same md5 under another class -> the earlier image
    blank: list[str] = field(default_factory=list)  # rows sharing one hash (first one first)
    crowded: list[str] = field(default_factory=list)  # distinct hashes sharing band 0: one oversized bucket
    renamed_classes: int = 0  # classes with a second spelling of their name


def class_sizes(n_rows: int, n_classes: int, smallest: int = 20, median: int = 47) -> np.ndarray:
    """A log-normal long tail, largest first: smallest + exp(mu + sigma * z) at the classes' normal quantiles z.

    mu puts the median class at `median`; sigma is found by bisection so the sizes sum to n_rows. At DAF:re scale
    this gives min 20, median 47, mean 142, max 14.7k, and 1,553 / 871 / 162 / 65 classes with at least 50 / 100 /
    500 / 1000 images (DAF:re, docs/methods.md#dafre: 20, ~48, 142, ~10.7k; ~1,450 / 830 / 172 / 67).
    """
    z = np.array([NormalDist().inv_cdf(1 - (r - 0.5) / n_classes) for r in range(1, n_classes + 1)])
    mu = np.log(max(median - smallest, 1))
    lo, hi = 0.01, 6.0
    for _ in range(100):
        sigma = (lo + hi) / 2
        total = (smallest + np.exp(mu + sigma * z)).astype(np.int64).sum()
        lo, hi = (sigma, hi) if total < n_rows else (lo, sigma)
    sizes = (smallest + np.exp(mu + sigma * z)).astype(np.int64)
    sizes[0] += n_rows - sizes.sum()  # rounding remainder to the head class
    return sizes


def _flip_bits(rng: np.random.Generator, h: np.uint64, max_bits: int) -> np.uint64:
    bits = rng.choice(64, size=int(rng.integers(1, max_bits + 1)), replace=False)
    return h ^ np.uint64(sum(1 << int(b) for b in bits))


def synthetic_manifest(n_rows: int, n_classes: int, hamming: int, seed: int = 0) -> tuple[pl.DataFrame, Planted]:
    """Rows in DAF:re order (class by class), with phash (UInt64) and the planted cases described above."""
    rng = np.random.default_rng(seed)
    sizes = class_sizes(n_rows, n_classes)
    class_id = np.repeat(np.arange(n_classes), sizes)
    n = len(class_id)
    image_id = np.array([f"{i:07d}" for i in range(n)])
    md5 = np.array([f"{i:032x}" for i in rng.permutation(n)])  # distinct unless planted
    phash = rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)
    planted = Planted()
    # Blank images: one hash shared by many rows (different bytes); the first one is the group's representative.
    blank = np.sort(rng.choice(n, size=min(2000, n // 50), replace=False))
    phash[blank] = np.uint64(0x8000_0000_0000_0001)
    planted.blank = image_id[blank].tolist()
    # A crowded band value: distinct random hashes whose band 0 is all zero bits (more than MAX_BUCKET of them).
    shift, width = band_layout(max(hamming, 1))[0]
    rest = np.setdiff1d(np.arange(n), blank)
    crowded = np.sort(rng.choice(rest, size=min(MAX_BUCKET + 500, n // 4), replace=False))
    phash[crowded] &= ~np.uint64(((1 << width) - 1) << shift)
    planted.crowded = image_id[crowded].tolist()
    # Near and exact duplicates: a copy (later row) of a source (earlier row) that is itself in nothing planted.
    free = np.setdiff1d(rest, crowded)
    pairs = rng.choice(free, size=(int(0.012 * n), 2), replace=False)
    sources, copies = pairs.min(axis=1), pairs.max(axis=1)
    n_exact = len(sources) // 6
    n_conflict = n_exact // 3
    for src, dup in zip(sources[:n_exact], copies[:n_exact]):  # re-uploads into the same class
        md5[dup], phash[dup], class_id[dup] = md5[src], phash[src], class_id[src]
        planted.exact[image_id[dup]] = image_id[src]
    for src, dup in zip(sources[n_exact : n_exact + n_conflict], copies[n_exact : n_exact + n_conflict]):
        class_id[dup] = (class_id[src] + 1) % n_classes  # the same bytes labelled as another class
        md5[dup], phash[dup] = md5[src], phash[src]
        planted.conflicts[image_id[dup]] = image_id[src]
    if hamming:
        for src, dup in zip(sources[n_exact + n_conflict :], copies[n_exact + n_conflict :]):
            phash[dup] = _flip_bits(rng, phash[src], hamming)
            planted.near[image_id[dup]] = image_id[src]
    names = np.array([f"character_{c:04d}" for c in range(n_classes)])[class_id]
    # Every 50th class has some rows spelt like a crawled tag ('Character 0049'): normalisation merges them.
    respelt = (class_id % 50 == 49) & (rng.random(n) < 0.3)
    respelt[np.isin(image_id, list(planted.exact) + list(planted.conflicts))] = False  # keep the planted labels
    names[respelt] = np.char.add("Character ", np.char.zfill(class_id[respelt].astype(str), 4))
    planted.renamed_classes = int(np.unique(class_id[respelt]).size)
    df = pl.DataFrame(
        {
            "image_id": image_id,
            "path": np.char.add(np.char.add("shards/", image_id), ".tar/x.jpg"),
            "class_id": class_id.astype(np.int64),
            "class_name": names,
            "source": "synthetic",
            "group": image_id,
            "md5": md5,
            "width": 256,
            "height": 256,
            "split": None,
            "post_id": np.arange(n, dtype=np.int64),
            "phash": phash,
        }
    )
    df = df.with_columns(
        pl.col("width").cast(pl.Int64),
        pl.col("height").cast(pl.Int64),
        pl.col("split").cast(pl.String),
        pl.col("phash").cast(pl.UInt64),
    )
    return manifest.validate(df, "synthetic manifest"), planted


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def run(
    n_rows: int = DAFRE_ROWS, n_classes: int = DAFRE_CLASSES, hamming: int = 4, seed: int = 0, action: str = "group"
) -> dict:
    """Generate, clean (metadata) and split; returns the frames, counts, planted cases and seconds per phase."""
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    df, planted = synthetic_manifest(n_rows, n_classes, hamming, seed)
    seconds["generate manifest"] = time.perf_counter() - t
    cfg = CleanParams(
        min_per_class=20,
        max_per_class=5000,
        normalize_class_names=True,
        near_dup_hamming=hamming,
        near_dup_action=action,
    )
    clean_steps: dict[str, float] = {}
    t = time.perf_counter()
    kept, quarantine, counts = select(df, cfg, timings=clean_steps)
    seconds["clean (metadata)"] = time.perf_counter() - t
    t = time.perf_counter()
    out, split_counts = split(kept, SplitParams(strategy="per_class"), seed)
    seconds["split per_class + check"] = time.perf_counter() - t
    return dict(
        rows=df.height,
        classes=n_classes,
        seconds=seconds,
        clean_steps=clean_steps,
        kept=kept,
        quarantine=quarantine,
        counts=counts,
        split=out,
        split_counts=split_counts,
        planted=planted,
        peak_rss_mb=peak_rss_mb(),
    )


def report(result: dict) -> str:
    s, c = result["seconds"], result["counts"]
    work = s["clean (metadata)"] + s["split per_class + check"]
    lines = [f"rows {result['rows']:,}, classes {result['classes']:,}", "", f"{'phase':<32}{'seconds':>10}", "-" * 42]
    for k, v in s.items():
        lines.append(f"{k:<32}{v:>10.2f}")
        if k.startswith("clean"):
            lines += [f"  {step:<30}{sec:>10.2f}" for step, sec in result["clean_steps"].items()]
    lines += [
        "-" * 42,
        f"{'clean + split':<32}{work:>10.2f}",
        f"{'peak RSS (MB)':<32}{result['peak_rss_mb']:>10.0f}",
        "",
        f"kept {c['kept']:,}, quarantined {c['quarantined']:,} {c['by_reason']}",
        f"near-duplicates: {c['near_dup']}; class names merged: {c['class_names_merged']}",
        f"split: {result['split_counts']['images']}, dup-group rows moved {result['split_counts']['dup_group_moves']}",
        f"candidate pairs {c['near_dup']['candidate_pairs']:,} vs all pairs {result['rows'] ** 2 // 2:,} "
        f"({c['near_dup']['candidate_pairs'] / max(result['rows'] ** 2 // 2, 1):.2e})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=DAFRE_ROWS)
    p.add_argument("--classes", type=int, default=DAFRE_CLASSES)
    p.add_argument("--hamming", type=int, default=4, help="clean.near_dup_hamming (0: off)")
    p.add_argument("--action", choices=("group", "drop"), default="group", help="clean.near_dup_action")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(report(run(args.rows, args.classes, args.hamming, args.seed, args.action)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
