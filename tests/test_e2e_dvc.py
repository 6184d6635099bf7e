"""One real `dvc repro` of the whole DAG in a temporary copy of the repository (tiny data, 2 epochs)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_repo, git_commit_all, run_cmd, shrink

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repo")
    copy_repo(dest, n_classes=10)
    params = shrink(yaml.safe_load((dest / "params.yaml").read_text()))
    # FIFO: every trial runs its full budget, so the sweep's result does not depend on which trial reported first
    # (ASHA's early stopping does), and two repros can be compared byte for byte.
    params["tune"]["scheduler"] = "fifo"
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_commit_all(dest, init=True)
    result = run_cmd(["dvc", "repro"], dest)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shutil.copyfile(dest / "dvc.lock", dest.parent / "first-dvc.lock")  # for the reproducibility test (last)
    return dest


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _git_status(repo: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize(
    "bad",
    [{"train": {"lrr": 0.1}}, {"train": {"epochs": "2"}}, {"variants": {"glsim": {"img_size": 30}}}],
    ids=["misspelt", "string", "variant"],
)
def test_invalid_params_fail_before_dvc_touches_any_output(repo, bad):
    """Issue 15: DVC deletes a stage's outputs before running it; with invalid params the stage then refused them,
    and the outputs (git-tracked metrics included) were gone. check_params fails first and nothing changes."""
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    status, data, metrics, plots = (
        _git_status(repo),
        _tree(repo / "data"),
        _tree(repo / "metrics"),
        _tree(repo / "plots"),
    )
    try:
        params = yaml.safe_load(original)
        for section, values in bad.items():
            for k, v in values.items():
                params[section][k] = v if not isinstance(v, dict) else {**params[section][k], **v}
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        result = run_cmd(["dvc", "repro"], repo)
        assert result.returncode != 0
        assert "invalid parameters in params.yaml" in result.stderr + result.stdout
        assert "Running stage 'acquire'" not in result.stdout and "Running stage 'train@" not in result.stdout
    finally:
        params_file.write_text(original)
    assert _git_status(repo) == status
    assert _tree(repo / "data") == data and _tree(repo / "metrics") == metrics and _tree(repo / "plots") == plots
    assert run_cmd(["dvc", "status", "--json"], repo).stdout.strip() in ("{}", "{\n}")


def test_a_missing_params_section_fails_before_dvc_touches_any_output(repo):
    """Issue 23 case 4: with the `evaluate:` section deleted, check_params passed (the stage has defaults), then DVC
    deleted evaluate's outputs and stopped on the missing params. Each section in turn: nothing changes."""
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    status, data, metrics = _git_status(repo), _tree(repo / "data"), _tree(repo / "metrics")
    failed = {}
    try:
        for section in yaml.safe_load(original):
            params = yaml.safe_load(original)
            del params[section]
            params_file.write_text(yaml.safe_dump(params, sort_keys=False))
            result = run_cmd(["dvc", "repro"], repo)
            failed[section] = result.returncode != 0 and section in result.stderr + result.stdout
            assert "Running stage 'acquire'" not in result.stdout and "Running stage 'evaluate@" not in result.stdout
            assert _tree(repo / "metrics") == metrics, section
    finally:
        params_file.write_text(original)
    assert all(failed.values()), failed
    assert _git_status(repo) == status
    assert _tree(repo / "data") == data and _tree(repo / "metrics") == metrics


def test_repro_produces_every_stage_output(repo):
    for out in (
        "data/raw/manifest.parquet",
        "data/clean/manifest.parquet",
        "data/split/manifest.parquet",
        "models/cnn/seed42/model.pt",
        "models/glsim/seed43/config.yaml",
        "metrics/evaluate/ila.json",
        "metrics/evaluate/ila/seed43.json",
        "plots/history/cnn/seed42.csv",
        "plots/samples/glsim/seed43.npz",
        "metrics/environment.json",
        "reports/report.html",
        "reports/report.md",
        "reports/figures/training_curves.png",
        "dvc.lock",
        "mlflow/mlflow.db",
    ):
        assert (repo / out).is_file(), out
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    variants = ("cnn", "vit", "glsim", "ila")
    assert set(lock["stages"]) == {
        "check_params",
        "acquire",
        "faces",
        "clean",
        "split",
        "pretrain",
        "tune",
        "report",
        *(f"{stage}@{v}" for stage in ("train", "evaluate") for v in variants),
    }
    for v in variants:  # the mean over base.seeds, the spread and each seed's own figure (seeds issue)
        result = json.loads((repo / f"metrics/evaluate/{v}.json").read_text())
        assert result["test_images"] == 10 and result["n_seeds"] == 2 and result["seeds"] == [42, 43]
        per_seed = [
            json.loads((repo / f"metrics/evaluate/{v}/seed{s}.json").read_text())["test_top1"] for s in (42, 43)
        ]
        assert result["test_top1_seeds"] == per_seed
        assert result["test_top1"] == pytest.approx(sum(per_seed) / 2) and result["test_top1_std"] >= 0


def test_second_repro_is_a_no_op_and_status_is_clean(repo):
    again = run_cmd(["dvc", "repro"], repo)
    assert again.returncode == 0
    assert "Running stage" not in again.stdout
    status = run_cmd(["dvc", "status", "--json"], repo)
    assert json.loads(status.stdout) == {}


def test_metrics_and_plots_commands(repo):
    shown = run_cmd(["dvc", "metrics", "show", "--json"], repo)
    assert shown.returncode == 0
    assert "test_top1" in shown.stdout and "best_val_top1" in shown.stdout
    plots = run_cmd(["dvc", "plots", "show", "-o", "dvc_plots"], repo)
    assert plots.returncode == 0, plots.stderr
    assert (repo / "dvc_plots/index.html").is_file()


def test_training_knob_does_not_invalidate_acquisition(repo):
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["train"]["lr"] = 0.5
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout))
        assert {"train@cnn", "train@vit", "train@glsim", "train@ila"} <= changed
        assert not changed & {"acquire", "faces", "clean", "split"}
        # A variant's own key changes that variant only.
        params = yaml.safe_load(original)
        params["variants"]["glsim"]["lr"] = 0.5
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = set(json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout))
        assert "train@glsim" in changed and not changed & {"train@cnn", "train@vit", "train@ila", "tune"}
    finally:
        params_file.write_text(original)


def test_editing_a_recipe_reruns_training_but_nothing_upstream(repo):
    """Seeds issue, point 3: every module a stage imports is one of its deps (pipeline/stage_deps.py), so a paper
    recipe edited in pipeline/config.py makes DVC re-run the train stages; the data stages import only
    pipeline/data_config.py and stay up to date. check_params re-validates (its output is constant)."""
    config = repo / "pipeline/config.py"
    original = config.read_text()
    recipe = '"lr": 0.01,\n        "augment": "med",'  # the GLSim recipe's lr, as ruff format lays it out
    assert original.count(recipe) == 1
    try:
        config.write_text(original.replace(recipe, recipe.replace("0.01", "0.02")))
        changed = set(json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout))
        assert {"train@cnn", "train@vit", "train@glsim", "train@ila"} <= changed
        assert not changed & {"acquire", "faces", "clean", "split"}
    finally:
        config.write_text(original)
    assert json.loads(run_cmd(["dvc", "status", "--json"], repo).stdout) == {}


def test_push_to_a_remote_and_pull_into_a_fresh_clone(repo, tmp_path):
    """Issue 3: an acquired dataset travels through a DVC remote (a local directory here; S3 below)."""
    remote = tmp_path / "remote"
    assert run_cmd(["dvc", "remote", "add", "-d", "-f", "store", str(remote)], repo).returncode == 0
    pushed = run_cmd(["dvc", "push", "acquire"], repo)
    assert pushed.returncode == 0, pushed.stderr
    assert any(remote.rglob("*")), "nothing reached the remote"
    # metrics/params_check.txt: check_params' constant output, in git like the metrics (acquire depends on it)
    for cmd in (
        ["git", "add", ".dvc/config", "dvc.lock", "metrics/params_check.txt"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", "remote"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
    assert not (clone / "data/raw").exists()
    pulled = run_cmd(["dvc", "pull", "acquire"], clone)
    assert pulled.returncode == 0, pulled.stderr

    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert tree(clone / "data/raw") == tree(repo / "data/raw")
    status = json.loads(run_cmd(["dvc", "status", "acquire", "--json"], clone).stdout)
    assert status == {}


def test_push_to_s3_and_pull_into_a_fresh_clone(repo, tmp_path, monkeypatch):
    """The same through an S3 remote: dvc-s3 against moto's S3 server on 127.0.0.1 (real HTTP, fake AWS), with the
    credentials in the environment only."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in (
            ("AWS_ACCESS_KEY_ID", "moto-key"),
            ("AWS_SECRET_ACCESS_KEY", "moto-secret"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
        ):
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="dvc-store")

        def use_s3(project: Path) -> None:  # --local: .dvc/config.local, as a user keeps a private endpoint
            for cmd in (
                ["dvc", "remote", "add", "--local", "-f", "s3store", "s3://dvc-store/cache"],
                ["dvc", "remote", "modify", "--local", "s3store", "endpointurl", endpoint],
            ):
                assert run_cmd(cmd, project).returncode == 0

        use_s3(repo)
        pushed = run_cmd(["dvc", "push", "-r", "s3store", "acquire"], repo)
        assert pushed.returncode == 0, pushed.stderr
        objects = s3.list_objects_v2(Bucket="dvc-store", Prefix="cache/").get("KeyCount", 0)
        assert objects > 0
        for cmd in (
            ["git", "add", "dvc.lock", "metrics/params_check.txt"],
            [
                "git",
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@example.invalid",
                "commit",
                "-qm",
                "lock",
                "--allow-empty",
            ],
        ):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)

        clone = tmp_path / "s3-clone"
        subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True, capture_output=True)
        use_s3(clone)
        pulled = run_cmd(["dvc", "pull", "-r", "s3store", "acquire"], clone)
        assert pulled.returncode == 0, pulled.stderr
        manifest = (clone / "data/raw/manifest.parquet").read_bytes()
        assert manifest == (repo / "data/raw/manifest.parquet").read_bytes()
        assert json.loads(run_cmd(["dvc", "status", "acquire", "--json"], clone).stdout) == {}
    finally:
        server.stop()


def test_a_forced_rerun_writes_byte_identical_outputs(repo):
    """Issue 15: timings and run ids are no longer inside DVC outputs, so the same inputs give the same bytes and
    the committed dvc.lock is what a rerun writes. Last in this module: it re-runs every stage."""
    result = run_cmd(["dvc", "repro", "--force"], repo)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def outs(lock_text: str) -> dict:
        stages = yaml.safe_load(lock_text)["stages"]
        return {(name, o["path"]): o for name, st in stages.items() for o in st.get("outs", [])}

    first, again = outs((repo.parent / "first-dvc.lock").read_text()), outs((repo / "dvc.lock").read_text())
    assert first.keys() == again.keys()
    differ = sorted(f"{stage}: {path}" for (stage, path) in first if first[stage, path] != again[stage, path])
    assert not differ, differ
