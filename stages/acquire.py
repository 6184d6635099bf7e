"""DVC stage `acquire`: fill the raw data folder from the source chosen in params (acquire.source)."""

import sys
from pathlib import Path

from pipeline.data.acquire import acquire
from pipeline.data_config import load_data_params
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    df = acquire(params.acquire, root, Path(args.out))
    print(
        f"acquire: {df.height} images of {df['class_name'].n_unique()} classes from '{params.acquire.source}' "
        f"-> {args.out}"
    )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--out", required=True, help="output folder (images/ + manifest.parquet)")
    sys.exit(run(main, parser, load_data_params))
