"""DVC stage `train@<variant>`: train one variant once per seed in base.seeds on the train split, select on val,
track each seed's run in MLflow under one parent run; metrics/train/<v>.json holds the mean over seeds."""

import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.stage_runner import run, stage_parser
from pipeline.training.seed_runs import TrainSeedOutputs, train_seeds
from pipeline.tuning.best import apply_best, read_best


def main(args, params, root):
    if params.tune.apply:  # the tune stage's best values replace the searched train keys (validated as train.*)
        tuned = read_best(Path(args.tuned))
        params = apply_best(params, tuned, args.tuned)
        print(f"train: tuned values from {args.tuned}: {', '.join(f'{k}={v}' for k, v in tuned.items())}")
    variant = args.variant or "train"
    if args.variant:  # the variant's own keys win over the (tuned) train section
        params = params.with_variant(args.variant)
    out = TrainSeedOutputs(Path(args.out), Path(args.metrics), Path(args.seed_metrics), Path(args.history))
    train_seeds(params, Path(args.split), Path(args.images), out, root, variant)


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--variant", help="a name under `variants:` in params.yaml; default: the train section as is")
    parser.add_argument("--out", required=True, help="model folder: one seed<N>/ (model.pt, config.yaml) per seed")
    parser.add_argument("--metrics", required=True, help="DVC metrics json: the mean over seeds, and per seed")
    parser.add_argument("--seed-metrics", required=True, help="folder: one seed<N>.json metrics file per seed")
    parser.add_argument("--history", required=True, help="folder: one seed<N>.csv per-epoch history per seed")
    parser.add_argument(
        "--tuned", default="best_params.yaml", help="the tune stage's best values, used when tune.apply is true"
    )
    sys.exit(run(main, parser, load_params))
