"""DVC stage `report`: Markdown report + PNG plots from what the earlier stages stored (no recomputation)."""

import sys
from pathlib import Path

from pipeline.report import ReportInputs, build_report, log_to_mlflow
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    metrics = {name: Path(args.metrics_dir) / f"{name}.json" for name in ("clean", "split", "train", "evaluate")}
    inputs = ReportInputs(Path(args.split), Path(args.images), Path(args.images) / "quarantine.parquet",
                          Path(args.model), Path(args.plots) / "train_history.csv",
                          Path(args.plots) / "per_class.csv", Path(args.plots) / "predictions.csv", metrics)
    out = build_report(params, inputs, Path(args.out))
    log_to_mlflow(params, Path(args.out), Path(args.model), root)
    print(f"report: {out}")


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--model", required=True, help="train output folder")
    parser.add_argument("--metrics-dir", required=True)
    parser.add_argument("--plots", required=True)
    parser.add_argument("--out", required=True)
    sys.exit(run(main, parser))
