"""The params.yaml keys that dvc.yaml's stages declare, and which of them params.yaml lacks.

DVC checks a stage's declared params only when it runs that stage, after deleting the stage's outputs: a section
missing from params.yaml (the stages' own defaults would apply) then costs those outputs. check_params runs first
and refuses such a file, so nothing is touched. dvc.yaml is read generically (every stage, `foreach`/`matrix`
bodies included), so new stages and templated entries are covered without naming them here.
"""

from __future__ import annotations

from pathlib import Path

import yaml

PARAMS_FILE = "params.yaml"


def _entries(stage: dict) -> list:
    """A stage's `params` list; a foreach/matrix stage keeps it in its `do` body."""
    body = stage.get("do", stage) if isinstance(stage, dict) else {}
    return (body or {}).get("params") or []


def _static_prefix(key: str) -> str:
    """`variants.${key}` -> `variants`: the part of a templated key that exists whatever the template expands to."""
    parts = []
    for part in key.split("."):
        if "${" in part:
            break
        parts.append(part)
    return ".".join(parts)


def declared_keys(dvc_yaml: Path, params_file: str = PARAMS_FILE) -> dict[str, list[str]]:
    """{dotted key: [stages declaring it]} for every key of `params_file` named in dvc.yaml's stages.

    `params.yaml:` with no key list (every key, as check_params declares) names no particular key."""
    stages = (yaml.safe_load(Path(dvc_yaml).read_text()) or {}).get("stages") or {}
    keys: dict[str, list[str]] = {}
    for name, stage in stages.items():
        for entry in _entries(stage):
            if isinstance(entry, str):
                named = [entry]
            elif isinstance(entry, dict):  # {file: [keys]}: only the entries of our params file
                named = [k for f, ks in entry.items() if f == params_file for k in (ks or [])]
            else:
                continue
            for key in filter(None, map(_static_prefix, named)):
                keys.setdefault(key, []).append(name)
    return keys


def _first_missing(raw: dict, dotted: str) -> str | None:
    """The shortest prefix of `dotted` that `raw` lacks (`base` when the whole section is gone), or None."""
    node, parts = raw, dotted.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return None


def missing_keys(raw: dict, dvc_yaml: Path) -> list[str]:
    """One message line per missing key or section of params.yaml (already parsed: `raw`) that a stage declares."""
    gone: dict[str, set[str]] = {}
    for key, stages in declared_keys(dvc_yaml).items():
        prefix = _first_missing(raw, key)
        if prefix is not None:
            gone.setdefault(prefix, set()).update(stages)
    return [
        f"  - {prefix}: missing from {PARAMS_FILE}, but dvc.yaml's stage(s) {', '.join(sorted(stages))} declare "
        "it (DVC would delete their outputs, then stop); restore it (defaults: pipeline/config.py)"
        for prefix, stages in sorted(gone.items())
    ]
