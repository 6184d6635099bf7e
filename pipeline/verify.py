"""`python -m pipeline verify-results`: is a rerun's accuracy what the committed results say, within their spread?

Training on a CPU is bit-reproducible on one CPU type with one software stack, not across CPU types: the math
libraries pick kernels (and so the order of floating-point sums) by instruction set and cache size, and after a few
hundred optimiser steps the weights, and then a few test images, differ (README "Same results on another machine").
So a fresh clone on another machine compares its rerun with the committed mean ± std over seeds instead of bytes:

- identical: every seed's test top-1 equals the committed one (same CPU type and software);
- within the interval: the two means differ by less than the tolerance of a two-sample t-test at 95 % on the two
  sets of seeds, and at least one test image (a rerun's seeds are new draws of the same noise);
- OUTSIDE: a larger difference, which the seed noise does not explain: something else changed (code, data, params).

The committed results also name the machine they were made on (metrics/environment.json, written by the report stage).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

KEY = "test_top1"
ENVIRONMENT_FILE = "metrics/environment.json"
# Variables that pin the math libraries' code paths; recorded when set (README "Same results on another machine").
NUMERICS_ENV = ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")


def environment() -> dict:
    """What decides CPU numerics: the CPU model and instruction set, the library versions, pinning variables."""
    import numpy
    import timm
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")),
        platform.processor() or "unknown",
    )
    return {
        "cpu": model,
        "machine": platform.machine(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "onednn": _onednn_version(torch),
        "pinned": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _onednn_version(torch) -> str:
    line = next((x for x in torch.__config__.show().splitlines() if "MKL-DNN" in x or "oneDNN" in x), "")
    return line.split(" v", 1)[1].split(" ", 1)[0] if " v" in line else "unknown"


def tolerance(a: dict, b: dict, key: str = KEY) -> float:
    """Half-width of a two-sample t-test at 95 % between two seed sets (pooled std), at least one test image."""
    from scipy import stats

    na, nb = a.get("n_seeds", 1), b.get("n_seeds", 1)
    floor = 1.0 / max(a.get("test_images", 1), 1)
    if na + nb < 3:
        return floor
    pooled = math.sqrt(
        ((na - 1) * a.get(f"{key}_std", 0.0) ** 2 + (nb - 1) * b.get(f"{key}_std", 0.0) ** 2) / (na + nb - 2)
    )
    return max(float(stats.t.ppf(0.975, na + nb - 2)) * pooled * math.sqrt(1 / na + 1 / nb), floor)


def compare(committed: dict, rerun: dict, key: str = KEY) -> tuple[str, float, float]:
    """(verdict, rerun mean - committed mean, tolerance) for one variant's metrics/evaluate/<v>.json pair."""
    diff = rerun[key] - committed[key]
    tol = tolerance(committed, rerun, key)
    if rerun.get(f"{key}_seeds", [rerun[key]]) == committed.get(f"{key}_seeds", [committed[key]]):
        return "identical", diff, tol
    return ("within the interval" if abs(diff) <= tol else "OUTSIDE the interval"), diff, tol


def committed_json(root: Path, ref: str, path: str) -> dict | None:
    """A file's content at a git revision (None where it did not exist)."""
    out = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=root, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def verify(root: Path, ref: str = "HEAD", metrics_dir: str = "metrics/evaluate") -> tuple[list[list[str]], bool]:
    """One row per variant (metrics/evaluate/<v>.json in the workspace) and whether all are identical/within."""
    rows, ok = [], True
    for path in sorted((root / metrics_dir).glob("*.json")):
        rel = path.relative_to(root).as_posix()
        rerun, committed = json.loads(path.read_text()), committed_json(root, ref, rel)
        if committed is None:
            rows.append([path.stem, "-", _fmt(rerun), "-", "-", f"not committed at {ref}"])
            continue
        verdict, diff, tol = compare(committed, rerun)
        ok &= not verdict.startswith("OUTSIDE")
        rows.append([path.stem, _fmt(committed), _fmt(rerun), f"{100 * diff:+.2f}", f"±{100 * tol:.2f}", verdict])
    return rows, ok


def _fmt(m: dict) -> str:
    return f"{100 * m[KEY]:.2f} ± {100 * m.get(f'{KEY}_std', 0.0):.2f} % (n={m.get('n_seeds', 1)})"


def add_verify_parser(sub) -> None:
    p = sub.add_parser("verify-results", help="compare a rerun's test top-1 with the committed mean ± std")
    p.add_argument("--ref", default="HEAD", help="git revision holding the committed results (default HEAD)")
    p.add_argument("--metrics-dir", default="metrics/evaluate")
    p.set_defaults(fn=_main)


def _main(args: argparse.Namespace) -> int:
    from pipeline.report.card import md_table

    root = Path.cwd()
    rows, ok = verify(root, args.ref, args.metrics_dir)
    if not rows:
        print(f"verify-results: no results in {args.metrics_dir} (run `dvc repro` first)", file=sys.stderr)
        return 2
    print(
        md_table(
            ["variant", f"committed ({args.ref})", "this run", "difference (points)", "tolerance", "verdict"], rows
        )
    )
    made_on, here = committed_json(root, args.ref, ENVIRONMENT_FILE), environment()
    if made_on is not None:
        differ = {k: (made_on.get(k), v) for k, v in here.items() if made_on.get(k) != v}
        print(
            "\nmachine: "
            + (
                "the same CPU type and software as the committed run: results should be identical"
                if not differ
                else "differs from the committed run's: "
                + "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items())
            )
        )
    print(
        "\n"
        + (
            "OK: every variant is identical or within its interval"
            if ok
            else "FAILED: a difference beyond the seed noise (not a different CPU): check code, data and params"
        )
    )
    return 0 if ok else 1
