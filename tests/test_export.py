"""`python -m pipeline export`: the HF folder reads back through train.weights: local-dir with identical predictions;
the ONNX file, run by onnxruntime on the committed test images, matches PyTorch (GLSim's crop box included)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main as cli
from pipeline.config import Params
from pipeline.models import build_model, save_checkpoint

IMAGES = Path(__file__).parent / "fixtures" / "renpy"  # the committed test images
MODEL, IMG = "test_vit", 64  # timm's 6-block, 64-wide test ViT: the real key names, a fast export
CLASSES = [f"character_{i}" for i in range(6)]
OPTIONS = {"glsim_top_k": 3}


def _model_dir(tmp_path: Path, method: str) -> Path:
    """A train output folder as the train stage writes it: model.pt (random weights, no zero head) + config.yaml."""
    torch.manual_seed(0)
    model = build_model(method, MODEL, len(CLASSES), "none", IMG, **(OPTIONS if method == "glsim" else {}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.3)
    folder = tmp_path / "models" / method
    folder.mkdir(parents=True)
    dcfg = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic", "eval_resize": 85}
    save_checkpoint(
        folder / "model.pt",
        model,
        {
            "classes": CLASSES,
            "data_config": dcfg,
            "precision": "fp32",
            "epoch": 4,
            "model_spec": {"method": method, "model": MODEL, "img_size": IMG},
        },
    )
    params = Params().model_dump(mode="json", exclude={"variants"})
    params["train"] |= {"method": method, "model": MODEL, "img_size": IMG}
    (folder / "config.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "metrics" / "evaluate").mkdir(parents=True)
    (tmp_path / "metrics" / "evaluate" / f"{method}.json").write_text(json.dumps({"test_top1": 0.4321}))
    return folder


def _images(model_dir: Path) -> torch.Tensor:
    from pipeline.inference.export import check_batch
    from pipeline.models import load_checkpoint

    _, ckpt = load_checkpoint(model_dir / "model.pt")
    return check_batch(ckpt, [str(IMAGES)])


@pytest.mark.parametrize("method", ["vit", "glsim"])
def test_hf_export_reads_back_through_local_dir_with_identical_predictions(tmp_path, monkeypatch, method):
    from pipeline.models import load_checkpoint

    monkeypatch.chdir(tmp_path)
    model_dir = _model_dir(tmp_path, method)
    assert cli(["export", str(model_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    out = tmp_path / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == MODEL and config["label_names"] == CLASSES
    card = (out / "README.md").read_text()
    assert "| test_top1 | 0.4321 |" in card and "`base.seed`: 42" in card and f"`train.method`: {method}" in card
    assert (out / "model.safetensors").is_file() and (out / "training_config.yaml").is_file()

    original, _ = load_checkpoint(model_dir / "model.pt")
    reloaded = build_model(
        method, MODEL, len(CLASSES), f"local-dir:{out}", IMG, **(OPTIONS if method == "glsim" else {})
    ).eval()
    x = _images(model_dir)
    with torch.no_grad():
        assert torch.equal(reloaded(x), original(x))
    assert tuple(reloaded.pretrained_cfg["mean"]) == (0.5, 0.5, 0.5)  # the data pipeline normalises the same way


@pytest.mark.parametrize("method", ["vit", "glsim"])
def test_onnx_export_matches_pytorch_on_the_committed_images(tmp_path, monkeypatch, capsys, method):
    import onnxruntime as ort

    from pipeline.models import load_checkpoint

    monkeypatch.chdir(tmp_path)
    model_dir = _model_dir(tmp_path, method)
    assert (
        cli(
            [
                "export",
                str(model_dir),
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "onnx"),
                "--check-images",
                str(IMAGES),
            ]
        )
        == 0
    )
    print(capsys.readouterr().out)  # the measured difference, for the log
    x = _images(model_dir)
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    model, _ = load_checkpoint(model_dir / "model.pt")
    with torch.no_grad():
        want = model.forward_with_crops(x) if method == "glsim" else None
        logits = want.logits if want is not None else model(x)
    got = session.run(None, {"image": x.numpy()})
    assert np.abs(got[0] - logits.numpy()).max() <= 1e-3
    assert np.array_equal(got[0].argmax(1), logits.numpy().argmax(1))
    if method == "glsim":  # the box follows each image: the graph computes it, no constant was traced
        assert np.array_equal(got[1], want.boxes.numpy())
        assert len({tuple(b) for b in want.boxes.tolist()}) > 1
        single = session.run(None, {"image": x[2:3].numpy()})  # another batch size, another image
        assert np.array_equal(single[1], want.boxes[2:3].numpy())
    report = json.loads((tmp_path / "onnx" / "preprocess.json").read_text())
    assert report["label_names"] == CLASSES and report["check"]["images"] == x.shape[0]


def test_an_export_the_exporter_cannot_capture_fails_naming_the_crop(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("Could not guard on data-dependent expression u0 < 3")

    monkeypatch.chdir(tmp_path)
    model_dir = _model_dir(tmp_path, "glsim")
    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert cli(["export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert "GLSim's data-dependent crop" in err and "data-dependent expression u0 < 3" in err
    assert not (tmp_path / "onnx").exists()  # nothing half-written
