"""Shared fixtures: the real config and the real embedded dataset, shrunk (lightning-hydra-template style)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Offline, quiet, and never the developer's own MLflow server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def make_tiny_emoji(dest: Path, n_classes: int = 12) -> Path:
    """A copy of datasets/emoji restricted to the first n classes (all four styles), same layout."""
    index = pl.read_csv(REPO / "datasets/emoji/index.csv", infer_schema_length=0)
    keep = index["codepoint"].unique(maintain_order=True).head(n_classes)
    small = index.filter(pl.col("codepoint").is_in(keep.to_list()))
    for f in small["file"]:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / "datasets/emoji" / f, dest / f)
    small.write_csv(dest / "index.csv")
    return dest


TINY_TRAIN = {"img_size": 32, "epochs": 2, "batch_size": 16, "warmup_epochs": 0}


def shrink(params: dict) -> dict:
    """The tiny training settings, for the train section and every variant. ViTs get an 8x8 token grid at 32 px,
    enough for ILA's two down-sampling steps: hybrids take the CNN's stride-4 stage, the distilled ViT's patch
    embedding is resampled to patch 4 by timm. Relative weight files point into this repository."""
    params["base"]["device"] = "cpu"
    params["train"].update(TINY_TRAIN)
    for overrides in params.get("variants", {}).values():
        if overrides.get("backbone_cnn") or overrides.get("method") in ("vit", "glsim", "ila"):
            overrides["patch_size"] = 4
        weights = overrides.get("weights", "")
        if weights.startswith("file:") and not Path(weights.removeprefix("file:")).is_absolute():
            overrides["weights"] = f"file:{REPO / weights.removeprefix('file:')}"
    return params


def write_tiny_params(project: Path, dataset: Path, **train) -> Path:
    """The repo's params.yaml, shrunk: tiny dataset, 32 px, 2 epochs, CPU."""
    params = shrink(yaml.safe_load((REPO / "params.yaml").read_text()))
    params["acquire"]["embedded"]["path"] = str(dataset)
    params["train"].update(train)
    path = project / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def tiny_emoji(tmp_path_factory) -> Path:
    return make_tiny_emoji(tmp_path_factory.mktemp("tiny_emoji"))


def run_cmd(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def dafre_labels(tmp_path_factory) -> Path:
    """The real DAF:re label files (val/test/class names), unpacked from tests/fixtures/dafre-labels."""
    import gzip

    dest = tmp_path_factory.mktemp("dafre-labels")
    for gz in sorted((REPO / "tests/fixtures/dafre-labels").glob("*.csv.gz")):
        (dest / gz.name.removesuffix(".gz")).write_bytes(gzip.decompress(gz.read_bytes()))
    return dest
