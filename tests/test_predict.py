"""`python -m pipeline predict`: real checkpoints (a linear probe trained here on four emoji classes, a tiny GLSim),
real images (datasets/emoji, the Ren'Py sprites), a real MLflow SQLite store; the CLI in-process and as a process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from PIL import Image

from pipeline import cli
from pipeline.config import BaseParams, CleanParams, FacesParams
from pipeline.data.clean import decode
from pipeline.data.dataset import ManifestDataset
from pipeline.data.faces import crop_box, detect
from pipeline.data.transforms import data_config, eval_transform
from pipeline.inference.inputs import collect_images
from pipeline.models import build_model, save_checkpoint
from tests.conftest import REPO, run_cmd

EMOJI = REPO / "datasets/emoji"
RENPY = REPO / "tests/fixtures/renpy"
CLASSES = ["skull and crossbones", "heavy black heart", "eyes", "thumbs up sign"]  # distinct shapes and colours
HELD_OUT = "twemoji"  # the default split's test artist: the probe never sees its drawings
IMG = 64


def _params(dest: Path) -> Path:
    """A minimal params file (defaults elsewhere), independent of the repository's params.yaml being edited."""
    dest.mkdir(parents=True, exist_ok=True)
    params = {
        "base": {"device": "cpu", "threads": 2, "mlflow_dir": "mlflow"},
        "acquire": {"embedded": {"path": str(EMOJI)}},
    }
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest / "params.yaml"


def _rgb(path: Path) -> np.ndarray:
    return _rgb_with(path, CleanParams())


def _rgb_with(path: Path, clean: CleanParams) -> np.ndarray:
    return np.asarray(decode(path.read_bytes(), clean)[0])  # as the clean stage converts it


@pytest.fixture(scope="module")
def emoji(tmp_path_factory) -> SimpleNamespace:
    """A linear probe on EfficientNet-Lite0 (package weights) over 4 classes x 3 artists; Twemoji held out.

    The backbone is frozen (method linear), so its features are computed once and only the head trains: a real
    checkpoint in a few seconds. The head starts at zero so that every step is plain logistic regression.
    """
    tmp = tmp_path_factory.mktemp("emoji_predict")
    index = pl.read_csv(EMOJI / "index.csv", infer_schema_length=0).filter(pl.col("class_name").is_in(CLASSES))
    labels: dict[str, str] = {}
    for row in index.iter_rows(named=True):
        split = "held_out" if row["style"] == HELD_OUT else "train"
        dest = tmp / split / row["style"] / f"{row['codepoint']}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(EMOJI / row["file"], dest)
        labels[str(dest)] = row["class_name"]
    train = sorted(p for p in labels if "/train/" in p)

    torch.manual_seed(0)
    model = build_model("linear", "tf_efficientnet_lite0", len(CLASSES), "package:efficientnet_lite0", IMG).eval()
    head = model.get_classifier()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    dcfg = data_config(model)
    transform = eval_transform(IMG, dcfg)
    x = torch.stack([transform(image=_rgb(Path(p)))["image"] for p in train])
    y = torch.tensor([CLASSES.index(labels[p]) for p in train])
    with torch.no_grad():
        feats = model.forward_features(x)
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.forward_head(feats), y).backward()
        opt.step()
    ckpt = tmp / "model.pt"
    save_checkpoint(
        ckpt,
        model,
        {
            "classes": CLASSES,
            "data_config": dcfg,
            "model_spec": {"method": "linear", "model": "tf_efficientnet_lite0", "img_size": IMG},
        },
    )
    return SimpleNamespace(root=tmp, ckpt=ckpt, labels=labels, params=_params(tmp / "project"))


def _predict(capsys, *argv) -> tuple[int, str, str]:
    """The CLI in-process (the parser and handler `python -m pipeline` runs): (exit code, stdout, stderr)."""
    code = cli.main(["predict", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _json(capsys, *argv) -> list[dict]:
    code, out, err = _predict(capsys, *argv, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def _probs(result: dict) -> np.ndarray:
    """The probabilities of a result with every class, in CLASSES order."""
    got = {c["class_name"]: c["probability"] for c in result["top_k"]}
    return np.array([got[name] for name in CLASSES])


# --- predictions ----------------------------------------------------------------------------------------------------


def test_top_k_is_right_on_training_and_held_out_artist_images(emoji, capsys):
    results = _json(
        capsys,
        emoji.root / "train",
        emoji.root / "held_out",
        "--model",
        emoji.ckpt,
        "--params",
        emoji.params,
        "--top-k",
        3,
    )
    assert [r["path"] for r in results] == sorted(emoji.labels, key=lambda p: ("held_out" in p, p))
    for r in results:
        probs = [c["probability"] for c in r["top_k"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert {c["class_name"] for c in r["top_k"]} <= set(CLASSES)
        assert r["top_k"][0]["class_name"] == emoji.labels[r["path"]], r  # Twemoji too: an artist never seen
        assert probs[0] > 0.5


def test_probabilities_cover_every_class_and_match_the_evaluate_pipeline(emoji, capsys, tmp_path):
    # Besides the emoji, large transparent and opaque images: the resize, centre crop and compositing must match too.
    images = [
        *sorted(p for p in emoji.labels if "/held_out/" in p),
        *(str(RENPY / n) for n in ("eileen_happy.png", "lucy_happy.png", "bg_lecturehall.jpg")),
    ]
    results = _json(capsys, *images, "--model", emoji.ckpt, "--params", emoji.params, "--top-k", 50)
    assert all(len(r["top_k"]) == len(CLASSES) for r in results)  # k is capped at the number of classes
    assert all(abs(sum(c["probability"] for c in r["top_k"]) - 1) < 1e-4 for r in results)
    # The evaluate stage's path: clean writes RGB PNGs, ManifestDataset reads them, the checkpoint's eval transform.
    from pipeline.models import load_checkpoint

    for i, p in enumerate(images):
        Image.fromarray(_rgb(Path(p))).save(tmp_path / f"{i}.png")
    model, ckpt = load_checkpoint(emoji.ckpt)
    manifest = pl.DataFrame({"path": [f"{i}.png" for i in range(len(images))], "class_id": [0] * len(images)})
    ds = ManifestDataset(manifest, tmp_path, eval_transform(ckpt["model_spec"]["img_size"], ckpt["data_config"]))
    with torch.no_grad():
        probs = model(torch.stack([ds[i][0] for i in range(len(ds))])).softmax(1)
    for r, row in zip(results, probs):
        assert np.allclose(_probs(r), row.numpy(), atol=1e-5)


def test_table_output_lists_rank_class_and_probability(emoji, capsys):
    image = next(p for p in sorted(emoji.labels) if "/held_out/" in p)
    code, out, err = _predict(capsys, image, "--model", emoji.ckpt, "--params", emoji.params, "--top-k", 2)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == image and lines[1].split() == ["#", "class", "probability"]
    assert lines[2].split()[0] == "1" and emoji.labels[image] in lines[2]
    assert lines[3].split()[0] == "2" and len(lines) == 5 and lines[4] == ""  # a blank line between images


def test_folders_are_searched_recursively_sorted_and_deduplicated(tmp_path):
    for rel in ("b/2.png", "b/sub/1.jpg", "a/3.WEBP", "a/notes.txt", "a/.hidden/4.png", ".cache/5.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    found = collect_images([tmp_path / "b", tmp_path, tmp_path / "b/2.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["b/2.png", "b/sub/1.jpg", "a/3.WEBP"]


def test_faces_classifies_the_face_crop_of_the_faces_stage(emoji, capsys, tmp_path):
    sprite = RENPY / "sylvie_blue_normal.png"
    common = ("--model", emoji.ckpt, "--params", emoji.params, "--top-k", 4)
    with_faces, background = _json(capsys, sprite, RENPY / "bg_lecturehall.jpg", *common, "--faces")
    with Image.open(sprite) as im:
        face = detect(im, FacesParams(enabled=True))[0]
        box = crop_box(face.box, im.size, FacesParams().margin)
        im.crop(box).save(tmp_path / "crop.png")  # what the faces stage would hand to clean
    assert with_faces["face"] == {
        "box": list(face.box),
        "score": round(face.score, 4),
        "crop": list(box),
        "faces_found": 1,
    }
    [crop] = _json(capsys, tmp_path / "crop.png", *common)
    [whole] = _json(capsys, sprite, *common)
    # The crop, not the whole sprite, was classified (batches of 2 and 1 differ in the last float bits).
    assert np.allclose(_probs(with_faces), _probs(crop), atol=1e-5)
    assert np.abs(_probs(with_faces) - _probs(whole)).max() > 1e-2
    assert background["face"] == {"box": None, "score": None, "crop": None, "faces_found": 0}
    code, out, _ = _predict(capsys, RENPY / "bg_lecturehall.jpg", *common, "--faces")
    assert code == 0 and "face: none found, whole image classified" in out


def test_faces_crop_comes_before_cleans_downscale(emoji, tmp_path):
    """With clean.resize_short_side, the face is cut from the full-size image and the crop is then downscaled, as
    the faces stage followed by clean does (downscaling first would blur the face)."""
    from pipeline.inference.predict import Predictor
    from pipeline.models import load_checkpoint

    clean = CleanParams(resize_short_side=48)
    predictor = Predictor(*load_checkpoint(emoji.ckpt), "cpu", clean, FacesParams(enabled=True))
    arr, face = predictor.prepare(RENPY / "eileen_happy.png")
    with Image.open(RENPY / "eileen_happy.png") as im:
        im.crop(tuple(face["crop"])).save(tmp_path / "crop.png")  # the faces stage's output file
    assert min(arr.shape[:2]) == 48
    assert np.array_equal(arr, _rgb_with(tmp_path / "crop.png", clean))


# --- MLflow runs:/ URIs ---------------------------------------------------------------------------------------------


def test_runs_uri_downloads_the_checkpoint_from_the_project_store(emoji, capsys, tmp_path, monkeypatch):
    import mlflow

    from pipeline import tracking

    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: recorded here so that it is removed after the test.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "removed at teardown")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    params = _params(tmp_path)
    experiment = tracking.setup(BaseParams(mlflow_dir="mlflow"), tmp_path)  # as the train stage, in tmp_path
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(emoji.ckpt))  # as the train stage logs models/model.pt
    os.environ.pop("MLFLOW_TRACKING_URI")  # predict must find the store through --params, as a new process does
    image = next(p for p in sorted(emoji.labels) if "/held_out/" in p)
    by_uri = _json(capsys, image, "--model", f"runs:/{run.info.run_id}/model.pt", "--params", params)
    assert by_uri == _json(capsys, image, "--model", emoji.ckpt, "--params", params)

    for uri, reason in (
        (f"runs:/{'0' * 32}/model.pt", "cannot download"),
        (f"runs:/{run.info.run_id}/missing.pt", "cannot download"),
        ("runs:/model.pt", "expected runs:/<run_id>/<artifact path>"),
        ("models:/anime-fgvc/1", "unsupported URI"),
    ):
        code, out, err = _predict(capsys, image, "--model", uri, "--params", params)
        assert code == 2 and out == "" and f"--model {uri}: {reason}" in err, err
    code, _, err = _predict(
        capsys, image, "--model", f"runs:/{run.info.run_id}/model.pt", "--params", _params(tmp_path / "elsewhere")
    )
    assert code == 2 and "no MLflow store at" in err and not (tmp_path / "elsewhere/mlflow").exists()


# --- GLSim explanations ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glsim_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("glsim", "test_vit", 3, "none", 32, patch_size=8)  # a 4x4 grid, top-4 patches
    with torch.no_grad():
        model.head.weight.normal_()  # the zero-initialised head would give uniform probabilities
    path = tmp_path_factory.mktemp("glsim") / "glsim.pt"
    save_checkpoint(
        path,
        model,
        {
            "classes": ["a", "b", "c"],
            "data_config": data_config(model),
            "model_spec": {"method": "glsim", "model": "test_vit", "img_size": 32},
        },
    )
    return path


def test_explain_writes_a_figure_and_a_crop_per_image(glsim_ckpt, capsys, tmp_path):
    images = [EMOJI / "images/noto/1F440.png", EMOJI / "images/twemoji/1F440.png", EMOJI / "images/noto/2620.png"]
    out_dir = tmp_path / "explain"
    results = _json(capsys, *images, "--model", glsim_ckpt, "--params", _params(tmp_path), "--explain", out_dir)
    names = ["1F440", "1F440-2", "2620"]  # two inputs share a stem: the second is numbered
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"{n}.{kind}.png" for n in names for kind in ("gls", "crop")
    )
    for r, name in zip(results, names):
        assert r["explain"] == {"figure": str(out_dir / f"{name}.gls.png"), "crop": str(out_dir / f"{name}.crop.png")}
        with Image.open(r["explain"]["figure"]) as fig:
            assert fig.format == "PNG" and fig.size == (1250, 480)
            fig.load()
            assert len(np.unique(np.asarray(fig.convert("L")))) > 50  # drawn images, not an empty canvas
        with Image.open(r["explain"]["crop"]) as crop:
            assert crop.format == "PNG" and crop.size == (32, 32)


def test_explain_is_refused_for_models_without_a_gls_selection(emoji, capsys, tmp_path):
    image = next(iter(emoji.labels))
    code, out, err = _predict(
        capsys, image, "--model", emoji.ckpt, "--params", emoji.params, "--explain", tmp_path / "explain"
    )
    assert code == 2 and out == "" and not (tmp_path / "explain").exists()
    assert f"--explain {tmp_path / 'explain'}: needs a GLSim checkpoint" in err and "linear model" in err


# --- errors: exit code 2, the path and the reason, nothing printed --------------------------------------------------


def test_missing_path_fails_with_exit_code_2_as_a_process(emoji, tmp_path):
    missing = tmp_path / "nope.png"
    proc = run_cmd(
        [
            sys.executable,
            "-m",
            "pipeline",
            "predict",
            str(missing),
            "--model",
            str(emoji.ckpt),
            "--params",
            str(emoji.params),
        ],
        cwd=REPO,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"error: {missing}: no such file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["empty_dir", "text_file", "broken_png_in_folder", "truncated_png", "empty_file"])
def test_bad_inputs_name_the_path_and_reason(emoji, capsys, tmp_path, case):
    good = next(p for p in sorted(emoji.labels))
    png = Path(good).read_bytes()
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "empty_dir":
        (folder / "notes.txt").write_text("no images here")
        (folder / ".hidden.png").write_bytes(png)  # hidden: skipped
        path, reason = folder, "folder holds no images"
    elif case == "text_file":
        path, reason = folder / "notes.txt", "not an image"
        path.write_text("hello")
    elif case == "broken_png_in_folder":  # one bad file among good ones: no prediction printed for any
        shutil.copyfile(good, folder / "a_good.png")
        path, reason = folder / "b_broken.png", "not an image"
        path.write_bytes(b"<html>not found</html>")
    elif case == "truncated_png":
        path, reason = folder / "cut.png", "corrupt"
        path.write_bytes(png[: len(png) // 2])
    else:
        path, reason = folder / "zero.png", "empty file"
        path.write_bytes(b"")
    code, out, err = _predict(
        capsys, folder if case == "broken_png_in_folder" else path, "--model", emoji.ckpt, "--params", emoji.params
    )
    assert code == 2 and out == ""
    assert err.startswith(f"error: {path}: {reason}"), err


def test_unreadable_checkpoints_fail_with_the_model_path(emoji, capsys, tmp_path):
    image = next(iter(emoji.labels))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(emoji.ckpt.read_bytes()[:4096])
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)  # a valid torch file, not this pipeline's format
    for model, reason in (
        (tmp_path / "none.pt", "checkpoint file does not exist"),
        (tmp_path, "is a folder"),
        (truncated, "cannot load the checkpoint"),
        (garbage, "cannot load the checkpoint"),
        (foreign, "not a checkpoint of this pipeline"),
    ):
        code, out, err = _predict(capsys, image, "--model", model, "--params", emoji.params)
        assert code == 2 and out == "" and err.startswith(f"error: --model {model}: ") and reason in err, err


def test_an_image_as_model_says_it_is_not_a_checkpoint(emoji, capsys, tmp_path):
    """Issue 23 case 7: `--model notimage.png` said `cannot load the checkpoint (KeyError: 101)`."""
    image = next(iter(emoji.labels))
    code, out, err = _predict(capsys, image, "--model", image, "--params", emoji.params)
    assert code == 2 and out == ""
    assert f"{image} is not a checkpoint of this pipeline (not a torch file" in err and "KeyError: 101" not in err


def test_bad_arguments_are_usage_errors(emoji, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["predict", next(iter(emoji.labels)), "--top-k", "0"])
    assert exc.value.code == 2 and "--top-k: must be at least 1" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    """`python -m pipeline --help` and params errors must not wait for torch (the handler imports it)."""
    code = (
        "import sys; import pipeline.inference.predict as p, argparse; "
        "p.add_predict_parser(argparse.ArgumentParser().add_subparsers()); "
        "sys.exit(int(any(m in sys.modules for m in ('torch', 'mlflow', 'polars', 'PIL'))))"
    )
    assert run_cmd([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_a_sideways_phone_jpeg_is_predicted_upright(emoji, capsys, tmp_path):
    """Issue 15: EXIF Orientation=6 (stored rotated) is applied as in clean: the model gets the upright pixels, and
    the probabilities match those of the upright image saved without the tag."""
    from pipeline.inference.predict import Predictor
    from pipeline.models import load_checkpoint

    src = Path(sorted(p for p in emoji.labels if "/held_out/" in p)[0])
    upright = Image.fromarray(_rgb(src)).resize((96, 64))  # landscape: a sideways copy has another shape
    upright.save(tmp_path / "upright.jpg", quality=100)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view": the stored pixels are turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.jpg", quality=100, exif=exif)
    model, ckpt = load_checkpoint(emoji.ckpt)
    predictor = Predictor(model, ckpt, torch.device("cpu"), CleanParams())
    phone, plain = predictor.prepare(tmp_path / "phone.jpg")[0], predictor.prepare(tmp_path / "upright.jpg")[0]
    assert phone.shape == plain.shape == (64, 96, 3)
    assert np.abs(phone.astype(int) - plain.astype(int)).mean() < 3  # JPEG blocks of a rotated image differ a bit
    a, b = _json(
        capsys,
        tmp_path / "phone.jpg",
        tmp_path / "upright.jpg",
        "--model",
        emoji.ckpt,
        "--params",
        emoji.params,
        "--top-k",
        len(CLASSES),
    )
    assert np.abs(_probs(a) - _probs(b)).max() < 0.05
