"""`python -m pipeline predict PATH...`: top-k classes of a trained checkpoint for image files and folders.

An image goes through the steps the training images went through, so that an image of the test split gets here the
prediction the evaluate stage gave it:
  --faces   the faces stage's crop: the best face scoring >= faces.threshold, grown by faces.margin (no confident
            face: the whole image is classified and the face is reported as none);
  clean     decode to RGB on clean.background, optional downscale to clean.resize_short_side (clean.decode);
  model     the checkpoint's evaluation transform (eval_transform of its img_size and data config), softmax.
Settings come from --params (default: params.yaml when present, else the built-in defaults).

--model takes a checkpoint path, a train output folder (default models/cnn: its first seed's model.pt) or
runs:/<run_id>/<artifact path>, downloaded from the project's MLflow store (the train stage logs
runs:/<run_id>/model.pt). --explain DIR writes, for GLSim
checkpoints only, the similarity heatmap + box figure and the crop per image (pipeline/inference/explain.py).
Inputs are checked before the model runs: a missing path, a folder without images or a file that is not an image
stops the command with exit code 2 and a message naming it, before anything is printed or written.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.models.spec import ModelSpec

# torch, timm, PIL and mlflow are imported inside the handler: building the CLI parser must stay light.

DEFAULT_MODEL = "models/cnn"  # the train@cnn output of the default params.yaml (its first seed's model)


def add_predict_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `predict` on the pipeline CLI's subparsers; the handler is args.fn(args) -> exit code."""
    p = sub.add_parser(
        "predict",
        help="top-k classes of a checkpoint for image files and folders",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and/or folders (searched recursively)")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"checkpoint path or runs:/<run_id>/<artifact path> (default {DEFAULT_MODEL})",
    )
    p.add_argument("--top-k", type=_positive, default=5, help="classes per image (default 5; at most all classes)")
    p.add_argument("--json", action="store_true", help="one JSON object per image and line (JSON Lines)")
    p.add_argument(
        "--faces",
        action="store_true",
        help="classify the best anime face (animeface) as the faces stage crops it; reports its box",
    )
    p.add_argument(
        "--explain",
        metavar="DIR",
        type=Path,
        help="GLSim checkpoints: write <name>.gls.png (similarity heatmap + box) and <name>.crop.png",
    )
    p.add_argument("--batch-size", type=_positive, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", help="auto | cpu | cuda[:N] (default: base.device of the params)")
    p.add_argument(
        "--params",
        help="params file for the base, faces and clean settings (default: params.yaml "
        "when present, else the built-in defaults)",
    )
    p.set_defaults(fn=main)
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(args: argparse.Namespace) -> int:
    from pipeline.inference.inputs import PredictError, collect_images, load_model, read_checked, resolve_checkpoint

    params, root = load_params_and_root(args.params)
    files = collect_images(args.paths)
    for f in files:  # every input decodes before the model loads: no half-printed output on a bad file
        read_checked(f, params.clean)
    if args.faces:
        from pipeline.data.faces import load_animeface_detector

        load_animeface_detector()  # the detector's own check (package present, Pillow < 12), before any work

    import torch

    from pipeline.runtime import resolve_device

    try:
        device = resolve_device(args.device or params.base.device)
    except RuntimeError as exc:  # CUDA asked for but absent, or a device name torch does not know
        raise PredictError(f"--device {args.device or params.base.device}: {exc}") from None
    if device.type == "cpu":
        torch.set_num_threads(params.base.threads)
    with tempfile.TemporaryDirectory(prefix="predict-model-") as tmp:  # a downloaded runs:/ checkpoint
        path = resolve_checkpoint(args.model, params.base, root, Path(tmp))
        model, ckpt = load_model(path, args.model, device)
        print(origin_line(args.model, path, params.base, root), file=sys.stderr, flush=True)
    method = ModelSpec.of(ckpt).method
    if args.explain is not None and method != "glsim":
        raise PredictError(
            f"--explain {args.explain}: needs a GLSim checkpoint (train.method: glsim); "
            f"{args.model} is a {method} model, which selects no region to show"
        )

    predictor = Predictor(model, ckpt, device, params.clean, params.faces if args.faces else None)
    names = _ExplainNames(args.explain) if args.explain is not None else None
    k = min(args.top_k, len(predictor.classes))
    for batch in _chunks(files, args.batch_size):
        for result in predictor.predict(batch, k, names):
            print(json.dumps(result) if args.json else format_table(result), flush=True)
    return 0


def origin_line(spec: str, path: Path, base, root: Path) -> str:
    """Which MLflow train run and data version the checkpoint came from (stderr: stdout stays the predictions)."""
    from pipeline import tracking

    run_id = spec.removeprefix("runs:/").split("/", 1)[0] if spec.startswith("runs:/") else None
    origin = tracking.model_origin(base, root, path, run_id)
    if origin is None:
        store = tracking.local_db(base, root) or "MLFLOW_TRACKING_URI"
        return (
            f"model: {spec}: no MLflow train run in {store} wrote this "
            "checkpoint "
            "(trained elsewhere or the store was reset): run and data version unknown"
        )
    dirty = " (uncommitted changes)" if origin["git_dirty"] == "true" else ""
    return (
        f"model: {spec} from MLflow run {origin['run_id']} ({origin['run_name']}), data version "
        f"{origin['data_version'] or 'unknown'} (split manifest md5), code deps {origin['deps_md5'] or 'unknown'}, "
        f"git {origin['git_commit'] or 'unknown'}{dirty}"
    )


def load_params_and_root(path: str | None):
    """(params, project root): the root anchors base.mlflow_dir, as for the stages."""
    from pipeline.config import Params, load_params

    if path is None:
        if not Path("params.yaml").is_file():  # a checkpoint used outside a project: the defaults
            return Params(), Path.cwd()
        path = "params.yaml"
    return load_params(path), Path(path).resolve().parent


def _chunks(items: list, n: int) -> Iterator[list]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class Predictor:
    """A loaded checkpoint with the training data's preprocessing; predict() gives one result dict per image."""

    def __init__(self, model, ckpt: dict, device, clean, faces=None):
        from pipeline.data.transforms import eval_transform

        self.model, self.device, self.clean, self.faces = model.eval(), device, clean, faces
        self.classes: list[str] = list(ckpt["classes"])
        self.data_config = ckpt["data_config"]
        spec = ModelSpec.of(ckpt)
        self.img_size = spec.img_size
        self.glsim = spec.method == "glsim"
        self.transform = eval_transform(self.img_size, self.data_config)  # the evaluate stage's transform

    def prepare(self, path: Path):
        """(RGB uint8 array as clean writes it, face report or None without --faces)."""
        import numpy as np
        from PIL import Image

        from pipeline.data.clean import decode, upright

        data = path.read_bytes()
        if self.faces is None:
            return np.asarray(decode(data, self.clean)[0]), None
        from pipeline.data.faces import crop_box, detect

        original = upright(Image.open(io.BytesIO(data)))[0]  # the box must match decode's upright image
        found = [f for f in detect(original, self.faces) if f.score >= self.faces.threshold]  # best first
        if not found:
            return np.asarray(decode(data, self.clean)[0]), {"box": None, "score": None, "crop": None, "faces_found": 0}
        face = found[0]
        box = crop_box(face.box, original.size, self.faces.margin)
        # RGB first (no resize), then the crop, then clean's downscale: the order of the faces and clean stages.
        full = decode(data, self.clean.model_copy(update={"resize_short_side": None}))[0]
        rgb = full.crop(box)
        if self.clean.resize_short_side:
            buf = io.BytesIO()
            rgb.save(buf, format="PNG")  # lossless: clean.decode applies its own resize rule to the same pixels
            rgb = decode(buf.getvalue(), self.clean)[0]
        return np.asarray(rgb), {
            "box": list(face.box),
            "score": round(face.score, 4),
            "crop": list(box),
            "faces_found": len(found),
        }

    def predict(self, paths: list[Path], k: int, explain: _ExplainNames | None = None) -> list[dict]:
        import torch

        prepared = [self.prepare(p) for p in paths]
        x = torch.stack([self.transform(image=arr)["image"] for arr, _ in prepared]).to(self.device)
        with torch.inference_mode():
            if self.glsim:  # the crops and boxes are kept for --explain
                out = self.model.forward_with_crops(x)
                logits = out.logits
            else:
                out, logits = None, self.model(x)
            top = logits.float().softmax(1).topk(k, dim=1)
        results = []
        for i, path in enumerate(paths):
            result = {
                "path": str(path),
                "top_k": [
                    {"class_name": self.classes[j], "probability": round(float(p), 6)}
                    for p, j in zip(top.values[i].tolist(), top.indices[i].tolist())
                ],
            }
            if self.faces is not None:
                result["face"] = prepared[i][1]
            results.append(result)
        if explain is not None:
            self._explain(x, out, paths, results, explain)
        return results

    def _explain(self, x, out, paths: list[Path], results: list[dict], names: _ExplainNames) -> None:
        from pipeline.inference import explain

        sim, idx = explain.similarity_maps(self.model, x)
        mean, std = self.data_config["mean"], self.data_config["std"]
        for i, (path, result) in enumerate(zip(paths, results)):
            best = result["top_k"][0]
            result["explain"] = explain.save(
                names.stem(path),
                explain.to_image(x[i], mean, std),
                explain.to_image(out.crops[i], mean, std),
                sim[i].cpu().numpy(),
                idx[i].cpu().numpy(),
                out.boxes[i].tolist(),
                self.model,
                f"{path.name}: {best['class_name']} ({best['probability']:.1%})",
            )


class _ExplainNames:
    """Output stems in the --explain folder: the image's stem, with -2, -3, ... when two inputs share it."""

    def __init__(self, folder: Path):
        self.folder, self.used = folder, set()

    def stem(self, path: Path) -> Path:
        name, n = path.stem, 1
        while name in self.used:
            n += 1
            name = f"{path.stem}-{n}"
        self.used.add(name)
        return self.folder / name


def format_table(result: dict) -> str:
    """A readable block per image: path, face (with --faces), rank / class / probability rows, explain files."""
    lines = [result["path"]]
    if "face" in result:  # only with --faces
        face = result["face"]
        lines.append(
            f"  face: box {tuple(face['box'])}, score {face['score']:.2f} ({face['faces_found']} found)"
            if face["box"]
            else "  face: none found, whole image classified"
        )
    width = max(5, *(len(c["class_name"]) for c in result["top_k"]))
    lines.append(f"  {'#':>2}  {'class':<{width}}  probability")
    lines += [
        f"  {rank:>2}  {c['class_name']:<{width}}  {c['probability']:.4f}"
        for rank, c in enumerate(result["top_k"], start=1)
    ]
    if "explain" in result:
        lines.append(f"  explain: {result['explain']['figure']}, {result['explain']['crop']}")
    return "\n".join(lines) + "\n"
