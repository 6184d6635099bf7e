"""What a run was made from, as plain strings (pipeline/tracking.py puts them on every MLflow run).

- code and data: the stage's dependencies as dvc.lock lists them. `deps_md5` digests their hashes now (files hashed
  here; a folder another stage writes, e.g. data/clean, takes that stage's recorded output hash, which DVC wrote
  when that stage finished; other folders are hashed here the way DVC hashes them). `dvc_lock_deps_md5` digests the
  hashes dvc.lock recorded, and `dvc_lock_current` says whether the two agree (under `dvc repro` the running stage's
  own entry is the previous run's until the stage finishes, so "false" there means "changed since the last run").
  `data_version`: the md5 of the split manifest the run read (DVC's hash of that file).
- machine: CPU model, GPU models, torch / timm / CUDA / cuDNN versions;
- git: the commit and whether tracked files differ from it (`git_dirty`).
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from functools import lru_cache
from pathlib import Path

from pipeline.io import md5_file

LOCK = "dvc.lock"


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or "unknown"
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else str(bool(status.strip())).lower()
    return {"git_commit": commit, "git_dirty": dirty}


@lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    import timm
    import torch

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    )
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cpu": _cpu_model(),
        "gpu": ", ".join(gpus) or "none",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cudnn": str(cudnn or "none"),
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def dvc_deps(root: Path, stage: str) -> dict[str, str]:
    """The stage's dependency hashes (see the module doc); empty strings explain when dvc.lock has no entry."""
    lock = root / LOCK
    if not lock.is_file():
        return {"dvc_stage": stage, "deps_md5": f"unknown (no {LOCK})"}
    import yaml

    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    entry = stages.get(stage)
    if entry is None:
        return {"dvc_stage": stage, "deps_md5": f"unknown (no {stage} entry in {LOCK} yet)"}
    produced = {o["path"]: o.get("md5") for s in stages.values() for o in s.get("outs", [])}
    recorded = {d["path"]: d.get("md5") for d in entry.get("deps", [])}
    current = {path: _current_hash(root / path, produced.get(path)) for path in recorded}
    changed = sorted(p for p in recorded if current[p] != recorded[p])
    return {
        "dvc_stage": stage,
        "deps_md5": _digest(current),
        "dvc_lock_deps_md5": _digest(recorded),
        "dvc_lock_current": "true" if not changed else f"false ({len(changed)} changed: {', '.join(changed[:5])})",
    }


def _current_hash(path: Path, produced: str | None) -> str | None:
    if path.is_file():
        return md5_file(path)
    if path.is_dir():
        return produced or dir_md5(path)
    return None


def dir_md5(folder: Path) -> str:
    """DVC's hash of a folder: md5 of the JSON list of {md5, relpath} of its files, sorted by relpath, + ".dir"."""
    entries = [
        {"md5": md5_file(f), "relpath": f.relative_to(folder).as_posix()}
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    ]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _digest(hashes: dict[str, str | None]) -> str:
    return hashlib.md5(json.dumps(sorted(hashes.items()), default=str).encode()).hexdigest()


def collect(root: Path, stage: str | None = None, data_file: Path | None = None) -> dict[str, str]:
    """Every provenance tag of a run of `stage` (a dvc.yaml stage name, e.g. train@glsim) that read `data_file`."""
    tags = {**git_state(root), **machine()}
    if data_file is not None and Path(data_file).is_file():
        tags["data_version"] = md5_file(data_file)
    if stage is not None:
        tags |= dvc_deps(root, stage)
    return tags
