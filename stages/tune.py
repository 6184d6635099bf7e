"""DVC stage `tune`: a Ray Tune sweep over tune.space; writes best_params.yaml and the sweep's metrics.

Ray's experiment folder (tune.results_dir) is no output of this stage, so a killed sweep resumes where it stopped.
With RAY_ADDRESS set in the environment the sweep runs on that Ray cluster (README, "Sweeps").
"""

import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    from pipeline.tuning.sweep import run_sweep  # imports Ray: after params are known to be valid

    run_sweep(params, Path(args.split), Path(args.images), root, Path(args.best), Path(args.metrics))


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--best", required=True, help="best values of the searched train keys (yaml)")
    parser.add_argument("--metrics", required=True, help="DVC metrics json of the sweep")
    sys.exit(run(main, parser, load_params))
