"""DVC stage `report`: Markdown + HTML report comparing every variant, from what earlier stages stored."""

import sys
from pathlib import Path

from pipeline.config import load_params
from pipeline.io import write_json
from pipeline.report import ReportInputs, build_report, log_to_mlflow
from pipeline.stage_runner import run, stage_parser
from pipeline.verify import environment


def main(args, params, root):
    inputs = ReportInputs(
        Path(args.split), Path(args.images), Path(args.models), Path(args.metrics_dir), Path(args.plots)
    )
    out, results = build_report(params, inputs, Path(args.out))
    write_json(Path(args.environment), environment())  # the machine the committed results were made on
    run_id = log_to_mlflow(params, Path(args.out), results, root)
    print(f"report: {out} and {out.with_suffix('.html')} ({len(results)} variants), MLflow run {run_id}")


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--models", required=True, help="folder of the train stages' models/<variant>/")
    parser.add_argument("--metrics-dir", required=True, help="metrics/ (clean.json, train/ and evaluate/)")
    parser.add_argument("--plots", required=True, help="plots/ (history/, predictions/, per_class/, ...)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--environment", required=True, help="json: CPU, instruction set and library versions")
    sys.exit(run(main, parser, load_params))
