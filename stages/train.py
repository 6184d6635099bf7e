"""DVC stage `train@<variant>`: train one variant of params.train on the train split, select on val, track in MLflow."""

import sys
from pathlib import Path

from pipeline.stage_runner import run, stage_parser
from pipeline.training.engine import TrainOutputs, train
from pipeline.tuning.best import apply_best, read_best


def main(args, params, root):
    if params.tune.apply:  # the tune stage's best values replace the searched train keys (validated as train.*)
        tuned = read_best(Path(args.tuned))
        params = apply_best(params, tuned, args.tuned)
        print(f"train: tuned values from {args.tuned}: {', '.join(f'{k}={v}' for k, v in tuned.items())}")
    name, tags = None, None
    if args.variant:  # the variant's own keys win over the (tuned) train section
        params = params.with_variant(args.variant)
        name, tags = f"{args.variant} ({params.train.method}/{params.train.model})", {"variant": args.variant}
    outputs = TrainOutputs(Path(args.out), Path(args.metrics), Path(args.history))
    train(params, Path(args.split), Path(args.images), outputs, root, run_name=name, tags=tags)


if __name__ == "__main__":
    parser = stage_parser(__doc__, reads_split=True)
    parser.add_argument("--variant", help="a name under `variants:` in params.yaml; default: the train section as is")
    parser.add_argument("--out", required=True, help="model folder (model.pt, run.json, config.yaml)")
    parser.add_argument("--metrics", required=True, help="DVC metrics json")
    parser.add_argument("--history", required=True, help="per-epoch history csv (DVC plots)")
    parser.add_argument("--tuned", default="best_params.yaml",
                        help="the tune stage's best values, used when tune.apply is true")
    sys.exit(run(main, parser))
