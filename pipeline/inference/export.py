"""`python -m pipeline export MODEL_DIR --format hf|onnx --out DIR`: share a trained model outside the pipeline.

- hf: the timm / Hugging Face folder: config.json (timm's architecture, num_classes, label_names, pretrained_cfg with
  mean/std, plus this pipeline's model spec under `anime_fgvc`), model.safetensors (the model's state dict: timm's own
  names for cnn/vit, GLSimViT's / ILAViT's `vit.*` names for glsim/ila) and README.md, a model card with the metrics,
  data, recipe and seed. `train.weights: local-dir:DIR` reads it back (the aggregator and head of GLSim too).
- onnx: model.onnx (input `image`: normalised float32 (B, 3, S, S), batch dynamic; outputs `logits`, and for GLSim
  `boxes` too) through torch.export (`torch.onnx.export(dynamo=True)`), plus preprocess.json (size, resize, mean,
  std, class names). Before the folder is written, onnxruntime runs the exported graph beside PyTorch on check
  images: a logit difference above 1e-3, another top-1 or, for GLSim, another crop box is an error. GLSim's box
  depends on the image (top-k of the similarities, then min/max); it is exported as computed ops, never as a
  constant, and the box check is what proves it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.models.spec import ModelSpec

MAX_LOGIT_DIFF = 1e-3  # onnxruntime vs PyTorch, on the check images
FORMATS = ("hf", "onnx")


class ExportError(ValueError):
    """The model cannot be exported, or the export does not compute what the PyTorch model computes."""


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a trained model as a timm/HF folder or an ONNX file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a train output folder (model.pt, config.yaml)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="output folder (new, empty or an earlier export)")
    p.add_argument(
        "--check-images",
        nargs="*",
        default=None,
        metavar="PATH",
        help="onnx: images (files/folders) to compare onnxruntime with PyTorch on (default: 4 seeded random inputs)",
    )
    p.add_argument(
        "--metrics",
        nargs="*",
        type=Path,
        default=None,
        metavar="JSON",
        help="hf: metrics files for the model card (default: metrics/train/<name>.json and "
        "metrics/evaluate/<name>.json of the project, when present)",
    )
    p.set_defaults(fn=main)


def main(args: argparse.Namespace) -> int:
    from pipeline import outdir

    model_dir = Path(args.model_dir)
    if not (model_dir / "model.pt").is_file():
        raise ExportError(f"MODEL_DIR {model_dir}: no model.pt (a train output folder, e.g. models/glsim/seed42)")
    root = Path.cwd()
    with outdir.replace_folder(Path(args.out), "export", project=root, inputs=[("MODEL_DIR", model_dir)]) as tmp:
        if args.format == "hf":
            variant = model_dir.parent.name if model_dir.name.startswith("seed") else model_dir.name  # <v>/seed<N>
            metrics = args.metrics if args.metrics is not None else _default_metrics(root, variant)
            export_hf(model_dir, tmp, metrics)
        else:
            report = export_onnx(model_dir, tmp, args.check_images)
            print(
                f"export onnx: onnxruntime vs PyTorch on {report['images']} check images: max |logit diff| "
                f"{report['max_abs_logit_diff']:.2e}, top-1 identical, "
                + ("crop boxes identical" if "boxes_identical" in report else "no crop")
            )
    print(f"export {args.format}: {model_dir} -> {args.out}")
    return 0


def _default_metrics(root: Path, name: str) -> list[Path]:
    return [
        p
        for p in (root / "metrics" / "train" / f"{name}.json", root / "metrics" / "evaluate" / f"{name}.json")
        if p.is_file()
    ]


def _load(model_dir: Path):
    from pipeline.models import load_checkpoint

    model, ckpt = load_checkpoint(model_dir / "model.pt")
    return model.eval(), ckpt


def hf_config(model, ckpt: dict) -> dict:
    """timm's config.json keys (what timm's save_for_hf writes and its hub loader reads) plus this pipeline's spec."""
    spec, dcfg = ModelSpec.of(ckpt), ckpt["data_config"]
    size = spec.img_size or 224
    pretrained_cfg = {
        "input_size": [3, size, size],
        "mean": list(dcfg["mean"]),
        "std": list(dcfg["std"]),
        "interpolation": dcfg.get("interpolation", "bicubic"),
        "classifier": "head",
        "num_classes": len(ckpt["classes"]),
    }
    if "eval_resize" in dcfg:
        pretrained_cfg["crop_pct"] = round(size / dcfg["eval_resize"], 6)
        pretrained_cfg["crop_mode"] = "squash"  # a square resize, then the centre crop (GLSim's test transform)
    return {
        "architecture": spec.model.split(".", 1)[0],
        "num_classes": len(ckpt["classes"]),
        "num_features": getattr(model, "num_features", None)
        or getattr(getattr(model, "vit", None), "num_features", None),
        "label_names": list(ckpt["classes"]),
        "pretrained_cfg": pretrained_cfg,
        "anime_fgvc": {
            "format": ckpt["format"],
            "model_spec": spec.as_dict(),
            "data_config": dcfg,
            "precision": ckpt.get("precision", "fp32"),
            "epoch": ckpt.get("epoch"),
        },
    }


def export_hf(model_dir: Path, out: Path, metrics: list[Path]) -> None:
    from safetensors.torch import save_file

    from pipeline.inference.model_card import model_card
    from pipeline.io import atomic_path, md5_file, write_json, write_text

    model, ckpt = _load(model_dir)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = hf_config(model, ckpt)
    write_json(out / "config.json", config)
    card = model_card(
        model_dir, config, [(p, json.loads(p.read_text())) for p in metrics], md5_file(model_dir / "model.pt")
    )
    write_text(out / "README.md", card)
    if (model_dir / "config.yaml").is_file():
        write_text(out / "training_config.yaml", (model_dir / "config.yaml").read_text())


def _with_boxes(model):
    """GLSimViT as a module whose exported graph returns (logits, boxes); torch is imported only when exporting."""
    import torch

    class WithBoxes(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner.forward_with_crops(x)
            return out.logits, out.boxes

    return WithBoxes(model).eval()


def export_onnx(model_dir: Path, out: Path, check_images: list[str] | None) -> dict:
    import torch

    model, ckpt = _load(model_dir)
    spec = ModelSpec.of(ckpt)
    glsim = spec.method == "glsim"
    net = _with_boxes(model) if glsim else model
    x = check_batch(ckpt, check_images)
    names = ["logits", "boxes"] if glsim else ["logits"]
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            net,
            (x,),
            dynamo=True,
            input_names=["image"],
            output_names=names,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        program.save(str(out / "model.onnx"))
    except Exception as exc:  # noqa: BLE001 - the exporter's own reason is the message
        what = (
            "GLSim's data-dependent crop (top-k similarities -> box -> grid_sample) could not be captured as "
            "graph ops by torch.export"
            if glsim
            else f"{spec.method} {spec.model}"
        )
        raise ExportError(f"export onnx: {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:600]}") from None
    report = compare_onnx(net, out / "model.onnx", x, names)
    from pipeline.io import write_json

    dcfg = ckpt["data_config"]
    write_json(
        out / "preprocess.json",
        {
            "input": "image",
            "outputs": names,
            "img_size": spec.img_size,
            "eval_resize": dcfg.get("eval_resize"),
            "mean": list(dcfg["mean"]),
            "std": list(dcfg["std"]),
            "interpolation": dcfg.get("interpolation"),
            "label_names": list(ckpt["classes"]),
            "check": report,
        },
    )
    return report


def compare_onnx(net, path: Path, x, names: list[str]) -> dict:
    """onnxruntime against PyTorch on the same batch; an ExportError when they disagree."""
    import numpy as np
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {"image": x.numpy()})
    with torch.no_grad():
        want = net(x)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    diff = float(np.abs(got[0] - want[0]).max())
    report = {"images": int(x.shape[0]), "max_abs_logit_diff": diff}
    if diff > MAX_LOGIT_DIFF:
        raise ExportError(
            f"export onnx: onnxruntime's logits differ from PyTorch's by up to {diff:.3g} (limit {MAX_LOGIT_DIFF})"
        )
    if not np.array_equal(got[0].argmax(1), want[0].argmax(1)):
        raise ExportError("export onnx: onnxruntime's top-1 class differs from PyTorch's on some check images")
    if len(names) == 2:
        if not np.array_equal(got[1], want[1]):
            raise ExportError(
                "export onnx: the exported graph computes other GLSim crop boxes than PyTorch "
                f"(onnxruntime {got[1].tolist()} vs {want[1].tolist()}): the box must follow the "
                "image, not be a constant of the traced example"
            )
        report["boxes_identical"] = True
        report["distinct_boxes"] = len({tuple(b) for b in want[1].tolist()})
    return report


def check_batch(ckpt: dict, check_images: list[str] | None):
    """The check images through the evaluation transform, or 4 seeded random inputs."""
    import numpy as np
    import torch

    size = ModelSpec.of(ckpt).img_size or 224
    if not check_images:
        return torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    from pipeline.config import CleanParams
    from pipeline.data.clean import decode
    from pipeline.data.transforms import eval_transform
    from pipeline.inference.inputs import collect_images, read_checked

    transform = eval_transform(size, ckpt["data_config"])
    clean = CleanParams()
    files = collect_images(check_images)
    arrays = [np.asarray(decode(read_checked(f, clean), clean)[0]) for f in files]
    return torch.stack([transform(image=a)["image"] for a in arrays]).float()
