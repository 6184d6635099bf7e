"""Every stage on a tiny subset of the real embedded data, chained as DVC would run them (library level)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from pipeline.data.clean import clean
from pipeline.data.split import split
from pipeline.models import load_checkpoint
from pipeline.report import ReportInputs, build_report, log_to_mlflow
from pipeline.report.results import VariantPaths
from pipeline.training.engine import TrainOutputs, train
from pipeline.training.evaluate import EvalOutputs, EvalSeedOutputs, evaluate, evaluate_seeds
from pipeline.training.seed_runs import TrainSeedOutputs, train_seeds
from tests.conftest import train_run, write_tiny_params

N_CLASSES = 12


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_emoji) -> dict:
    """Run acquire -> clean -> split -> train -> evaluate -> report once; tests inspect the results."""
    root = tmp_path_factory.mktemp("project")
    params = load_params(write_tiny_params(root, tiny_emoji))
    raw, cleaned, split_file = root / "data/raw", root / "data/clean", root / "data/split/manifest.parquet"
    acquire(params.acquire, root, raw)
    _, _, clean_counts = clean(params.clean, raw, cleaned)
    df, split_counts = split(manifest.read(cleaned), params.split, params.base.seed)
    manifest.write(df, split_file)
    for name, counts in (("clean", clean_counts), ("split", split_counts)):
        (root / "metrics").mkdir(exist_ok=True)
        (root / "metrics" / f"{name}.json").write_text(json.dumps(counts))
    # Every variant of the repo's params.yaml (cnn, vit, glsim, ila), at the tiny size, laid out as dvc.yaml does.
    # One seed here (the seed loop and its summary are tested in test_e2e_dvc with two).
    params = params.model_copy(update={"base": params.base.model_copy(update={"seeds": (42,)})})
    inputs = ReportInputs(split_file, cleaned, root / "models", root / "metrics", root / "plots")
    summaries, evals = {}, {}
    for name in params.variants:
        p = params.with_variant(name)
        summaries[name] = train_seeds(
            p,
            split_file,
            cleaned,
            TrainSeedOutputs.in_layout(name, root / "models", root / "metrics", root / "plots"),
            root,
            name,
        )
        evals[name] = evaluate_seeds(
            p,
            split_file,
            cleaned,
            root / "models" / name,
            EvalSeedOutputs.in_layout(name, root / "metrics", root / "plots"),
            root,
        )
    report, results = build_report(params, inputs, root / "reports")
    cnn = inputs.variant("cnn", 42)
    return dict(
        root=root,
        params=params,
        train=summaries["cnn"],
        eval=evals["cnn"],
        report=report,
        split_file=split_file,
        cleaned=cleaned,
        cnn=cnn,
        summaries=summaries,
        evals=evals,
        results=results,
    )


def test_acquire_and_clean_keep_every_image(project):
    raw = manifest.read(project["root"] / "data/raw")
    cleaned = manifest.read(project["cleaned"])
    assert raw.height == cleaned.height == N_CLASSES * 4
    assert sorted(cleaned["class_id"].unique().to_list()) == list(range(N_CLASSES))
    # RGBA emoji were composited on white and re-encoded as RGB PNG
    from PIL import Image

    with Image.open(project["cleaned"] / cleaned["path"][0]) as im:
        assert im.mode == "RGB"


def test_group_split_holds_out_one_artist(project):
    df = manifest.read(project["split_file"])
    assert set(df.filter(pl.col("split") == "test")["group"]) == {"twemoji"}
    assert set(df.filter(pl.col("split") == "val")["group"]) == {"emojione"}
    assert set(df.filter(pl.col("split") == "train")["group"]) == {"noto", "openmoji"}
    assert df.group_by("split").len().sort("split").rows() == [("test", 12), ("train", 24), ("val", 12)]


def test_train_writes_checkpoint_history_and_metrics(project):
    summary = project["train"]
    assert summary["epochs"] == 2 and summary["num_classes"] == N_CLASSES
    assert 1 <= summary["best_epoch"] <= 2
    history = pl.read_csv(project["cnn"].history)
    assert history["epoch"].to_list() == [1, 2]
    assert {"train_loss", "val_loss", "val_top1", "lr"} <= set(history.columns)
    assert json.loads(project["cnn"].train_metrics.read_text())["train_images"] == 24


def test_checkpoint_reloads_to_identical_logits(project):
    model, ckpt = load_checkpoint(project["cnn"].model_dir / "model.pt")
    assert len(ckpt["classes"]) == N_CLASSES and ckpt["model_spec"]["img_size"] == 32
    x = torch.randn(2, 3, 32, 32)
    again, _ = load_checkpoint(project["cnn"].model_dir / "model.pt")
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_evaluate_reports_test_metrics(project):
    m = project["eval"]
    assert m["test_images"] == N_CLASSES
    assert 0.0 <= m["test_top1"] <= m["test_top5"] <= 1.0
    assert m["chance_top1"] == pytest.approx(1 / N_CLASSES)
    preds = pl.read_csv(project["cnn"].predictions)
    assert preds.height == N_CLASSES and set(preds.columns) == {"image_id", "actual", "predicted", "confidence"}
    assert m["gflops"] > 0 and "test_img_per_s" not in m  # a timing: MLflow only (issue 15)
    assert m["gmacs"] == pytest.approx(m["gflops"] / 2)  # the papers' unit


def test_mlflow_run_has_params_epoch_metrics_and_artifacts(project):
    root = project["root"]
    run_id = train_run(root / "mlflow/mlflow.db", project["cnn"].model_dir / "model.pt").info.run_id
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow/mlflow.db'}")
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.img_size"] == "32"
    assert run.data.tags["stage"] == "train" and run.data.tags["device"] == "cpu"
    assert run.data.tags["weights"] == "package:efficientnet_lite0"  # which weights the run started from
    assert not any(k.startswith("variants.") for k in run.data.params)
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [1, 2]
    assert "test_top1" in run.data.metrics and run.data.metrics["test_img_per_s"] > 0
    assert run.data.metrics["train_seconds"] > 0 and "epoch_seconds" in run.data.metrics
    # Seeds issue: each seed's run sits under one parent run of its variant, which carries the mean over seeds
    assert run.data.tags["seed"] == "42" and run.data.tags["variant"] == "cnn"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["variant"] == "cnn" and "seed_group" in parent.data.tags
    assert parent.data.metrics["test_top1"] == pytest.approx(project["eval"]["test_top1"])
    assert parent.data.metrics["n_seeds"] == 1 and parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"model.pt", "config.yaml", "train_history.csv"} <= names
    # artifacts live beside the database, inside the project
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlflow")


def test_variants_train_what_they_override(project):
    """glsim/ila take the train section and change only their keys; their checkpoints say so."""
    for name, method in (("glsim", "glsim"), ("ila", "ila")):
        paths = VariantPaths.of(
            name, project["root"] / "models", project["root"] / "metrics", project["root"] / "plots", 42
        )
        _, ckpt = load_checkpoint(paths.model_dir / "model.pt")
        assert ckpt["model_spec"]["method"] == method and ckpt["model_spec"]["img_size"] == 32
        assert ckpt["model_spec"]["options"]["patch_size"] == 4  # the distilled ViT, its patch embedding resampled
    s = project["summaries"]
    assert s["glsim"]["params_trainable"] == s["glsim"]["params_total"]  # GLSim fine-tunes everything
    assert s["ila"]["params_trainable"] < s["ila"]["params_total"] / 10  # ILA: adapters, CLS token and head only
    e = project["evals"]
    assert all(e[v]["gflops"] > 0 for v in e)


def test_glsim_samples_hold_its_selection(project):
    root = project["root"]
    with np.load(root / "plots/samples/glsim/seed42.npz", allow_pickle=False) as s:
        n = len(s["image_id"])
        assert n == 6 and s["image"].shape == (n, 32, 32, 3) and s["crop"].shape == (n, 32, 32, 3)
        assert s["similarity"].shape == (n, 8, 8) and s["selected"].shape == (n, 8)  # stride-4 hybrid, top-8
        x0, y0, x1, y1 = s["box"].T
        assert ((0 <= x0) & (x0 < x1) & (x1 <= 32) & (0 <= y0) & (y0 < y1) & (y1 <= 32)).all()
    with np.load(root / "plots/samples/cnn/seed42.npz", allow_pickle=False) as s:
        assert "similarity" not in s.files and len(s["predicted"]) == 6


def test_report_compares_every_variant_with_valid_pngs(project):
    root = project["root"]
    text = project["report"].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant | method |"))
    for name in ("cnn", "vit", "glsim", "ila"):
        row = next(line for line in text.splitlines() if line.startswith(f"| **{name}** |"))
        assert row.count(" | ") == header.count(" | ")  # one cell per column of the header
    for col in (
        "backbone",
        "weights",
        "image size",
        "top-1",
        "top-5",
        "macro acc",
        "tail acc",
        "params",
        "trainable",
        "GFLOPs",
        "GMACs",
    ):
        assert f"| {col} |" in header
    assert "paper top-1" not in header  # the emoji are in no paper
    assert "| package:efficientnet_lite0 |" in text  # which weights each variant started from
    assert text.count("| file vit_tiny_distilled_128.safetensors |") == 3  # vit, glsim and ila: the same distilled ViT
    headers = [line for line in text.splitlines() if line.startswith("| variant |")]
    for timing in ("img/s", "MLflow run", "training time"):  # they differ every run: MLflow, not the report
        assert not any(timing in h for h in headers)
    figures = sorted(p.name for p in (root / "reports/figures").glob("*.png"))
    assert {
        "accuracy_vs_gflops.png",
        "training_curves.png",
        "per_class_vs_frequency.png",
        "glsim_glsim.png",
        "dataset.png",
        "samples.png",
    } <= set(figures)
    assert not {"glsim_cnn.png", "glsim_vit.png", "glsim_ila.png"} & set(figures)
    assert "## Dataset card" in text  # the split stage's card is the report's data section
    for name in figures:
        assert f"figures/{name}" in text
        assert (root / "reports/figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (root / "reports/report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and 'src="figures/accuracy_vs_gflops.png"' in html


def test_report_names_the_missing_output_of_a_variant(project, tmp_path):
    params = project["params"]
    more = params.model_copy(update={"variants": {**params.variants, "vit-b": {}}})
    inputs = ReportInputs(
        project["split_file"],
        project["cleaned"],
        project["root"] / "models",
        project["root"] / "metrics",
        project["root"] / "plots",
    )
    missing = r"variant 'vit-b' has no .*models/vit-b/seed42/config.yaml.*evaluate@vit-b"
    with pytest.raises(FileNotFoundError, match=missing):
        build_report(more, inputs, tmp_path / "reports")


def test_report_run_in_mlflow_links_the_runs_it_compares(project):
    root = project["root"]
    run_id = log_to_mlflow(project["params"], root / "reports", project["results"], root)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow/mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.run_name == "report" and run.data.tags["stage"] == "report"
    # Issue 15: in the train runs' experiment, artifacts beside them in the project's store (not ./mlruns).
    train_cnn = train_run(root / "mlflow/mlflow.db", root / "models/cnn/seed42/model.pt")
    assert run.info.experiment_id == train_cnn.info.experiment_id
    assert client.get_experiment(run.info.experiment_id).name == project["params"].base.experiment
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(root / "mlflow")
    runtime = client.download_artifacts(run_id, "report/runtime.md", str(root / "dl"))
    for name in ("cnn", "vit", "glsim", "ila"):
        tr = train_run(root / "mlflow/mlflow.db", root / "models" / name / "seed42/model.pt")
        assert run.data.tags[f"run.{name}"] == tr.info.run_id
        assert tr.info.run_id in Path(runtime).read_text()
        assert run.data.metrics[f"{name}.test_top1"] == pytest.approx(project["evals"][name]["test_top1"])
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/figures"} <= names


def test_report_on_a_registry_dataset_sets_the_papers_top1_beside_ours(project, tmp_path):
    """The same tiny images, declared as CUB (acquire.csv.dataset): a GLSim variant trained and evaluated at 224 px
    gets GLSim Table 4's 90.93 % and the difference; the variant at 32 px, which no table has, gets '-'."""
    from pipeline.config import CsvSource

    params = project["params"]
    cub = params.acquire.model_copy(update={"source": "csv", "csv": CsvSource(path="x", dataset="cub")})
    # 32 px patches (a 7x7 grid) and 4-image cost timings keep a 224 px run to seconds
    paper = {
        "method": "glsim",
        "model": "test_vit",
        "backbone_cnn": None,
        "patch_size": 32,
        "weights": "none",
        "img_size": 224,
        "epochs": 1,
    }
    params = params.model_copy(
        update={
            "acquire": cub,
            "variants": {"paper": paper, "cnn": {}},
            "evaluate": params.evaluate.model_copy(update={"batch_size": 4}),
        }
    )
    inputs = ReportInputs(
        project["split_file"], project["cleaned"], tmp_path / "models", tmp_path / "metrics", tmp_path / "plots"
    )
    shutil.copytree(project["root"] / "metrics", tmp_path / "metrics")  # clean/split counts and cnn's metrics
    for kind in ("models", "plots"):
        for path in (project["root"] / kind).rglob("cnn*"):
            dest = tmp_path / path.relative_to(project["root"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if path.is_dir() else shutil.copyfile)(path, dest)
    p, paths = params.with_variant("paper"), inputs.variant("paper", 42)
    train(
        p,
        project["split_file"],
        project["cleaned"],
        TrainOutputs(paths.model_dir, paths.train_metrics, paths.history),
        tmp_path,
    )
    ours = evaluate(
        p,
        project["split_file"],
        project["cleaned"],
        paths.model_dir,
        EvalOutputs(paths.eval_metrics, paths.predictions, paths.per_class, paths.confused_pairs, paths.samples),
        tmp_path,
    )["test_top1"]
    text = build_report(params, inputs, tmp_path / "reports")[0].read_text()
    header = next(line for line in text.splitlines() if line.startswith("| variant | method |"))
    assert "| top-1 | paper top-1 | ours - paper (points) |" in header
    row = next(line for line in text.splitlines() if line.startswith("| **paper** |")).split(" | ")
    assert row[6:8] == ["90.9 % (GLSim, GLSim Table 4)", f"{100 * ours - 90.93:+.1f}"]
    assert row[3] == "random init" and row[4] == "224"
    cnn = next(line for line in text.splitlines() if line.startswith("| **cnn** |")).split(" | ")
    assert cnn[6:8] == ["-", "-"]
    assert "Paper top-1: the published mean for `cub`" in text
