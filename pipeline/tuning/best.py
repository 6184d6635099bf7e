"""best_params.yaml: the sweep's best values of the searched train keys, in params.yaml's own layout.

The `train` stage applies them when `tune.apply` is on, validated by the same TrainParams model as params.yaml, so a
hand-edited or stale file fails with the key named, before any work.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.config import Params, ParamsError, TrainParams, validate_section
from pipeline.io import write_text


def write_best(path: Path, values: dict[str, object], header: str) -> None:
    """values: {'lr': 0.0012, ...}; header: one comment line saying where the values come from."""
    body = yaml.safe_dump({"train": dict(sorted(values.items()))}, sort_keys=False)
    write_text(path, f"# {header}\n# Applied by the train stage when tune.apply is true (params.yaml).\n{body}")


def read_best(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise ParamsError(f"tune.apply is true but {str(path)!r} does not exist (run the tune stage first)")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict) or set(raw) != {"train"} or not isinstance(raw["train"], dict):
        raise ParamsError(f"{path}: expected one `train:` mapping of tuned values")
    return raw["train"]


def apply_best(params: Params, tuned: dict[str, object], source: str) -> Params:
    """params with the tuned train values (validated together with the rest of the train section)."""
    train = validate_section(TrainParams, {**params.train.model_dump(), **tuned}, source, prefix="train.")
    return params.model_copy(update={"train": train})
