"""Output folders that never cost a user their data.

A stage that replaces a whole folder (acquire, faces, clean) writes the new content into a temporary sibling and
swaps it in only once it is complete, so a failure at any point leaves the previous output untouched. It replaces
only what the project made itself: a folder it writes carries a marker file, and an existing folder without the
marker is refused unless it is empty. Folders that hold the project, or overlap a stage's input, are refused too
(`--out .` in a clone must not be able to delete the clone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

MARKER = ".anime-fgvc-output"  # written into every folder a stage owns; its content is constant (reproducible)


class OutputFolderError(ValueError):
    """The output folder cannot be (re)written without risking data the project did not create."""


def _marker_text(stage: str) -> str:
    return json.dumps({"written_by": "anime-fgvc", "stage": stage}, sort_keys=True) + "\n"


def is_ours(folder: Path) -> bool:
    """True if `folder` carries the marker of an earlier output of this project."""
    return (Path(folder) / MARKER).is_file()


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_writable(out: Path, stage: str, *, project: Path | None = None, inputs: Iterable[tuple[str, Path]] = ()) \
        -> None:
    """Refuse an output folder whose replacement could delete something the project did not write.

    `project` (the project root) must not be inside `out`; no input (name, path) may overlap `out`; an existing
    `out` must be an empty folder or carry the marker.
    """
    out = Path(out)
    dest = out.resolve()
    if project is not None and (dest == project.resolve() or dest in project.resolve().parents):
        raise OutputFolderError(f"{stage}: output folder {out} contains the project ({project.resolve()}); "
                                "it is replaced on every run, so choose a folder inside it, e.g. data/raw")
    for name, path in inputs:
        if _overlaps(dest, Path(path).resolve()):
            raise OutputFolderError(f"{stage}: output folder {out} overlaps the input {name} ({path}); the output is "
                                    "replaced on every run, so choose another folder")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputFolderError(f"{stage}: output {out} exists and is not a folder; remove it or choose another")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise OutputFolderError(f"{stage}: output folder {out} is not empty and was not written by this project "
                                f"(no {MARKER} file in it), so it is left untouched; choose an empty or new folder, "
                                "or move its files away yourself")


def claim(out: Path, stage: str) -> None:
    """Mark a folder that a stage writes in place (a resumable crawl) as the project's own."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(_marker_text(stage))


@contextmanager
def replace_folder(out: Path, stage: str, *, project: Path | None = None,
                   inputs: Iterable[tuple[str, Path]] = ()) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; it replaces `out` only if the block succeeds.

    On any error (or interrupt) the temporary folder is removed and `out` is exactly as before.
    """
    out = Path(out)
    check_writable(out, stage, project=project, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(_marker_text(stage))
        os.chmod(tmp, 0o777 & ~_umask())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)  # a rename: the previous output is gone only once the new one is in place
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
