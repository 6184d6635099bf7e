"""Resumable training state: everything needed to continue a killed run exactly where its last epoch ended.

The state lives outside the DVC outputs (DVC deletes a stage's outputs before re-running it), in
`<checkpoint_dir>/<run key>/last.pt`. The run key hashes everything that determines the result (the flattened params
that training reads and the split manifest's md5), so a checkpoint is only ever resumed by the same run.
It is written atomically after every epoch and loaded with `weights_only=True` (plain tensors, numbers, strings).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.io import atomic_path

STATE_FORMAT = "anime-fgvc-train-state/1"


# Keys that say where or how fast a run goes, not what it computes: no part of a run key (nor of a sweep's name).
NOT_IN_RUN_KEY = ("train.resume", "train.checkpoint_dir", "train.num_workers", "train.compile")


def result_params(flat: dict, prefixes: tuple[str, ...] = ("train.",), drop: tuple[str, ...] = ()) -> dict:
    """Of flattened params, those that decide a run's results: the keys under `prefixes`, the seed and the device,
    minus NOT_IN_RUN_KEY and `drop`. The engine's run key and the sweep's name both use it."""
    return {
        k: v
        for k, v in flat.items()
        if (k.startswith(prefixes) or k in ("base.seed", "base.device")) and k not in NOT_IN_RUN_KEY and k not in drop
    }


def run_key(flat_params: dict, split_md5: str) -> str:
    """Stable id of a training run: same params + same data -> same key."""
    blob = json.dumps({"params": flat_params, "split_md5": split_md5}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict:
    """Python, NumPy and torch (CPU + CUDA) generator states as weights_only-loadable values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate wants nested tuples; serialisation may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_state(path: Path, **state) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": STATE_FORMAT, **state, "rng": rng_state()}, tmp)


def load_state(path: Path) -> dict | None:
    """The saved state, or None when there is none. A state of another format is an error, never guessed at."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{path} is not a training state of this pipeline (format {STATE_FORMAT}); delete it "
            "to start the run from scratch"
        )
    return state
