"""DVC stage `clean`: decode-verify, convert to RGB, drop duplicates and rare classes; quarantine with reasons."""

import sys
from pathlib import Path

from pipeline.data.clean import clean
from pipeline.io import write_json
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    _, _, counts = clean(params.clean, Path(args.raw), Path(args.out))
    write_json(args.metrics, counts)
    print(f"clean: kept {counts['kept']} of {counts['input']} images, {counts['classes']} classes, "
          f"quarantined {counts['quarantined']} {counts['by_reason']}")


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", required=True, help="acquire output folder")
    parser.add_argument("--out", required=True, help="output folder (images/, manifest.parquet, quarantine.parquet)")
    parser.add_argument("--metrics", required=True, help="counts per reason (DVC metrics json)")
    sys.exit(run(main, parser))
