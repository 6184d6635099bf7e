"""`python -m pipeline <command>`: the command line for people (the DVC stages live in stages/)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ParamsError, check_declared, flatten, load_params, not_a_folder
from pipeline.stage_runner import KNOWN_ERRORS


def _check_params(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    check_declared(args.params, Path(args.params).resolve().parent / "dvc.yaml")
    print(f"{args.params}: OK ({len(flatten(params))} keys)")
    return 0


def _acquire(args: argparse.Namespace) -> int:
    from pipeline.config import AcquireParams, validate_section
    from pipeline.data.acquire import acquire

    section = args.section_from_cli(args)
    cfg = validate_section(
        AcquireParams, {"source": args.source, args.source: section}, "the command line", prefix="acquire."
    )
    root = Path.cwd()
    path = getattr(getattr(cfg, args.source), "path", None)
    if path is not None and not (root / path).is_dir():
        raise ParamsError(f"--path: {not_a_folder(root, path)}")
    df = acquire(cfg, root, Path(args.out))
    print(f"acquire: {df.height} images, {df['class_name'].n_unique()} classes -> {args.out}/manifest.parquet")
    return 0


def _add_acquire_parsers(sub) -> None:
    """`acquire <source> --out DIR ...`: each source module declares its own flags (add_cli_arguments) and turns
    them into its params section (section_from_cli), so the command line and params.yaml share one validation."""
    import importlib

    p = sub.add_parser("acquire", help="run one acquisition source into a folder (images + manifest.parquet)")
    sources = p.add_subparsers(dest="source", required=True)
    for name, module in (
        ("embedded", "acquire"),
        ("folder", "acquire"),
        ("csv", "labelcsv"),
        ("dafre", "dafre"),
        ("danbooru", "danbooru"),
    ):
        try:
            mod = importlib.import_module(f"pipeline.data.{module}")
        except ModuleNotFoundError as exc:  # a source still being built is simply not offered
            if exc.name != f"pipeline.data.{module}":
                raise
            continue
        suffix = f"_{name}" if module == "acquire" else ""
        help_text = mod.CLI_HELP[name] if isinstance(mod.CLI_HELP, dict) else mod.CLI_HELP
        sp = sources.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--out", required=True, help="output folder: images + manifest.parquet (paths relative)")
        getattr(mod, f"add_cli_arguments{suffix}")(sp)
        sp.set_defaults(fn=_acquire, section_from_cli=getattr(mod, f"section_from_cli{suffix}"))


def _pretrain(args: argparse.Namespace) -> int:
    from pipeline.pretrain import run

    run.main(args, load_params(args.params), Path(args.params).resolve().parent)
    return 0


def _probe(args: argparse.Namespace) -> int:
    from pipeline.pretrain import probe

    probe.main(args, load_params(args.params), Path(args.params).resolve().parent)
    return 0


def _add_pretrain_parsers(sub) -> None:
    from pipeline.pretrain import probe, run  # light: torch is imported when the command runs

    p = sub.add_parser("pretrain", help="distil the offline Lite0 into a ViT (params section pretrain)")
    p.add_argument("--params", default="params.yaml")
    run.add_arguments(p)
    p.set_defaults(fn=_pretrain)
    p = sub.add_parser("probe", help="frozen-feature linear probe on the embedded split: weights vs the teacher")
    p.add_argument("--params", default="params.yaml")
    probe.add_arguments(p)
    p.set_defaults(fn=_probe)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-params", help="validate params.yaml and exit")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(fn=_check_params)

    _add_acquire_parsers(sub)

    from pipeline.training.bench import add_bench_parser  # light: torch is imported when the command runs

    add_bench_parser(sub)

    from pipeline.models.profile import add_profile_parser

    add_profile_parser(sub)

    from pipeline.inference.predict import add_predict_parser  # light: torch is imported when the command runs

    add_predict_parser(sub)

    from pipeline.inference.export import add_export_parser  # light: torch is imported when the command runs

    add_export_parser(sub)

    from pipeline.training.evaluate_weights import add_evaluate_weights_parser  # light, as above

    add_evaluate_weights_parser(sub)
    _add_pretrain_parsers(sub)

    from pipeline.gpu_check import add_gpu_check_parser  # light: torch is imported when the command runs

    add_gpu_check_parser(sub)

    from pipeline.stage_deps import add_stage_deps_parser

    add_stage_deps_parser(sub)

    from pipeline.verify import add_verify_parser

    add_verify_parser(sub)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KNOWN_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
