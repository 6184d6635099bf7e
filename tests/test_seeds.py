"""Several seeds per variant: mean ± std in the metrics files, paired verdicts, and the rerun check."""

from __future__ import annotations

import math

import pytest

from pipeline.seeds import paired, summarize, verdict
from pipeline.verify import compare, tolerance


def _seeds(values: dict[int, float], **extra) -> dict:
    return summarize(
        {s: {"test_top1": v, "test_images": 200, "checkpoint_epoch": s % 3, **extra} for s, v in values.items()}
    )


def test_summary_keeps_the_mean_under_the_old_key_and_adds_spread_and_per_seed_values():
    m = _seeds({42: 0.50, 43: 0.60, 44: 0.70}, gflops=0.14)
    assert m["test_top1"] == pytest.approx(0.60) and m["test_top1_std"] == pytest.approx(0.10)
    assert m["test_top1_seeds"] == [0.50, 0.60, 0.70] and m["n_seeds"] == 3 and m["seeds"] == [42, 43, 44]
    assert m["test_images"] == 200 and "test_images_std" not in m  # the same on every seed: kept as it is
    assert m["gflops"] == 0.14 and m["checkpoint_epoch_seeds"] == [0, 1, 2]


def test_one_seed_has_zero_spread():
    m = _seeds({42: 0.5})
    assert m["test_top1"] == 0.5 and m["test_top1_std"] == 0.0 and m["n_seeds"] == 1


def test_paired_verdicts_read_the_interval_not_the_mean():
    vit = _seeds({42: 0.50, 43: 0.60, 44: 0.70})
    # GLSim better on every seed by 2-4 points: the seeds agree, so it holds although the gap is small
    better = paired(_seeds({42: 0.53, 43: 0.62, 44: 0.74}), vit)
    assert better.diffs == pytest.approx((0.03, 0.02, 0.04)) and better.low > 0
    assert verdict(better) == "holds"
    # a larger mean gain whose seeds disagree in sign: undecided
    noisy = paired(_seeds({42: 0.70, 43: 0.55, 44: 0.75}), vit)
    assert noisy.mean > better.mean and verdict(noisy) == "undecided at this noise"
    worse = paired(_seeds({42: 0.40, 43: 0.49, 44: 0.61}), vit)
    assert verdict(worse) == "does not hold"
    # ILA's claim is a threshold: within 5 points below the ViT
    assert verdict(paired(_seeds({42: 0.48, 43: 0.585, 44: 0.69}), vit), -0.05) == "holds"


def test_one_shared_seed_is_always_undecided():
    p = paired(_seeds({42: 0.9}), _seeds({42: 0.1, 43: 0.2}))
    assert p.n == 1 and math.isinf(p.high) and verdict(p) == "undecided at this noise"
    assert paired(_seeds({1: 0.9}), _seeds({2: 0.1})) is None


def test_rerun_check_separates_seed_noise_from_a_real_change():
    committed = _seeds({42: 0.60, 43: 0.64, 44: 0.62})
    assert compare(committed, dict(committed))[0] == "identical"
    other_cpu = _seeds({42: 0.63, 43: 0.59, 44: 0.61})  # new draws of the same noise
    assert compare(committed, other_cpu)[0] == "within the interval"
    broken = _seeds({42: 0.40, 43: 0.42, 44: 0.41})
    verdict_, diff, tol = compare(committed, broken)
    assert verdict_ == "OUTSIDE the interval" and diff == pytest.approx(-0.21) and tol < 0.21
    # no spread at all: one test image is the tolerance
    flat = _seeds({42: 0.5, 43: 0.5})
    assert tolerance(flat, flat) == pytest.approx(1 / 200)


def test_verify_results_command_compares_the_workspace_with_the_committed_run(tmp_path):
    """`python -m pipeline verify-results` on a git repo: a rerun within the seed noise passes, a broken one fails
    with exit 1, and each verdict is printed beside the figures."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    folder = tmp_path / "metrics/evaluate"
    folder.mkdir(parents=True)
    committed = _seeds({42: 0.60, 43: 0.64, 44: 0.62})
    (folder / "cnn.json").write_text(json.dumps(committed))
    git("init", "-q")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "run")

    def verify(rerun: dict) -> subprocess.CompletedProcess:
        (folder / "cnn.json").write_text(json.dumps(rerun))
        return subprocess.run(
            [sys.executable, "-m", "pipeline", "verify-results"],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        )

    ok = verify(_seeds({42: 0.63, 43: 0.59, 44: 0.61}))
    assert ok.returncode == 0 and "| cnn |" in ok.stdout and "within the interval" in ok.stdout
    bad = verify(_seeds({42: 0.40, 43: 0.42, 44: 0.41}))
    assert bad.returncode == 1 and "OUTSIDE the interval" in bad.stdout and "FAILED" in bad.stdout
