"""Photo-like synthetic JPEGs in tar shards: the input of the loader benchmark and of gpu-check's loader parts.

Each image is a smooth random colour field plus grain (so JPEG decoding costs what a photo's does), written with
`ImageWriter` in shards of `shard_size` members, the layout the big acquire sources (DAF:re) use. Shards are written
by parallel processes (one per shard): 10k images take seconds on 16 cores.
"""

from __future__ import annotations

import io
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.data.images import SHARD_SUFFIX, ImageWriter


def _jpeg(rng: np.random.Generator, short_side: int) -> bytes:
    from PIL import Image

    long_side = int(short_side * 1.25)
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((long_side, short_side), Image.BICUBIC)
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 12, (short_side, long_side, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_shard(out: Path, shard_no: int, first: int, count: int, short_side: int, seed: int) -> list[str]:
    """One shard, named as ImageWriter names its `shard_no`-th (images first .. first + count - 1)."""
    rng = np.random.default_rng([seed, shard_no])
    part = out / f"part{shard_no:05d}"
    with ImageWriter(part, shard_size=count) as writer:
        for i in range(first, first + count):
            writer.write(f"{i:07d}.jpg", _jpeg(rng, short_side))
    name = f"shards/{shard_no:05d}{SHARD_SUFFIX}"
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    (part / f"shards/00000{SHARD_SUFFIX}").replace(out / name)
    (part / "shards").rmdir()
    part.rmdir()
    return [f"{name}/{i:07d}.jpg" for i in range(first, first + count)]


def write_jpeg_shards(
    out: Path,
    n: int,
    classes: int = 16,
    short_side: int = 256,
    seed: int = 0,
    shard_size: int = 1024,
    processes: int = 1,
) -> pl.DataFrame:
    """`n` JPEGs of `short_side` x 1.25*short_side under `out/shards/`; returns the manifest (path, class_id)."""
    jobs = [
        (Path(out), k, first, min(shard_size, n - first), short_side, seed)
        for k, first in enumerate(range(0, n, shard_size))
    ]
    if processes > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(processes, len(jobs))) as pool:
            paths = [p for shard in pool.map(_write_shard, *zip(*jobs)) for p in shard]
    else:
        paths = [p for job in jobs for p in _write_shard(*job)]
    return pl.DataFrame({"path": paths, "class_id": [i % classes for i in range(n)]})
