"""Where images live: plain files, or members of uncompressed tar shards.

A manifest `path` is relative to its image root. `images/a.png` is a plain file; `shards/00003.tar/a.png` is member
`a.png` of the tar file `shards/00003.tar`. Shards exist because DVC handles a few hundred large files far faster
than 463k small ones (status hashes, push/pull requests): datasets at DAF:re scale are written as shards, the small
embedded set as files. Readers never care which: `read_bytes`/`open_image` resolve both.

Paths are untrusted input (manifests can be edited, servers send names): nothing outside the root is ever read.
"""

from __future__ import annotations

import io
import os
import tarfile
from functools import lru_cache
from pathlib import Path, PurePosixPath

from PIL import Image

from pipeline.io import write_bytes as atomic_write_bytes

SHARD_SUFFIX = ".tar"


def safe_relpath(rel: str) -> PurePosixPath:
    """A manifest path as a relative POSIX path that cannot leave its root (no absolute, no '..', no backslash)."""
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or "\\" in rel or any(part in ("..", "") for part in rel.split("/")):
        raise ValueError(f"unsafe image path {rel!r}: must be relative, without '..' or empty parts")
    return p


def _split_shard(root: Path, rel: PurePosixPath) -> tuple[Path, str] | None:
    """(tar file, member) when a leading part of `rel` names an existing .tar file under root."""
    parts = rel.parts
    for i in range(1, len(parts)):
        if parts[i - 1].endswith(SHARD_SUFFIX):
            tar = root.joinpath(*parts[:i])
            if tar.is_file():
                return tar, "/".join(parts[i:])
    return None


@lru_cache(maxsize=64)
def _shard_index(tar: str, mtime_ns: int) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size); read once per shard and process (headers only, data is skipped)."""
    with tarfile.open(tar, "r:") as tf:
        return {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}


def read_bytes(root: str | Path, rel: str) -> bytes:
    root = Path(root)
    p = safe_relpath(rel)
    shard = _split_shard(root, p)
    if shard is None:
        return (root / p).read_bytes()
    tar, member = shard
    index = _shard_index(str(tar), tar.stat().st_mtime_ns)
    if member not in index:
        raise FileNotFoundError(f"{member!r} is not in shard {tar}")
    offset, size = index[member]
    with open(tar, "rb") as f:
        f.seek(offset)
        return f.read(size)


def exists(root: str | Path, rel: str) -> bool:
    try:
        p = safe_relpath(rel)
    except ValueError:
        return False
    shard = _split_shard(Path(root), p)
    if shard is None:
        return (Path(root) / p).is_file()
    tar, member = shard
    return member in _shard_index(str(tar), tar.stat().st_mtime_ns)


def open_image(root: str | Path, rel: str) -> Image.Image:
    """Open an image lazily (PIL reads the header now, pixels on load()); works for files and shard members."""
    root = Path(root)
    p = safe_relpath(rel)
    if _split_shard(root, p) is None:
        return Image.open(root / p)
    return Image.open(io.BytesIO(read_bytes(root, rel)))


class ImageWriter:
    """Writes images under `root`, as plain files (`images/<name>`) or into tar shards of `shard_size` members.

    Use as a context manager; `write` returns the manifest path of what it wrote. Shards are written to a temporary
    name and renamed when full or on close, so a killed run never leaves a half shard that looks complete.
    """

    def __init__(self, root: str | Path, shard_size: int | None = None, prefix: str = "images"):
        self.root, self.shard_size, self.prefix = Path(root), shard_size, prefix
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0
        self._shard_no = 0
        self.paths: list[str] = []

    def _shard_name(self) -> str:
        return f"shards/{self._shard_no:05d}{SHARD_SUFFIX}"

    def write(self, name: str, data: bytes) -> str:
        safe_relpath(name)
        if self.shard_size is None:
            rel = f"{self.prefix}/{name}"
            atomic_write_bytes(self.root / rel, data)
        else:
            if self._tar is None:
                self._tmp = self.root / (self._shard_name() + ".partial")
                self._tmp.parent.mkdir(parents=True, exist_ok=True)
                self._tar = tarfile.open(self._tmp, "w:", format=tarfile.PAX_FORMAT)
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: identical inputs, identical shards
            self._tar.addfile(info, io.BytesIO(data))
            rel = f"{self._shard_name()}/{name}"
            self._count += 1
            if self._count >= self.shard_size:
                self._finish_shard()
        self.paths.append(rel)
        return rel

    def _finish_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        os.replace(self._tmp, self.root / self._shard_name())
        self._tar, self._tmp, self._count = None, None, 0
        self._shard_no += 1

    def close(self) -> None:
        self._finish_shard()

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        elif self._tar is not None:  # failed: drop the partial shard rather than leave a truncated tar
            self._tar.close()
            self._tmp.unlink(missing_ok=True)
