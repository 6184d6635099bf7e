"""Frozen-feature linear probe on the split manifest: how good are a backbone's features, without fine-tuning?

Features are computed once at the eval transform (pipeline/data/transforms.eval_transform): for a ViT the CLS token
and the mean patch token (after the final norm; DINO's probe input), for the teacher CNN its pooled head features.
They are standardised with the train split's statistics and a multinomial logistic regression is fit on the train
split by full-batch L-BFGS; its L2 strength is chosen on the val split from PROBE_L2 and the test split (the embedded
set's held-out artist) is scored once, with that strength.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.config import Params

log = logging.getLogger(__name__)

PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # candidate L2 strengths (on standardised features), chosen on val


def features(model, kind: str, x):
    """kind: vit (CLS + mean patch token), vit_cls (CLS only) or cnn (pooled features)."""
    import torch

    if kind == "cnn":
        return model.forward_head(model.forward_features(x), pre_logits=True)
    tokens = model.forward_features(x)
    cls = tokens[:, 0]
    if kind == "vit_cls":
        return cls
    return torch.cat([cls, tokens[:, model.num_prefix_tokens :].mean(1)], dim=1)


def embed_split(model, kind: str, df, image_root: Path, img_size: int, batch_size: int = 64):
    import torch

    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.transforms import data_config, eval_transform

    ds = ManifestDataset(df, image_root, eval_transform(img_size, data_config(model)))
    out, labels = [], []
    with torch.inference_mode():
        for start in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            out.append(features(model, kind, torch.stack([x for x, _ in items])).float())
            labels += [y for _, y in items]
    return torch.cat(out), torch.tensor(labels)


def fit_probe(x, y, num_classes: int, l2: float, iters: int = 200):
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe(model, kind: str, df, image_root: Path, img_size: int) -> dict:
    """{'val_top1', 'test_top1', 'l2', 'dim'} of the best-on-val probe (accuracies in %)."""
    import torch

    splits = {s: df.filter(df["split"] == s) for s in ("train", "val", "test")}
    if any(d.height == 0 for d in splits.values()):
        raise ValueError("probe: the split manifest needs train, val and test rows")
    num_classes = int(df["class_id"].max()) + 1
    model.eval()
    feats = {s: embed_split(model, kind, d, image_root, img_size) for s, d in splits.items()}
    mean, std = feats["train"][0].mean(0), feats["train"][0].std(0) + 1e-6
    norm = {s: ((x - mean) / std, y) for s, (x, y) in feats.items()}

    def top1(head, s):
        x, y = norm[s]
        with torch.no_grad():
            return 100.0 * float((head(x).argmax(1) == y).float().mean())

    best = None
    for l2 in PROBE_L2:
        head = fit_probe(*norm["train"], num_classes, l2)
        val = top1(head, "val")
        if best is None or val > best[0]:
            best = (val, l2, head)
    val, l2, head = best
    return {
        "val_top1": round(val, 2),
        "test_top1": round(top1(head, "test"), 2),
        "l2": l2,
        "dim": int(feats["train"][0].shape[1]),
    }


def student_from_file(name: str, weights: Path, img_size: int):
    from pipeline.models.factory import build_model

    # num_classes 1000: the exported ImageNet head loads too, so a missing tensor is an error, not a silent skip.
    return build_model("vit", name, 1000, f"file:{weights}", img_size)


def teacher_model():
    from pipeline.models.factory import build_model

    return build_model("cnn", "tf_efficientnet_lite0", 1000, "package:efficientnet_lite0")


def add_arguments(p) -> None:
    p.add_argument("--split", default="data/split/manifest.parquet", help="split manifest (.parquet)")
    p.add_argument("--images", default="data/clean", help="folder the manifest paths are relative to")
    p.add_argument("--weights", default=None, help="student safetensors (default: weights/<pretrain.name>)")
    p.add_argument("--out", default=None, help="optional json file for the table")


def main(args, params: Params, root: Path) -> list[dict]:
    import torch

    from pipeline.data import manifest
    from pipeline.io import write_json

    torch.set_num_threads(params.base.threads)
    cfg = params.pretrain
    df = manifest.read(args.split)
    weights = Path(args.weights) if args.weights else root / "weights" / f"{cfg.name}.safetensors"
    student = student_from_file(cfg.student, weights, cfg.img_size)
    rows = []
    for label, model, kind in (
        (f"{cfg.teacher} (teacher, pooled)", teacher_model(), "cnn"),
        (f"{weights.stem} (CLS + mean patch)", student, "vit"),
        (f"{weights.stem} (CLS)", student, "vit_cls"),
    ):
        rows.append({"model": label, **probe(model, kind, df, Path(args.images), cfg.img_size)})
    print("| features | dim | val top-1 % | held-out test top-1 % | L2 |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dim']} | {r['val_top1']} | {r['test_top1']} | {r['l2']} |")
    if args.out:
        write_json(args.out, rows)
    return rows
