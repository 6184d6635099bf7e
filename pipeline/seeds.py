"""Several seeds per variant: the params of one seed, mean ± std over seeds, and paired verdicts between variants.

A result measured once says little here: the same CNN moved 6 points between two x86 machines, and a different seed
moves it as much. So every variant trains and evaluates once per seed in `base.seeds`; the metrics files hold the mean,
the sample standard deviation and the per-seed values, and a claim ("GLSim beats its ViT") is judged on the paired
per-seed differences (same seed: same head init, same batch order), by a rule stated in `verdict`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Params

# The metrics every seed reports that vary from seed to seed: mean, std and per-seed values are kept for these.
SPREAD_KEYS = ("test_top1", "test_top5", "test_macro_acc")
CONFIDENCE = 0.95  # two-sided level of the paired interval a verdict is read from


def seed_params(params: Params, seed: int) -> Params:
    """These params with `base.seed` set to one training seed (the split was made with base.seed before)."""
    return params.model_copy(update={"base": params.base.model_copy(update={"seed": seed})})


def seed_dir(folder: Path, seed: int) -> Path:
    """models/<v>/seed42, plots/predictions/<v>/seed42.csv: the one naming rule for per-seed outputs."""
    return folder / f"seed{seed}"


def summarize(per_seed: dict[int, dict]) -> dict:
    """One metrics dict from several seeds' dicts: every number is the mean over seeds (so `test_top1` keeps its
    meaning), and each key of SPREAD_KEYS (and each `<key>` listed in `spread`) also gets `<key>_std` (sample std, 0
    with one seed) and `<key>_seeds` (the per-seed values, in seed order). `n_seeds` and `seeds` say how many."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    out: dict = {}
    for key, value in first.items():
        values = [per_seed[s].get(key) for s in seeds]
        if isinstance(value, bool) or not all(isinstance(v, (int, float)) for v in values):
            out[key] = value
            continue
        out[key] = value if len(set(values)) == 1 else _mean(values)
        if key in SPREAD_KEYS or len(set(values)) > 1:
            out[f"{key}_std"] = _std(values)
            out[f"{key}_seeds"] = values
    out["n_seeds"], out["seeds"] = len(seeds), seeds
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def _std(values: list[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    if len(values) < 2:
        return 0.0
    m = _mean(values)
    return float(math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)))


@dataclass(frozen=True)
class Paired:
    """The per-seed differences a - b of one metric, over the seeds both have, and their t interval."""

    diffs: tuple[float, ...]
    mean: float
    se: float  # standard error of the mean difference (sample std / sqrt(n)); nan with one seed
    low: float  # CONFIDENCE interval of the mean difference (Student t, n - 1 degrees of freedom)
    high: float

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired(a: dict, b: dict, key: str = "test_top1") -> Paired | None:
    """a[key] - b[key] seed by seed (the `<key>_seeds` lists, matched on `seeds`); None when no seed is shared."""
    va, vb = (
        dict(zip(a.get("seeds", []), a.get(f"{key}_seeds", []))),
        dict(zip(b.get("seeds", []), b.get(f"{key}_seeds", []))),
    )
    shared = sorted(set(va) & set(vb))
    if not shared:
        return None
    diffs = tuple(va[s] - vb[s] for s in shared)
    mean = _mean(list(diffs))
    if len(diffs) < 2:
        return Paired(diffs, mean, math.nan, -math.inf, math.inf)
    from scipy import stats

    se = _std(list(diffs)) / math.sqrt(len(diffs))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1)) * se
    return Paired(diffs, mean, se, mean - half, mean + half)


def verdict(p: Paired, threshold: float = 0.0) -> str:
    """Whether the mean difference exceeds `threshold` (in the metric's units), read from the paired interval:
    'holds' when the whole interval lies above it, 'does not hold' when it lies below, else 'undecided at this noise'
    (one seed, or seeds that disagree by more than the gap)."""
    if p.low > threshold:
        return "holds"
    if p.high < threshold:
        return "does not hold"
    return "undecided at this noise"
