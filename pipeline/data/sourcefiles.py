"""Reading a user's source tree without ever leaving it.

A dataset folder is untrusted input: a class folder may be a symlink to somewhere else, a file may link to
/etc/hostname, and a link back to an ancestor (`root_link -> .`) would import the tree twice under a new class.
So: folder symlinks are never followed, file symlinks only when they resolve inside the source root, hidden
entries (`.ipynb_checkpoints`, `.DS_Store`, `._x.jpg`) are skipped, and every skip is recorded with its reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class OutsideRoot(ValueError):
    """A path that resolves outside the source root it was listed under."""


class Unresolvable(ValueError):
    """A link that cannot be resolved at all: a loop (`a -> b -> a`, `self -> self`) or an unreadable link."""


def resolve_inside(root: Path, path: Path) -> Path:
    """`path` with every link resolved, if it stays inside `root`; else OutsideRoot, or Unresolvable for a link loop
    (naming the path, never its content)."""
    real_root = Path(root).resolve()
    try:
        real = Path(path).resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a loop, 3.13 OSError (ELOOP)
        raise Unresolvable(f"{path}: symlink loop or unresolvable link ({type(exc).__name__})") from None
    if real != real_root and real_root not in real.parents:
        raise OutsideRoot(f"{path} resolves outside the source root {root}")
    return real


@dataclass
class Listing:
    files: list[Path] = field(default_factory=list)  # readable files inside the root, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the root, reason)


def list_files(root: Path, extensions: set[str]) -> Listing:
    """Every file under `root` with one of `extensions` (lower case, with the dot), by the rules above."""
    root = Path(root)
    out = Listing()
    for top, dirs, files in os.walk(root, followlinks=False):
        here = Path(top)
        for d in sorted(dirs):
            rel = (here / d).relative_to(root).as_posix()
            if d.startswith("."):
                out.skipped.append((rel, "hidden folder"))
            elif (here / d).is_symlink():
                out.skipped.append(
                    (rel, "symlinked folder (not followed: it may lead outside the root or back into it)")
                )
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not (here / d).is_symlink())
        for f in sorted(files):
            path = here / f
            rel = path.relative_to(root).as_posix()
            if f.startswith("."):
                out.skipped.append((rel, "hidden file"))
                continue
            if path.suffix.lower() not in extensions:
                continue
            if path.is_symlink():
                try:
                    resolve_inside(root, path)
                except OutsideRoot:
                    out.skipped.append((rel, "link to a file outside the source root"))
                    continue
                except Unresolvable:
                    out.skipped.append((rel, "symlink loop (the link leads back to itself)"))
                    continue
            if path.is_file():
                out.files.append(path)
            else:
                out.skipped.append((rel, "not a regular file (broken link?)"))
    out.files.sort()
    return out
