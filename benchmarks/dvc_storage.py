"""Benchmark: DVC add/status/push/pull of N images stored as loose files vs tar shards.

Why shards: at DAF:re scale (463k images) DVC hashes, stats and transfers every file separately. The acquire sources
for big datasets write uncompressed tar shards instead (pipeline/data/images.py); this measures what that buys.

    python benchmarks/dvc_storage.py --images 20000 --shard-size 2048
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.images import ImageWriter


def _jpeg(rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _dvc(args: list[str], cwd: Path) -> float:
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - t


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=b", "-c", "user.email=b@example.invalid", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def measure(n: int, shard_size: int | None, work: Path) -> dict[str, float]:
    repo, remote, clone = work / "repo", work / "remote", work / "clone"
    repo.mkdir(parents=True)
    _git(["init", "-q"], repo)
    _dvc(["init", "-q"], repo)
    _dvc(["remote", "add", "-d", "store", str(remote)], repo)
    rng = np.random.default_rng(0)
    with ImageWriter(repo / "data", shard_size=shard_size) as w:
        for i in range(n):
            w.write(f"{i % 1000:04d}/{i}.jpg", _jpeg(rng))
    files = sum(1 for p in (repo / "data").rglob("*") if p.is_file())
    row = {"files": files, "add": _dvc(["add", "-q", "data"], repo)}
    row["status"] = _dvc(["status", "-q"], repo)
    row["push"] = _dvc(["push", "-q"], repo)
    _git(["add", "-A"], repo)
    _git(["commit", "-qm", "data"], repo)
    _git(["clone", "-q", str(repo), str(clone)], work)
    row["pull"] = _dvc(["pull", "-q"], clone)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--shard-size", type=int, default=2048)
    args = p.parse_args(argv)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    rows = {}
    for label, shard in (("loose files", None), (f"shards of {args.shard_size}", args.shard_size)):
        work = Path(tempfile.mkdtemp(prefix="dvc-bench-"))
        try:
            rows[label] = measure(args.images, shard, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.images:,} images (32x32 JPEG), local-directory remote; seconds per command\n")
    print("| storage | files | dvc add | dvc status | dvc push | dvc pull (fresh clone) |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, r in rows.items():
        print(f"| {label} | {r['files']:,} | {r['add']:.1f} | {r['status']:.1f} | {r['push']:.1f} | {r['pull']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
