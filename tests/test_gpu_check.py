"""Issue 14: `python -m pipeline gpu-check --json` in its reduced CPU form (the GPU form is the same code, bigger).

One JSON line on stdout naming every figure; every part ran (no `error`), the sweep logged its trials to MLflow,
predict agrees with evaluate, and the parts that need a GPU to mean something are listed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import BIN, REPO


@pytest.mark.slow  # about 1.5 minutes on 2 busy cores (Ray start-up and 4 trials dominate)
def test_gpu_check_cpu_form_reports_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "gpu-check", "--json", "--cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout[-2000:]  # Ray's and the stages' output went to stderr
    s = json.loads(lines[0])

    assert s["device"] == "cpu" and s["cpu_reduced"] is True and s["gpu"] is None
    assert {"train_step", "glsim_vs_vit", "ila_vs_frozen_vit", "engine_e2e", "sweep", "evaluate", "predict"} <= set(
        s["needs_gpu"]
    )
    assert not [k for k, v in s.items() if isinstance(v, dict) and "error" in v], s

    step = s["train_step"]
    assert step["precision"] == "bf16" and step["train_gflops_per_image"] > 0
    assert step["runs"]["eager"]["img_per_s"] > 0 and step["runs"]["channels_last"]["img_per_s"] > 0
    assert "skipped" in step["runs"]["compile"] and step["best_mfu"] is None  # no peak known for a CPU
    for key, a, b in (("glsim_vs_vit", "glsim", "vit"), ("ila_vs_frozen_vit", "ila", "linear")):
        part = s[key]
        for mode in ("train", "forward"):
            assert part[f"{mode}_ratio"] == pytest.approx(
                part[f"{mode}_{a}_img_per_s"] / part[f"{mode}_{b}_img_per_s"], rel=0.02
            )
    assert 0 < s["glsim_vs_vit"]["forward_ratio"] < 1  # two encoder passes: slower than one

    loader = s["loader"]
    assert loader["img_size"] == 224 and loader["one_worker"]["images"] >= 40
    assert loader["one_worker"]["img_per_s"] > 0
    assert loader["workers_for_2500_img_per_s"] == -(-2500 // loader["one_worker"]["img_per_s"])

    e2e = s["engine_e2e"]  # the real train() per method, with the recipes' augmentation, against its step alone
    assert e2e["decode_cache"] is False and e2e["train_images"] > 0 and e2e["epochs"] >= 2
    for method, augment in (("vit", "med"), ("glsim", "med"), ("ila", "weak")):
        run = e2e[method]
        assert run["augment"] == augment and len(run["epoch_seconds"]) == e2e["epochs"]
        assert run["steady_img_per_s"] > 0 and run["step_alone_img_per_s"] > 0
        assert run["engine_over_step"] > 0 and run["first_epoch_over_steady"] > 0
    device = e2e["ila_decode_device"]  # train.decode: device, the same step: its own figure
    assert device["decode"] == "device" and run["decode"] == "cpu" and len(device["epoch_seconds"]) == e2e["epochs"]
    assert device["step_alone_img_per_s"] == run["step_alone_img_per_s"] and device["steady_img_per_s"] > 0

    sweep = s["sweep"]
    assert sweep["trials"] == sweep["completed"] == 4 and sweep["mlflow_trial_runs_finished"] == 4
    assert sweep["mlflow_runs"] == 5  # the parent and the four trials
    assert sweep["max_concurrent"] >= 2 and sweep["trial_devices"] == ["cpu"]

    assert s["evaluate"]["device"] == "cpu" and s["evaluate"]["test_images"] == s["predict"]["images"] > 0
    assert s["predict"]["agrees_with_evaluate"] == 1.0  # same checkpoint, same preprocessing
    assert list(tmp_path.iterdir()) == []  # everything in a temporary folder, nothing in the working directory


def test_an_unknown_part_is_refused_by_name_before_anything_runs(capsys):
    """A typo in --parts (engine-e2e) used to run nothing and report the empty summary as a success."""
    from pipeline.cli import main as cli

    assert cli(["gpu-check", "--cpu", "--parts", "engine-e2e,loader"]) == 2
    err = capsys.readouterr().err
    assert "no part named 'engine-e2e'" in err and "engine_e2e" in err and "'loader'" not in err
