"""DVC stage `split`: deterministic train/val/test assignment (split.strategy), with its guarantees checked."""

import sys
from pathlib import Path

from pipeline.data import manifest
from pipeline.data.split import per_class_counts, split
from pipeline.data_config import load_data_params
from pipeline.io import atomic_path, write_json
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    df, counts = split(manifest.read(args.clean), params.split, params.base.seed)
    manifest.write(df, Path(args.out))
    write_json(args.metrics, counts)
    if args.per_class:  # 3,263 rows for DAF:re: a CSV beside the metrics json rather than inside it
        with atomic_path(args.per_class) as tmp:
            per_class_counts(df).write_csv(tmp)
    print(
        f"split ({params.split.strategy}): {counts['images']}, classes {counts['classes']}, "
        f"near-duplicate rows moved {counts['dup_group_moves']}"
    )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--clean", required=True, help="clean output folder (its manifest.parquet)")
    parser.add_argument("--out", required=True, help="split manifest file (.parquet)")
    parser.add_argument("--metrics", required=True, help="counts per split (DVC metrics json)")
    parser.add_argument(
        "--per-class", help="optional CSV: images per class and split (class_id, class_name, train, val, test, total)"
    )
    sys.exit(run(main, parser, load_data_params))
