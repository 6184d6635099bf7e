"""DVC stage `check_params`: validate the whole params.yaml before any stage runs.

DVC deletes a stage's outputs before running it, so a stage that refuses its params has already lost them (metrics
tracked by git included). This stage depends on every param and runs first; when params.yaml is invalid it fails,
and `dvc repro` stops before any other stage touches its outputs. Its output is a constant file, so a valid edit
re-runs this stage without invalidating the stages after it. Every key a stage declares in dvc.yaml must exist in
params.yaml (DVC would stop at that stage, after deleting its outputs), even where the stage has a default.
"""

import sys

from pipeline.config import check_declared, load_params
from pipeline.io import write_text
from pipeline.stage_runner import run, stage_parser

OK = "params.yaml: valid\n"  # constant: downstream stages see an unchanged dependency after a valid edit


def main(args, params, root):
    check_declared(args.params, root / "dvc.yaml")  # a section a stage declares but params.yaml lacks
    write_text(args.out, OK)


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="the constant file written when params.yaml is valid")
    sys.exit(run(main, parser, load_params))
