"""DVC stage `faces`: crop anime faces (animeface) or, disabled, pass the images through; rejections with reasons."""

import sys
from pathlib import Path

from pipeline.data.faces import faces
from pipeline.data_config import load_data_params
from pipeline.io import write_json
from pipeline.stage_runner import run, stage_parser


def main(args, params, root):
    _, metrics = faces(params.faces, Path(args.raw), Path(args.out))
    write_json(args.metrics, metrics)
    if not metrics["enabled"]:
        print(f"faces: disabled, passed {metrics['input']} images through (hard links)")
        return
    print(
        f"faces: kept {metrics['kept']} of {metrics['input']} images ({metrics['faces_kept']} face crops), "
        f"rejected {metrics['rejected']} {metrics['by_reason']}, {metrics['mean_detect_s']} s/image detection"
    )


if __name__ == "__main__":
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", required=True, help="acquire output folder")
    parser.add_argument(
        "--out", required=True, help="output folder (images or shards, manifest.parquet, rejected.parquet)"
    )
    parser.add_argument("--metrics", required=True, help="counts, rejections by reason, timing (DVC metrics json)")
    sys.exit(run(main, parser, load_data_params))
