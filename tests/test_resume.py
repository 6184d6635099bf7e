"""Issue 6: a training run killed with SIGKILL mid-run resumes from its last epoch and ends exactly like an
uninterrupted run (CPU, deterministic settings)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from pipeline.config import load_params
from pipeline.data import manifest
from pipeline.data.acquire import acquire
from tests.conftest import REPO, make_tiny_emoji, train_stage_args, write_tiny_params

EPOCHS = 3
STYLE_SPLIT = {"noto": "train", "openmoji": "train", "emojione": "val", "twemoji": "test"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """Acquired emoji subset with an artist split written directly (this test is about training, not splitting)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_tiny_emoji(root / "emoji", n_classes=40)
    params_file = write_tiny_params(root, data, epochs=EPOCHS, batch_size=8)
    # One torch thread: beside the suite's other worker on 2 cores, 2 OpenMP threads were measured several times
    # slower (oversubscribed spinning); resuming exactly does not depend on the thread count.
    params = yaml.safe_load(params_file.read_text())
    params["base"]["threads"] = 1
    params["base"]["seeds"] = [42]  # the seed loop resumes each seed's own run: one seed shows it
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    raw = root / "data/raw"
    df = acquire(load_params(params_file).acquire, root, raw)
    df = df.with_columns(pl.col("group").replace_strict(STYLE_SPLIT).alias("split"))
    manifest.write(df, root / "data/split/manifest.parquet")
    return root


def _train_cmd(root: Path, out: str) -> list[str]:
    return [sys.executable, *train_stage_args(root, out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _results(root: Path, out: str) -> tuple[dict, list[dict], dict]:
    # No timings in the DVC outputs (issue 15): the files themselves must match, not a filtered view of them.
    metrics = json.loads((root / out / "train.json").read_text())
    with open(root / out / "history/seed42.csv") as f:
        history = list(csv.DictReader(f))
    weights = torch.load(root / out / "models/seed42/model.pt", map_location="cpu", weights_only=True)["model"]
    return metrics, history, weights


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(project):
    full = subprocess.run(
        _train_cmd(project, "full"), cwd=project, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert full.returncode == 0, full.stderr[-3000:]
    assert not any((project / "checkpoints").glob("*/last.pt")), "a finished run must remove its resumable state"

    # Kill the second run as soon as epoch 1 has been reported (it is then inside epoch 2).
    proc = subprocess.Popen(
        _train_cmd(project, "killed"),
        cwd=project,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith(f"epoch 1/{EPOCHS}"):
            break
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    states = list((project / "checkpoints").glob("*/last.pt"))
    assert len(states) == 1, "the killed run must leave exactly one resumable state"
    assert not (project / "killed/train.json").exists()

    resumed = subprocess.run(
        _train_cmd(project, "killed"), cwd=project, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after epoch" in resumed.stdout
    trained = [line.split()[1] for line in resumed.stdout.splitlines() if line.startswith("epoch ")]
    assert trained == [f"{e}/{EPOCHS}" for e in range(2, EPOCHS + 1)], "only unfinished epochs are trained"

    m_full, h_full, w_full = _results(project, "full")
    m_res, h_res, w_res = _results(project, "killed")
    assert m_res == m_full
    assert h_res == h_full and len(h_res) == EPOCHS
    assert w_res.keys() == w_full.keys()
    assert all(torch.equal(w_res[k], w_full[k]) for k in w_full)


def test_changed_params_never_resume_a_foreign_state(project):
    """The run key covers params and data: a state left by another configuration is ignored."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] / 2
    (project / "params_lr.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / "checkpoints/0123456789abcdef").mkdir(parents=True, exist_ok=True)
    (project / "checkpoints/0123456789abcdef/last.pt").write_bytes(b"not a state")
    cmd = _train_cmd(project, "lr")
    cmd[cmd.index("--params") + 1] = str(project / "params_lr.yaml")
    done = subprocess.run(cmd, cwd=project, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout


def test_run_key_separates_variants_with_equal_settings():
    """Two variants that train the same settings are two runs: a killed one never resumes the other's state."""
    from pipeline.config import Params
    from pipeline.training.engine import run_key

    split = "0123456789abcdef0123456789abcdef"  # the split manifest's md5
    params = Params()
    keys = {run_key(params, split), run_key(params, split, "a"), run_key(params, split, "b")}
    assert len(keys) == 3 and run_key(params, split, "a") == run_key(params, split, "a")
