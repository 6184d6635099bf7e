"""DVC stage `evaluate@<variant>`: each seed's selected checkpoint on the test split; per-seed metrics and tables,
and metrics/evaluate/<v>.json with the mean, std and per-seed values over base.seeds (also on the MLflow parent)."""

import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.stage_runner import run, stage_parser
from pipeline.training.evaluate import EvalSeedOutputs, evaluate_seeds


def main(args, params, root):
    out = EvalSeedOutputs(
        Path(args.metrics),
        Path(args.seed_metrics),
        Path(args.predictions),
        Path(args.per_class),
        Path(args.confused_pairs),
        Path(args.samples),
    )
    evaluate_seeds(params, Path(args.split), Path(args.images), Path(args.model), out, root)


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--model", required=True, help="train output folder (one seed<N>/ per seed)")
    parser.add_argument("--metrics", required=True, help="DVC metrics json: the mean over seeds, and per seed")
    parser.add_argument("--seed-metrics", required=True, help="folder: one seed<N>.json per seed")
    parser.add_argument("--predictions", required=True, help="folder: seed<N>.csv, one row per test image")
    parser.add_argument("--per-class", required=True, help="folder: seed<N>.csv, one row per class")
    parser.add_argument("--confused-pairs", required=True, help="folder: seed<N>.csv, the most frequent mistakes")
    parser.add_argument("--samples", required=True, help="folder: seed<N>.npz, a few test images for the report")
    sys.exit(run(main, parser, load_params))
