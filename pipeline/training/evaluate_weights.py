"""`python -m pipeline evaluate-weights WEIGHTS --split MANIFEST --images DIR --out DIR`: evaluate weights trained
elsewhere (the GLSim authors' `dafb_vit_b16_16_2.pth`, an exported folder) on a manifest's test split.

The weights become a checkpoint of this pipeline (OUT/model/model.pt: the model, the class names in the order of the
weights' head, the evaluation transform) and go through the evaluate stage's own code, so the metrics, per-class
table, confused pairs and samples are those of any trained variant. The head's row i is class i of the weights'
dataset: the manifest's `official_class_id` (DAF:re, CSV sources) names it, or its `class_id`.

For the authors' GLSim and ILA checkpoints the defaults are theirs: ViT-B/16 at the image size their saved config
names (224), GLSim's top-k from it (dynamic_top), the ILA variant their tensors show (ila_authors.py), LayerNorm eps
1e-12, their mean/std, and their test transform (a square resize to their test_resize_size, else int(1.34 x size),
then the centre crop).
"""

from __future__ import annotations

import argparse
from pathlib import Path

AUTHORS_RESIZE = 1.34  # GLSim's test_resize_size = int(image_size * 1.34)


def add_evaluate_weights_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-weights",
        help="evaluate external weights (e.g. the GLSim authors' checkpoints) on a manifest's test split",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "weights",
        metavar="WEIGHTS",
        help="file:PATH, hf-hub:ORG/NAME/FILE (local cache) or local-dir:PATH, as train.weights takes them",
    )
    p.add_argument(
        "--split",
        required=True,
        type=Path,
        help="manifest with a split column (acquire dafre's data/raw/manifest.parquet, or the split stage's)",
    )
    p.add_argument("--images", required=True, type=Path, help="folder the manifest's paths are relative to")
    p.add_argument("--out", required=True, type=Path, help="output folder: model/, metrics.json, predictions ...")
    p.add_argument(
        "--method",
        default=None,
        help="glsim, vit, cnn, ila (default: ila, or vit for a baseline "
        "without ILAs, for the ILA authors' checkpoints, else glsim)",
    )
    p.add_argument("--model", default="vit_base_patch16_224", help="timm name (default vit_base_patch16_224)")
    p.add_argument("--img-size", type=int, help="default: the checkpoint's saved image size, else 224")
    p.add_argument("--top-k", type=int, help="GLSim top-k (default: the checkpoint's dynamic_top, else 8)")
    p.add_argument(
        "--params",
        default=None,
        help="params file for base/evaluate settings (default: params.yaml when present, else the built-in defaults)",
    )
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from pipeline.data import manifest
    from pipeline.inference.predict import load_params_and_root
    from pipeline.models import build_model, save_checkpoint
    from pipeline.models.weights import read_weights
    from pipeline.training.evaluate import EvalOutputs, evaluate

    params, root = load_params_and_root(args.params)
    state, config, _ = read_weights(args.weights, Path.cwd())
    saved = (config or {}).get("authors_glsim") or (config or {}).get("authors_ila") or {}
    variant = (config or {}).get("variant")  # the ILA authors' checkpoints: ila / ila+ / ila++ / vit
    method = args.method or ("glsim" if variant is None else "vit" if variant == "vit" else "ila")
    size = args.img_size or saved.get("image_size") or 224
    head = state.get("head.weight")
    if head is None:
        raise ValueError(f"{args.weights}: the weights have no head.weight: nothing to evaluate as a classifier")
    options = {"layer_norm_eps": 1e-12} if saved else {}
    if method == "glsim":
        options["glsim_top_k"] = args.top_k or saved.get("dynamic_top")
    elif method == "ila" and variant is not None:
        options["ila_variant"] = variant
    model = build_model(method, args.model, head.shape[0], args.weights, size, root=Path.cwd(), **options)
    df = manifest.read(args.split)
    classes = head_classes(df, head.shape[0])
    dcfg = {
        "mean": tuple(model.pretrained_cfg["mean"]),
        "std": tuple(model.pretrained_cfg["std"]),
        "interpolation": "bicubic" if saved else model.pretrained_cfg.get("interpolation", "bicubic"),
    }
    if saved:
        dcfg["eval_resize"] = saved.get("test_resize_size") or int(size * AUTHORS_RESIZE)
    model_dir = args.out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        model_dir / "model.pt",
        model,
        {
            "classes": classes,
            "data_config": dcfg,
            "precision": "fp32",
            "weights": args.weights,
            "model_spec": {"method": method, "model": args.model, "img_size": size},
        },
    )
    metrics = evaluate(
        params, args.split, args.images, model_dir, EvalOutputs.in_folder(args.out / "metrics.json", args.out), root
    )
    print(
        f"evaluate-weights: {args.weights}: test top-1 {metrics['test_top1']:.4f} on {metrics['test_images']} "
        f"images -> {args.out}"
    )
    return 0


def head_classes(df, n: int) -> list[str]:
    """Class names in the order of the weights' head rows (official_class_id, else class_id); ids the manifest
    does not name (classes without images in it) get `class_<id>`."""
    import polars as pl

    column = "official_class_id" if "official_class_id" in df.columns else "class_id"
    pairs = df.select(pl.col(column).cast(pl.Int64), "class_name").unique().sort(column)
    names = dict(pairs.iter_rows())
    beyond = [i for i in names if not 0 <= i < n]
    if beyond:
        raise ValueError(
            f"{column} {beyond[:5]} of the manifest is outside the weights' {n} head rows: weights of another dataset?"
        )
    return [names.get(i, f"class_{i}") for i in range(n)]
