"""`tune.space`: which `train` keys a sweep searches, and how. Validated without importing Ray.

One entry per train key, the distribution first, then its arguments (Ray Tune's sample functions):

    lr: [loguniform, 1.0e-4, 1.0e-1]      uniform / loguniform: [name, low, high] (loguniform: low > 0)
    label_smoothing: [choice, 0.0, 0.1]   quniform / qloguniform: [name, low, high, q]
    img_size: [grid, 64, 96]              randint: [name, low, high] integers, high excluded (as in Ray)
                                          choice: one value per trial; grid: every value (random search only)

A flat list rather than a nested mapping keeps every params.yaml key at most two dots deep, the form
`dvc exp run -S tune.space.lr=[loguniform,0.0001,0.01]` and MLflow params use.
"""

from __future__ import annotations

from numbers import Real

RANGES = {"uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2}  # name -> numbers taken
LISTS = ("choice", "grid")
DISTRIBUTIONS = (*RANGES, *LISTS)
# Keys the sweep itself sets for every trial: searching them would be meaningless or would break resuming.
NOT_TUNABLE = {
    "epochs": "the per-trial budget is tune.epochs",
    "resume": "trials always resume from their own folder",
    "checkpoint_dir": "each trial checkpoints into its own folder",
    # A trial overrides one resolved train section, where every key is already set: a recipe would fill nothing.
    "recipe": "a preset fills only unwritten keys; search its keys, or run one sweep per recipe",
}


def parse(spec: object) -> tuple[str, list]:
    """(distribution, arguments) of one entry; ValueError saying what is wrong with it."""
    if not isinstance(spec, (list, tuple)) or not spec or not isinstance(spec[0], str):
        raise ValueError(
            f"must be a list [distribution, arguments...] with distribution one of "
            f"{', '.join(DISTRIBUTIONS)}, got {spec!r}"
        )
    name, args = spec[0], list(spec[1:])
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r} (one of {', '.join(DISTRIBUTIONS)})")
    if name in LISTS:
        if not args:
            raise ValueError(f"{name} needs at least one value")
        return name, args
    n = RANGES[name]
    if len(args) != n or not all(isinstance(a, Real) and not isinstance(a, bool) for a in args):
        shape = "low, high, q" if n == 3 else "low, high"
        raise ValueError(f"{name} needs [{name}, {shape}] with numbers, got {list(spec)!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise ValueError(f"{name}: low {low} must be below high {high}")
    if name.endswith("loguniform") and low <= 0:
        raise ValueError(f"{name}: low must be > 0, got {low}")
    if n == 3 and args[2] <= 0:
        raise ValueError(f"{name}: q must be > 0, got {args[2]}")
    if name == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"randint needs integers, got {args!r}")
    return name, args


def check_key(key: str, train_keys: set[str]) -> None:
    """A space key must name a field of the train section that the sweep does not set itself."""
    if key in NOT_TUNABLE:
        raise ValueError(f"train.{key} cannot be searched: {NOT_TUNABLE[key]}")
    if key not in train_keys:
        raise ValueError(f"train.{key} is not a key of the train section (see pipeline/config.py TrainParams)")


def probe_values(name: str, args: list) -> list:
    """The values that are checked against the train section: every listed value, or a range's two ends."""
    if name in LISTS:
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def to_ray(space: dict[str, list]) -> dict:
    """The Tuner's param_space: {'train.lr': tune.loguniform(...), ...} (keys as the trials override them)."""
    from ray import tune

    out = {}
    for key, spec in space.items():
        name, args = parse(spec)
        if name == "grid":
            out[f"train.{key}"] = tune.grid_search(args)
        elif name == "choice":
            out[f"train.{key}"] = tune.choice(args)
        else:
            out[f"train.{key}"] = getattr(tune, name)(*args)
    return out


def has_grid(space: dict[str, list]) -> bool:
    return any(isinstance(s, (list, tuple)) and s and s[0] == "grid" for s in space.values())


def plain(value):
    """numpy scalars (what Ray samples) as Python numbers: YAML, MLflow and pydantic want plain types."""
    return value.item() if hasattr(value, "item") else value
