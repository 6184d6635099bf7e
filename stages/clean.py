"""DVC stage `clean`: decode-verify, convert to RGB, drop duplicates and rare classes, group near-duplicates;
quarantine with reasons."""

import sys
from pathlib import Path

from pipeline.data.clean import clean
from pipeline.data_config import load_data_params
from pipeline.io import write_json
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    _, _, counts = clean(params.clean, Path(args.raw), Path(args.out))
    write_json(args.metrics, counts)
    near = counts["near_dup"]
    print(
        f"clean: kept {counts['kept']} of {counts['input']} images, {counts['classes']} classes, "
        f"quarantined {counts['quarantined']} {counts['by_reason']}; near-duplicate groups {near['groups']} "
        f"({near['images']} images)"
    )
    if near["capped_buckets"]:
        print(
            f"clean: {near['capped_buckets']} pHash band buckets were too large to compare exhaustively "
            "(see pipeline/data/dedup.py); some near-duplicates there may be missed",
            file=sys.stderr,
        )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", required=True, help="input folder (manifest.parquet + images or shards)")
    parser.add_argument(
        "--out", required=True, help="output folder (images/ or shards/, manifest.parquet, quarantine.parquet)"
    )
    parser.add_argument("--metrics", required=True, help="counts per reason (DVC metrics json)")
    sys.exit(run(main, parser, load_data_params))
