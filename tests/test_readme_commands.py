"""Issue 23: every ```bash block of README.md that a user is told to run is run here, as written, on the shrunk test
config in a temporary copy of the repository. Doc drift then fails CI: an example that breaks names its block.

Only placeholders (`<exp name>`, `<run_id>`, `/mnt/shared/...`) are filled in, each checked to be in the block, so a
changed block is never silently skipped. Blocks that need a network, a GPU or a cluster are listed in SKIP with the
reason (and the test that covers them offline); a new block must be added to RUN or SKIP, or the suite fails.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, REPO, copy_repo, git_commit_all, shrink, train_run

# first command of a block -> why it does not run here
SKIP = {
    "curl -O https://storage.googleapis.com": "downloads the paper weights from the network",
    "export DANBOORU_LOGIN": "crawls danbooru.donmai.us (network); tests/test_danbooru.py runs the crawler offline",
    "export RAY_AUTH_MODE=token": "needs a Ray cluster of GPU nodes; tests/test_tune.py runs a sweep via RAY_ADDRESS",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid mlflow server": "needs a tracking host (mlflow.example.org, "
    "/srv); tests/test_mlflow_server.py runs it",
    "python -m pipeline gpu-check": "needs a GPU; tests/test_gpu_check.py runs its CPU form",
    "python -m pipeline acquire dafre --path /data/dafb": "needs the DAF:re release and the authors' checkpoint "
    "(network); tests/test_glsim_authors.py covers it",
    "python -m pipeline acquire csv --path /data/soyageing": "needs SoyAgeing and the ILA authors' checkpoint "
    "(network); tests/test_ila_authors.py loads that format",
    "hf download xedwin23x/DAFB": "downloads DAF:re from the hub (network)",
    "python -m pipeline pretrain --pack": "needs the pretrain sources (Debian/PyPI downloads) and a GPU; "
    "tests/test_pretrain.py runs the stage's code in tiny form",
}
SKIP_LINES = {"make test": "is this test suite itself"}  # single commands left out of a block that runs


@dataclass
class Block:
    heading: str
    text: str

    @property
    def first(self) -> str:
        return next(ln.strip() for ln in self.text.splitlines() if ln.strip() and not ln.lstrip().startswith("#"))

    def script(self, subs: dict[str, str] | None = None) -> str:
        """The block as a bash script, placeholders filled in (each must be there) and SKIP_LINES left out."""
        text = self.text
        for old, new in (subs or {}).items():
            assert old in text, f"README block under '{self.heading}' no longer holds {old!r}: update this test"
            text = text.replace(old, new)
        kept = [ln for ln in text.splitlines() if not any(ln.startswith(s) for s in SKIP_LINES)]
        return "set -euo pipefail\n" + "\n".join(kept) + "\n"


def readme_blocks(readme: Path = REPO / "README.md") -> list[Block]:
    """Every ```bash block, with the heading it stands under, in README order."""
    blocks, heading = [], ""
    text = readme.read_text()
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ")
        elif m.group(2) == "bash":
            blocks.append(Block(heading, m.group(3)))
    return blocks


# blocks run here, in this order (later ones use what earlier ones made), by their first command
RUN = [
    "make repro",
    "python -m pipeline check-params",
    "python -m pipeline verify-results",
    "python -m pipeline profile",
    "python -m pipeline predict",
    "python -m pipeline export",
    "dvc exp run",
    "torchrun",
    "source .venv/bin/activate",
    "dvc remote add",
]


def _block(first: str) -> Block:
    found = [b for b in readme_blocks() if b.first.startswith(first)]
    assert len(found) == 1, f"{len(found)} README blocks start with {first!r}"
    return found[0]


def test_every_readme_block_is_run_or_skipped_with_a_reason():
    for block in readme_blocks():
        runs = [f for f in RUN if block.first.startswith(f)]
        skips = [f for f in SKIP if block.first.startswith(f)]
        assert len(runs) + len(skips) == 1, (
            f"README block under '{block.heading}' ({block.first!r}): add it to RUN "
            "in tests/test_readme_commands.py, or to SKIP with the reason"
        )


@pytest.mark.parametrize("first", list(SKIP))
def test_blocks_that_need_a_network_or_a_gpu(first):
    _block(first)  # still in the README
    pytest.skip(SKIP[first])


def _set_params() -> list[str]:
    """Every `-S ...` override of the README's bash blocks, unquoted."""
    found = []
    for block in readme_blocks():
        for m in re.finditer(r"-S\s+('[^']*'|\"[^\"]*\"|\S+)", block.text):
            found.append(m.group(1).strip("'\""))
    return found


def _has_key(raw: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(raw, dict) or part not in raw:
            return False
        raw = raw[part]
    return True


def test_set_param_examples_use_dvcs_syntax_for_the_keys_they_name():
    """Issue 23 case 1, without running anything: DVC's Hydra syntax changes an existing key with `key=value`, adds
    a missing one with `+key=value` (which fails on an existing key), and `++key=value` does either."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = _set_params()
    assert len(overrides) >= 4
    for override in overrides:
        key = override.split("=", 1)[0]
        if key.startswith("++"):
            continue
        if key.startswith("+"):
            assert not _has_key(raw, key[1:]), f"{override}: `+` adds a key, but params.yaml has {key[1:]}"
        else:
            assert _has_key(raw, key), f"{override}: params.yaml has no {key}; DVC needs `++{key}=...`"


def test_the_add_a_variant_example_adds_a_new_one_with_its_own_weights():
    """Issue 23 case 2: `+variants.vit={...}` merged into the existing `vit` and kept its weights file."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    added = [o for o in _set_params() if re.match(r"\+variants\.[\w-]+=\{", o)]
    assert len(added) == 1, added
    name, body = added[0].removeprefix("+variants.").split("=", 1)
    assert name not in raw["variants"], f"{name} is an existing variant: the example would merge into it"
    assert "weights" in yaml.safe_load(body)


# ------------------------------------------------------------------------------------------------ the shrunk project


def _env(project: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{project / '.venv/bin'}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }


def run_block(block: Block, cwd: Path, subs: dict[str, str] | None = None, timeout: float = 1800) -> str:
    res = subprocess.run(
        ["bash", "-c", block.script(subs)], cwd=cwd, env=_env(cwd), capture_output=True, text=True, timeout=timeout
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, (
        f"README block under '{block.heading}' failed (exit {res.returncode}):\n"
        f"{block.script(subs)}\n--- output (end) ---\n{out[-4000:]}"
    )
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The repository copied with 6 classes, shrunk params (32 px, 2 epochs, one seed, cnn and glsim, a 1-trial sweep),
    committed on `main`, and `.venv` pointing at the environment running the tests (the one `make install` made)."""
    venv = Path(sys.prefix)
    if not (venv / ".installed").is_file():
        pytest.skip("runs `make` with the project's own .venv (made by `make install`)")
    dest = copy_repo(tmp_path_factory.mktemp("readme"), n_classes=6)
    params = shrink(yaml.safe_load((dest / "params.yaml").read_text()))
    # The blocks name cnn (predict's default model) and glsim; vit and ila would only cost time (test_e2e_dvc.py
    # runs all four). One 1-epoch trial keeps the sweep that `train.lr=...` re-runs short.
    params["variants"] = {k: params["variants"][k] for k in ("cnn", "glsim")}
    params["tune"].update(scheduler="fifo", num_samples=1, epochs=1)
    params["base"]["seeds"] = [42]  # the blocks name no seed; test_e2e_dvc.py runs the several-seed path
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for f in ("requirements.txt", "pyproject.toml"):  # older than .installed: `make` installs nothing
        os.utime(dest / f, (0, 0))
    git_commit_all(dest, init=True)
    (dest / ".git/info/exclude").write_text(".venv\n")  # a link: .gitignore's `.venv/` names folders only
    (dest / ".venv").symlink_to(venv, target_is_directory=True)
    return dest


def _wait_for_queue(project: Path, timeout: float = 900) -> str:
    """`dvc queue start` returns at once; the queued experiments run in a worker. Their final status table."""
    deadline = time.monotonic() + timeout
    while True:
        status = subprocess.run(
            ["dvc", "queue", "status"], cwd=project, env=_env(project), capture_output=True, text=True
        ).stdout
        if not re.search(r"\b(Queued|Running)\b", status) or time.monotonic() > deadline:
            return status
        time.sleep(5)


def _mlflow_ui(block: Block, project: Path) -> None:
    """The `mlflow ui` block serves forever: it must answer on 127.0.0.1:5000, then it is stopped."""
    try:
        urllib.request.urlopen("http://127.0.0.1:5000", timeout=2)
        pytest.skip("port 5000 is taken on this machine")
    except OSError:
        pass
    proc = subprocess.Popen(
        ["bash", "-c", block.script()],
        cwd=project,
        env=_env(project),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    "http://127.0.0.1:5000/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name=anime-fgvc",
                    timeout=5,
                ) as r:
                    assert b"anime-fgvc" in r.read()
                    return
            except OSError:
                assert proc.poll() is None, f"mlflow ui exited: {proc.stderr.read()[-2000:]}"
                time.sleep(2)
        raise AssertionError("mlflow ui did not answer within 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_workflow_blocks_run_as_written(project, tmp_path):
    """One shrunk project, every runnable block in README order (an experiment needs the repro before it)."""
    out = run_block(_block("make repro"), project)
    assert "Running stage 'report'" in out and (project / "reports/report.md").is_file()
    # As in the repository, the committed dvc.lock and metrics are the ones a repro writes: experiments (queued ones
    # too, which start from the last commit) then re-run only what their params change.
    git_commit_all(project, "repro")

    run_block(_block("python -m pipeline check-params"), project)
    # The workspace is the committed run: every variant's seeds are the committed ones to the bit.
    verdicts = run_block(_block("python -m pipeline verify-results"), project)
    rows = {ln.split("|")[1].strip(): ln.split("|")[-2].strip() for ln in verdicts.splitlines() if ln.startswith("| ")}
    assert rows.get("cnn") == rows.get("glsim") == "identical", verdicts
    assert "\nmacs " in run_block(_block("python -m pipeline profile"), project)

    twemoji = sorted((project / "datasets/emoji/images/twemoji").glob("*.png"))
    (project / "artwork").mkdir()
    for src in twemoji[:2]:
        (project / "artwork" / src.name).write_bytes(src.read_bytes())
    (project / "img.png").write_bytes(twemoji[0].read_bytes())
    run_id = train_run(project / "mlflow/mlflow.db", project / "models/cnn/seed42/model.pt").info.run_id
    run_block(_block("python -m pipeline predict"), project, {"<run_id>": run_id})
    assert (project / "predictions.jsonl").read_text().count("\n") == 2
    assert sorted(p.suffixes[-2] for p in (project / "explain").iterdir()) == [".crop", ".gls"]
    run_block(_block("python -m pipeline export"), project)
    assert (project / "export/glsim-hf/model.safetensors").is_file()
    assert (project / "export/glsim-onnx/model.onnx").is_file()

    experiments = _block("dvc exp run")
    out = run_block(
        experiments,
        project,
        {
            "&& dvc queue start": "&& dvc queue start && dvc queue status",
            "<exp name>": "$(dvc exp list --name-only | head -n 1)",
        },
    )
    assert "Running stage 'train@hybrid'" in out, "the example that adds a variant trained none"
    status = _wait_for_queue(project)
    assert status.count("Success") >= 2 and "Failed" not in status, status
    assert (project / "experiments.csv").read_text().count("\n") >= 5
    assert (project / "dvc_plots/index.html").is_file()

    run_block(_block("torchrun"), project)
    assert (project / "models/glsim/seed42/model.pt").is_file()

    _mlflow_ui(_block("source .venv/bin/activate"), project)

    remote = _block("dvc remote add")
    here, elsewhere = remote.text.split("# elsewhere, in a fresh clone:\n")
    store = {"/mnt/shared/anime-fgvc-dvc": str(tmp_path / "store")}
    run_block(Block(remote.heading, here), project, store)
    subprocess.run(["git", "clone", "-q", str(project), str(tmp_path / "clone")], check=True)
    run_block(Block(remote.heading, elsewhere), tmp_path / "clone")
    assert (tmp_path / "clone/data/raw/manifest.parquet").read_bytes() == (
        project / "data/raw/manifest.parquet"
    ).read_bytes()
