"""DVC stage `evaluate`: the selected checkpoint on the test split; metrics to DVC and to the MLflow run."""

import sys
from pathlib import Path

from pipeline.stage_runner import run, stage_parser
from pipeline.training.evaluate import evaluate


def main(args, params, root):
    evaluate(params, Path(args.split), Path(args.images), Path(args.model), Path(args.metrics), Path(args.plots), root)


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--model", required=True, help="train output folder")
    parser.add_argument("--metrics", required=True, help="DVC metrics json")
    parser.add_argument("--plots", required=True, help="folder for predictions.csv and per_class.csv")
    sys.exit(run(main, parser))
