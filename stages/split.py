"""DVC stage `split`: deterministic train/val/test assignment (split.strategy), with its guarantees checked."""

import sys
from pathlib import Path

from pipeline.data import manifest
from pipeline.data.split import split
from pipeline.io import write_json
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    df, counts = split(manifest.read(args.clean), params.split, params.base.seed)
    manifest.write(df, Path(args.out))
    write_json(args.metrics, counts)
    print(f"split ({params.split.strategy}): {counts['images']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--clean", required=True, help="clean output folder (its manifest.parquet)")
    parser.add_argument("--out", required=True, help="split manifest file (.parquet)")
    parser.add_argument("--metrics", required=True, help="counts per split (DVC metrics json)")
    sys.exit(run(main, parser))
