"""Output folders that never cost a user their data.

A stage that replaces a whole folder (acquire, faces, clean) writes the new content into a temporary sibling and
swaps it in only once it is complete, so a failure at any point leaves the previous output untouched. It replaces
only what the project made itself: a folder it writes carries a marker file listing every entry it wrote; an
existing folder without the marker is refused unless it is empty, and one whose marker does not list everything in
it (a user's notes added afterwards) is refused, naming those entries. Folders that hold the project, or overlap a
stage's input, are refused too (`--out .` in a clone must not be able to delete the clone).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

MARKER = ".anime-fgvc-output"  # written into every folder a stage owns; its content is constant (reproducible)


class OutputFolderError(ValueError):
    """The output folder cannot be (re)written without risking data the project did not create."""


def _entries(folder: Path) -> list[str]:
    """Every file and folder under `folder` (relative, sorted; links not followed), the marker excepted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name != MARKER)


def _marker_text(stage: str, entries: list[str] | None = None) -> str:
    """The marker's content: the stage, and what it wrote (None for a folder written in place, the crawl's). It
    depends only on the folder's content, so the output stays reproducible."""
    return json.dumps({"written_by": "anime-fgvc", "stage": stage, "entries": entries}, sort_keys=True) + "\n"


def is_ours(folder: Path) -> bool:
    """True if `folder` carries the marker of an earlier output of this project."""
    return (Path(folder) / MARKER).is_file()


def foreign_entries(folder: Path) -> list[str]:
    """What lies in a marked `folder` that the project did not write (its manifest of entries does not list it):
    the topmost such paths, e.g. `mynotes.txt` and `myresults/`, not every file inside `myresults/`. A marker without
    a list (a crawl's folder, written in place) vouches for everything."""
    folder = Path(folder)
    try:
        listed = json.loads((folder / MARKER).read_text()).get("entries")
    except (OSError, ValueError, AttributeError):
        listed = None
    if listed is None:
        return []
    listed, foreign = set(listed), []
    for rel in _entries(folder):
        if rel not in listed and not any(rel.startswith(f + "/") for f in foreign):
            foreign.append(rel)
    return [f + "/" if (folder / f).is_dir() and not (folder / f).is_symlink() else f for f in foreign]


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_writable(
    out: Path, stage: str, *, project: Path | None = None, inputs: Iterable[tuple[str, Path]] = ()
) -> None:
    """Refuse an output folder whose replacement could delete something the project did not write.

    `project` (the project root) must not be inside `out`; no input (name, path) may overlap `out`; an existing
    `out` must be an empty folder or carry the marker.
    """
    out = Path(out)
    dest = out.resolve()
    if project is not None and (dest == project.resolve() or dest in project.resolve().parents):
        raise OutputFolderError(
            f"{stage}: output folder {out} contains the project ({project.resolve()}); "
            "it is replaced on every run, so choose a folder inside it, e.g. data/raw"
        )
    for name, path in inputs:
        if _overlaps(dest, Path(path).resolve()):
            raise OutputFolderError(
                f"{stage}: output folder {out} overlaps the input {name} ({path}); the output is "
                "replaced on every run, so choose another folder"
            )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputFolderError(f"{stage}: output {out} exists and is not a folder; remove it or choose another")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise OutputFolderError(
            f"{stage}: output folder {out} is not empty and was not written by this project "
            f"(no {MARKER} file in it), so it is left untouched; choose an empty or new folder, "
            "or move its files away yourself"
        )
    foreign = foreign_entries(out) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputFolderError(
            f"{stage}: output folder {out} holds {len(foreign)} entries the project did not "
            f"write ({shown}); a re-run replaces the whole folder, so nothing was changed: move "
            "them elsewhere, then run again"
        )


def claim(out: Path, stage: str) -> None:
    """Mark a folder that a stage writes in place (a resumable crawl) as the project's own."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(_marker_text(stage))


@contextmanager
def replace_folder(
    out: Path, stage: str, *, project: Path | None = None, inputs: Iterable[tuple[str, Path]] = ()
) -> Iterator[Path]:
    """Yield an empty temporary sibling of `out` to write into; it replaces `out` only if the block succeeds.

    On any error (or interrupt) the temporary folder is removed and `out` is exactly as before.
    """
    out = Path(out)
    check_writable(out, stage, project=project, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        (tmp / MARKER).write_text(_marker_text(stage, _entries(tmp)))
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
