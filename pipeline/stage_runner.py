"""Shared entry-point plumbing for stages/*.py and `python -m pipeline`: params loading and clean failures.

Known bad input (invalid params, a missing or malformed manifest, a split that breaks its guarantees) ends the
process with exit code 2 and one message that names the problem, instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.numerics import use_portable_cpu_kernels

# ParamsError, ManifestError, SplitError and WeightsError are ValueErrors; missing files, refused connections and a
# crawl that ran out of retries (danbooru.CrawlError) are OSErrors. Importing nothing heavier here keeps a params
# error fast (no torch import before the message).
KNOWN_ERRORS = (ValueError, OSError)


def stage_parser(description: str, reads_split: bool = False) -> argparse.ArgumentParser:
    """--params for every stage; reads_split adds --split/--images for the stages that read the split images."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if reads_split:
        p.add_argument("--split", required=True, help="split manifest (.parquet)")
        p.add_argument("--images", required=True, help="folder the manifest paths are relative to (clean output)")
    return p


def run(
    main: Callable[[argparse.Namespace, Any, Path], object],
    parser: argparse.ArgumentParser,
    load: Callable[[str], Any],
    argv: list[str] | None = None,
) -> int:
    """Parse args, load + validate params with `load` (before any work), call main(args, params, project_root).

    `load` is the stage's own loader: pipeline.config.load_params (the whole file) for the training side,
    pipeline.data_config.load_data_params for the data stages, which then never import the training params, so
    DVC does not re-run them when a recipe changes (pipeline/stage_deps.py)."""
    args = parser.parse_args(argv)
    try:
        params = load(args.params)
        use_portable_cpu_kernels(params.base.portable_cpu)  # before any kernel runs (pipeline/numerics.py)
        main(args, params, Path(args.params).resolve().parent)
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
