"""`python -m pipeline <command>`: the command line for people (the DVC stages live in stages/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ParamsError, flatten, load_params


def _check_params(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    print(f"{args.params}: OK ({len(flatten(params))} keys)")
    return 0


def _acquire(args: argparse.Namespace) -> int:
    from pipeline.config import AcquireParams
    from pipeline.data.acquire import acquire

    if args.source == "folder" and not args.path:
        raise ParamsError("--path: required for the folder source (a <class>/<image> tree)")
    section = {"embedded": {"path": args.path} if args.path else {}, "folder": {"path": args.path}}[args.source]
    cfg = AcquireParams.model_validate({"source": args.source, args.source: section})
    root = Path.cwd()
    if args.source == "folder" and not (root / args.path).is_dir():
        raise ParamsError(f"--path: folder {args.path!r} does not exist")
    df = acquire(cfg, root, Path(args.out))
    print(f"acquire: {df.height} images, {df['class_name'].n_unique()} classes -> {args.out}/manifest.parquet")
    return 0


def _build_emoji(args: argparse.Namespace) -> int:
    from pipeline.data import emoji_build

    return emoji_build.main(args.extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-params", help="validate params.yaml and exit")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_check_params)

    p = sub.add_parser("acquire", help="run one acquisition source into a folder (images + manifest.parquet)")
    p.add_argument("source", choices=["embedded", "folder"])
    p.add_argument("--path", help="embedded: dataset folder (default datasets/emoji); folder: <class>/<image> root")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_acquire)

    # Its own options (--packages, --out, ...) are parsed by pipeline.data.emoji_build.main.
    p = sub.add_parser("build-emoji", help="rebuild datasets/emoji from the unpacked font/image packages",
                       add_help=False)
    p.set_defaults(fn=_build_emoji)

    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "build-emoji":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    try:
        return args.fn(args)
    except (ParamsError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
