"""DVC stage `evaluate@<variant>`: the selected checkpoint on the test split; metrics to DVC and to its MLflow run."""

import sys
from pathlib import Path

from pipeline.stage_runner import run, stage_parser
from pipeline.training.evaluate import EvalOutputs, evaluate


def main(args, params, root):
    out = EvalOutputs(Path(args.metrics), Path(args.predictions), Path(args.per_class), Path(args.confused_pairs),
                      Path(args.samples))
    evaluate(params, Path(args.split), Path(args.images), Path(args.model), out, root)


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--model", required=True, help="train output folder")
    parser.add_argument("--metrics", required=True, help="DVC metrics json")
    parser.add_argument("--predictions", required=True, help="csv, one row per test image (DVC confusion plot)")
    parser.add_argument("--per-class", required=True, help="csv, one row per class")
    parser.add_argument("--confused-pairs", required=True, help="csv, the most frequent mistakes")
    parser.add_argument("--samples", required=True, help="npz of a few test images for the report")
    sys.exit(run(main, parser))
