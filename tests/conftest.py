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
# Two xdist workers each start stage processes with 2 torch threads on 2 cores: OpenMP threads that spin
# while waiting steal the core the other process needs (a tiny training took 7-19 s instead of 3 s). Passive
# waiting changes the schedule only, never the numbers (verify.NUMERICS_ENV lists what does).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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


def copy_repo(dest: Path, n_classes: int = 10) -> Path:
    """A copy of the repository's tracked and untracked-but-not-ignored files, with datasets/emoji shrunk to the
    first n classes (for an end-to-end run in a temporary folder)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for f in files:
        if f.startswith("datasets/emoji/") or not (REPO / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    make_tiny_emoji(dest / "datasets/emoji", n_classes=n_classes)
    return dest


def git_commit_all(project: Path, message: str = "init", init: bool = False) -> None:
    """`git add -A` and commit (git init -b main first when `init`), as a throwaway identity."""
    cmds = [["git", "init", "-q", "-b", "main"]] if init else []
    cmds += [
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", message],
    ]
    for cmd in cmds:
        subprocess.run(cmd, cwd=project, check=True, capture_output=True)


TINY_TRAIN = {"img_size": 32, "epochs": 2, "batch_size": 16, "warmup_epochs": 0}


def shrink(params: dict) -> dict:
    """The tiny training settings, for the train section and every variant. ViTs get an 8x8 token grid at 32 px,
    enough for ILA's two down-sampling steps: hybrids take the CNN's stride-4 stage, the distilled ViT's patch
    embedding is resampled to patch 4 by timm. Relative weight files point into this repository."""
    params["base"]["device"] = "cpu"
    params["base"]["seeds"] = [42, 43]  # two: the mean/std/per-seed path runs, at twice a single run's cost
    params["train"].update(TINY_TRAIN)
    for overrides in params.get("variants", {}).values():
        if overrides.get("backbone_cnn") or overrides.get("method") in ("vit", "glsim", "ila"):
            overrides["patch_size"] = 4
        overrides.update({k: TINY_TRAIN[k] for k in ("img_size", "epochs") if k in overrides})  # a variant's own
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


def train_run(db: Path, model_file: Path):
    """The MLflow train run that wrote `model_file` (found by the md5 tag, as evaluate and report find it)."""
    import mlflow

    from pipeline.io import md5_file

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        f"tags.model_md5 = '{md5_file(model_file)}' and tags.stage = 'train'",
    )
    assert runs, f"no train run wrote {model_file}"
    return runs[0]


def train_stage_args(root: Path, out: str) -> list[str]:
    """stages/train.py and its arguments for a tiny project at root (params.yaml, data/split, images in data/raw),
    every output under root/out."""
    outputs = {"--out": "models", "--metrics": "train.json", "--seed-metrics": "seeds", "--history": "history"}
    args = [str(REPO / "stages/train.py"), "--params", str(root / "params.yaml")]
    args += ["--split", str(root / "data/split/manifest.parquet"), "--images", str(root / "data/raw")]
    for flag, name in outputs.items():
        args += [flag, str(root / out / name)]
    return args


def run_cmd(args: list[str], cwd: Path, timeout: float = 1800) -> subprocess.CompletedProcess:
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


@pytest.fixture(autouse=True)
def _tracking_env_stays_per_test():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI (and tracking.setup marks its own export): restored after
    every test, so that no in-process test sends a later one's runs to its store (or to a cwd-relative ./mlruns)."""
    keys = ("MLFLOW_TRACKING_URI", "PIPELINE_MLFLOW_URI_SET")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# --- the suite never writes into the repository (issue 15) ------------------------------------------------------------

_CACHE_PARTS = ("__pycache__", ".pytest_cache")  # Python's own byte-code caches are not test output


def _repo_entries() -> set[str]:
    """Every path git reports as changed, untracked or ignored (a new folder as one entry: on a fresh clone, where
    CI runs, any output folder a test creates, ./mlruns or data/, is new)."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=REPO, capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines() if not any(part in line for part in _CACHE_PARTS)}


def pytest_sessionstart(session) -> None:
    if not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist)
        session.config._repo_before = _repo_entries() if (REPO / ".git").exists() else None


def pytest_sessionfinish(session, exitstatus) -> None:
    before = getattr(session.config, "_repo_before", None)
    if before is None:
        return
    written = sorted(_repo_entries() - before)
    if written:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        shown = "\n  ".join(written[:20])
        print(
            f"\nerror: the tests wrote into the repository ({len(written)} paths); tests must use tmp_path:\n  {shown}",
            file=sys.stderr,
        )
