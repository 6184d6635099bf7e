"""Atomic writes: all or nothing, and ordinary file permissions."""

import os
import stat
from pathlib import Path

import pytest

from pipeline.io import atomic_path, write_text


def test_written_file_has_the_mode_open_would_give(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_failed_block_leaves_neither_file_nor_temp(tmp_path: Path) -> None:
    write_text(tmp_path / "keep.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep.txt") as tmp:
            tmp.write_text("new, half written")
            raise RuntimeError("killed")
    assert (tmp_path / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
