"""`python -m pipeline bench`: one JSON object with both sides measured on the same batch."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_json_measures_both_sides() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "bench",
            "--img-size",
            "32",
            "--batch-size",
            "4",
            "--num-classes",
            "5",
            "--steps",
            "1",
            "--rounds",
            "2",
            "--threads",
            "1",
            "--json",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (r["model"], r["method"], r["img_size"], r["batch_size"], r["threads"]) == (
        "tf_efficientnet_lite0",
        "cnn",
        32,
        4,
        1,
    )
    assert r["ours_img_per_s"] > 0 and r["reference_img_per_s"] > 0
    assert r["ratio"] > 0 and r["note"] == "same architecture"  # a CNN is compared with its own timm build


def test_bench_loader_reports_each_recipe_against_decode_resize() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "loader", "--images", "8", "--rounds", "1", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    ips = r["img_per_s_per_worker"]
    assert set(ips) == {"rrc", "weak", "med", "med_decode_device", "decode_resize_224", "decode_resize_300", "collate"}
    assert all(v > 0 for v in ips.values()) and set(r["ratio"]) == {"rrc", "weak", "med"}
    assert all(v > 0 for v in r["ratio"].values())
    assert list(REPO.glob("bench-loader-*")) == []  # the JPEGs went to a temporary folder
