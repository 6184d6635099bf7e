"""params.yaml validation: every kind of mistake fails before any work, naming the dotted key and the reason.

Checked at three levels: the library (`load_params` raises ParamsError), a stage entry point (stages/split.py exits
with code 2, prints the key on stderr, writes nothing) and `python -m pipeline check-params`.
"""

from __future__ import annotations

import copy
import runpy
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import Params, ParamsError, flatten, load_params
from pipeline.data import manifest

REPO = Path(__file__).resolve().parents[1]
EMOJI = REPO / "datasets" / "emoji"
SPLIT_STAGE = REPO / "stages" / "split.py"


# ----------------------------------------------------------------------------------------------------------- helpers


def repo_raw() -> dict:
    """The repo's params.yaml as a dict, made usable from any folder (embedded path made absolute)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["acquire"]["embedded"]["path"] = str(EMOJI)
    return raw


def set_dotted(raw: dict, dotted: str, value) -> dict:
    d = raw
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value
    return raw


def params_with(tmp_path: Path, changes: dict, name: str = "params.yaml") -> Path:
    raw = copy.deepcopy(repo_raw())
    for dotted, value in changes.items():
        set_dotted(raw, dotted, value)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def error_line(message: str, key: str) -> str:
    """The `  - <key>: <reason>` line of a ParamsError message (fails if the key has no line of its own)."""
    lines = [ln for ln in message.splitlines() if ln.strip().startswith(f"- {key}: ")]
    assert lines, f"no line for key {key!r} in:\n{message}"
    return lines[0]


# (id, changes to the repo params, dotted key named in the message, fragment of the reason)
BAD = [
    ("unknown_section", {"trian": {"lr": 0.1}}, "trian", "unknown key"),
    ("unknown_nested", {"train.lrr": 0.1}, "train.lrr", "unknown key"),
    ("unknown_deep", {"acquire.embedded.style": ["noto"]}, "acquire.embedded.style", "unknown key"),
    ("wrong_type", {"train.epochs": "many"}, "train.epochs", "valid integer"),
    # Strict types (issue 15): a string or a boolean never becomes a number, nor a number a boolean.
    ("numeric_string", {"train.epochs": "15"}, "train.epochs", "valid integer (got '15')"),
    ("bool_as_int", {"train.epochs": True}, "train.epochs", "valid integer (got True)"),
    ("float_as_int", {"train.epochs": 15.0}, "train.epochs", "valid integer"),
    ("string_float", {"train.lr": "0.01"}, "train.lr", "valid number (got '0.01')"),
    # `1e-3` unquoted is a number (as DVC reads it); a quoted one: test_exponent_floats_read_as_numbers_as_dvc_...
    ("yaml_bool_hint", {"train.epochs": True}, "train.epochs", "YAML reads yes/no/on/off/true/false (unquoted)"),
    ("bool_as_float", {"train.label_smoothing": False}, "train.label_smoothing", "valid number"),
    ("int_as_bool", {"train.resume": 1}, "train.resume", "valid boolean"),
    ("string_bool", {"train.resume": "yes"}, "train.resume", "valid boolean"),
    ("variant_string_int", {"variants.ila.epochs": "10"}, "variants.ila.epochs", "valid integer"),
    ("tuple_item_type", {"clean.background": [255, "255", 0]}, "clean.background.1", "valid integer"),
    ("negative_epochs", {"train.epochs": -1}, "train.epochs", "greater than or equal to 1"),
    (
        "ratio_out_of_range",
        {"split.ratios": {"train": 1.5, "val": -0.3, "test": -0.2}},
        "split.ratios.train",
        "less than or equal to 1",
    ),
    ("ratios_sum", {"split.ratios": {"train": 0.7, "val": 0.2, "test": 0.2}}, "split.ratios", "must sum to 1, got 1.1"),
    (
        "patch_size",
        {"train.model": "vit_tiny_patch16_224", "train.img_size": 100},
        "train.img_size",
        "100 is not divisible by the patch size 16",
    ),
    (
        "weights_spec",
        {"train.weights": "imagenet"},
        "train.weights",
        "must be none, hub, hf-hub:ORG/NAME, local-dir:PATH, file:PATH",
    ),
    (
        "embedded_path",
        {"acquire.embedded.path": "no/such/dataset"},
        "acquire.embedded.path",
        "folder 'no/such/dataset' does not exist",
    ),
    (
        "folder_path",
        {"acquire.source": "folder", "acquire.folder.path": "missing_images"},
        "acquire.folder.path",
        "folder 'missing_images' does not exist",
    ),
    ("folder_path_unset", {"acquire.source": "folder"}, "acquire.folder.path", "required when acquire.source"),
    ("weights_file", {"train.weights": "file:missing.pth"}, "train.weights", "file 'missing.pth' does not exist"),
    ("variant_unknown_key", {"variants.ila.lrr": 0.1}, "variants.ila.lrr", "unknown key"),
    ("variant_bad_value", {"variants.ila.img_size": 100}, "variants.ila.img_size", "not divisible by"),
    ("variant_cnn_patch", {"variants.cnn.patch_size": 16}, "variants.cnn.patch_size", "applies to ViT models"),
    ("variant_name", {"variants": {"my model": {}}}, "variants.my model", "letters, digits"),
    ("variants_empty", {"variants": {}}, "variants", "at least one model"),
    ("device", {"base.device": "gpu"}, "base.device", "must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("device_index", {"base.device": "cuda:x"}, "base.device", "must be auto, cpu, cuda or cuda:N"),
    ("groups_overlap", {"split.val_groups": ["emojione", "twemoji"]}, "split.val_groups", "['twemoji']"),
    ("no_test_groups", {"split.test_groups": []}, "split.test_groups", "at least one group"),
    ("background", {"clean.background": [255, 256, 0]}, "clean.background", "0..255"),
    ("bad_literal", {"split.strategy": "random"}, "split.strategy", "'per_class' or 'group'"),
]
BAD_IDS = [b[0] for b in BAD]


# ----------------------------------------------------------------------------------------------------- library level


def test_repo_params_load_with_expected_values() -> None:
    p = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert p.base.seed == raw["base"]["seed"] == 42
    assert p.acquire.source == "embedded"
    assert p.split.test_groups == tuple(raw["split"]["test_groups"])  # YAML lists arrive as tuples, items intact
    assert p.acquire.embedded.styles == ("noto", "twemoji", "openmoji", "emojione")
    assert p.train.epochs == raw["train"]["epochs"] and p.train.lr == raw["train"]["lr"]
    assert isinstance(p.clean.background, tuple) and p.clean.background == (255, 255, 255)


def test_an_int_is_a_valid_float_in_strict_mode(tmp_path: Path) -> None:
    p = load_params(params_with(tmp_path, {"train.weight_decay": 0, "train.lr": 1}))
    assert p.train.weight_decay == 0.0 and isinstance(p.train.lr, float)


def test_repo_params_spell_out_every_key_with_known_names() -> None:
    """params.yaml lists every key of pipeline/config.py (DVC tracks them by name) and nothing else."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return out

    def fixed(ks) -> set[str]:  # `variants` holds free-form entries (their keys are checked as train keys)
        return {k for k in ks if not k.startswith("variants.")}

    assert fixed(keys(raw)) == fixed(flatten(Params())) and "variants" in raw


def test_defaults_alone_are_valid(tmp_path: Path) -> None:
    """An empty params file means all defaults; only the relative embedded path must exist next to it."""
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "emoji").symlink_to(EMOJI)
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


@pytest.mark.parametrize("case_id,changes,key,reason", BAD, ids=BAD_IDS)
def test_load_params_names_key_and_reason(tmp_path: Path, case_id, changes, key, reason) -> None:
    path = params_with(tmp_path, changes)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"invalid parameters in {path}")
    assert reason in error_line(message, key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_every_problem_listed_in_one_message(tmp_path: Path) -> None:
    path = params_with(tmp_path, {"train.lrr": 1, "train.epochs": -1, "base.device": "gpu"})
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    for key in ("train.lrr", "train.epochs", "base.device"):
        error_line(message, key)
    assert len([ln for ln in message.splitlines() if ln.startswith("  - ")]) == 3


def test_relative_paths_resolve_against_params_folder(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "w.pth").write_bytes(b"x")
    path = params_with(
        tmp_path, {"acquire.source": "folder", "acquire.folder.path": "imgs", "train.weights": "file:w.pth"}
    )
    p = load_params(path)  # cwd is not tmp_path, so this only passes if paths resolve against the file's folder
    assert p.acquire.folder.path == "imgs" and p.train.weights == "file:w.pth"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1\n  epochs: 3\n")
    with pytest.raises(ParamsError, match="is not valid YAML"):
        load_params(path)


def test_top_level_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- train\n- lr\n")
    with pytest.raises(ParamsError, match="top level must be a mapping of sections, got list"):
        load_params(path)


def test_missing_params_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="does not exist") as info:
        load_params(missing)
    assert str(missing) in str(info.value)
    assert not missing.exists()


def test_overrides_are_validated(tmp_path: Path) -> None:
    path = params_with(tmp_path, {})
    assert load_params(path, {"train.lr": 0.01, "split.strategy": "per_class"}).train.lr == 0.01
    with pytest.raises(ParamsError) as info:
        load_params(path, {"train.epochs": 0})
    assert "greater than or equal to 1" in error_line(str(info.value), "train.epochs")


def test_params_are_frozen() -> None:
    p = Params()
    with pytest.raises(ValidationError):
        p.train.lr = 1.0  # type: ignore[misc]


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(Params())
    assert flat["train.lr"] == 1.0e-3
    assert flat["train.epochs"] == 15
    assert flat["split.ratios.train"] == 0.7
    assert flat["split.ratios.test"] == 0.2
    assert flat["acquire.embedded.styles"] == ["noto", "twemoji", "openmoji", "emojione"]
    assert flat["acquire.folder.path"] is None
    assert flat["clean.background"] == [255, 255, 255]
    assert not any(isinstance(v, dict) for v in flat.values())
    assert "train" not in flat and "split.ratios" not in flat
    assert all(k.count(".") in (1, 2) for k in flat)
    assert flatten(Params().train, prefix="train.") == {k: v for k, v in flat.items() if k.startswith("train.")}


# ------------------------------------------------------------------------------------------------------ stage level


def clean_manifest(folder: Path) -> Path:
    """A small valid `clean` output (manifest only: split reads no image) in the emoji layout."""
    rows = []
    for cid, cls in enumerate(["a", "b", "c"]):
        for style in ("noto", "openmoji", "twemoji", "emojione"):
            rows.append(
                dict(
                    image_id=f"{style}-{cls}",
                    path=f"images/{style}/{cls}.png",
                    class_id=cid,
                    class_name=cls,
                    source="embedded",
                    group=style,
                    md5=f"{cid}{style}",
                    width=64,
                    height=64,
                    split=None,
                )
            )
    return manifest.write(pl.DataFrame(rows, schema=manifest.SCHEMA), folder)


def split_argv(tmp_path: Path, params: Path) -> tuple[list[str], list[Path]]:
    clean_dir = tmp_path / "clean"
    if not clean_dir.exists():
        clean_manifest(clean_dir)
    out = tmp_path / "out" / "manifest.parquet"
    metrics = tmp_path / "m.json"
    argv = ["--params", str(params), "--clean", str(clean_dir), "--out", str(out), "--metrics", str(metrics)]
    return argv, [out, out.parent, metrics]


def run_script_in_process(script: Path, argv: list[str], monkeypatch) -> int:
    """Run a stage script as __main__ in this process (its own parser and sys.exit), return the exit code."""
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(script), run_name="__main__")
    return info.value.code


def test_split_stage_valid_params_writes_outputs(tmp_path: Path, monkeypatch, capsys) -> None:
    """Control for the failure cases: with the same arguments and good params the outputs do appear."""
    argv, outputs = split_argv(tmp_path, params_with(tmp_path, {}))
    assert run_script_in_process(SPLIT_STAGE, argv, monkeypatch) == 0
    assert all(p.exists() for p in outputs)
    df = manifest.read(outputs[0])
    assert df.filter(pl.col("group") == "twemoji")["split"].unique().to_list() == ["test"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("case_id,changes,key,reason", BAD, ids=BAD_IDS)
def test_a_stage_rejects_bad_params_before_work(
    tmp_path: Path, monkeypatch, capsys, case_id, changes, key, reason
) -> None:
    """A data-section error stops the split stage itself; a training-section error stops check_params, the stage
    DVC runs before any other (the data stages validate only base and their own sections: pipeline/data_config.py)."""
    from pipeline.data_config import TRAINING_SECTIONS

    argv, outputs = split_argv(tmp_path, params_with(tmp_path, changes))
    if key.split(".")[0] in TRAINING_SECTIONS:
        outputs = [tmp_path / "params_check.txt"]
        argv = ["--params", argv[1], "--out", str(outputs[0])]
        assert run_script_in_process(SPLIT_STAGE.parent / "check_params.py", argv, monkeypatch) == 2
    else:
        assert run_script_in_process(SPLIT_STAGE, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid parameters in ")
    assert reason in error_line(err, key)
    assert not any(p.exists() for p in outputs)


@pytest.mark.parametrize(
    "content,fragment",
    [("train: [1\n", "is not valid YAML"), (None, "does not exist")],
    ids=["invalid_yaml", "missing_file"],
)
def test_split_stage_rejects_unreadable_params(tmp_path: Path, monkeypatch, capsys, content, fragment) -> None:
    params = tmp_path / "params.yaml"
    if content is not None:
        params.write_text(content)
    argv, outputs = split_argv(tmp_path, params)
    assert run_script_in_process(SPLIT_STAGE, argv, monkeypatch) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and fragment in err and str(params) in err
    assert not any(p.exists() for p in outputs)


# --------------------------------------------------------------------------------------------------- process level

SUBPROCESS_CASES = {  # the split stage validates base and the data sections (training ones: check_params)
    "unknown_nested": ({"split.shufle": True}, "split.shufle", "unknown key"),
    "source_folder": ({"acquire.embedded.path": "missing-folder"}, "acquire.embedded.path", "does not exist"),
}


@pytest.fixture(scope="module")
def split_processes(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, list[Path]]]:
    """Run stages/split.py as real processes with bad params, concurrently; cwd is the repo root."""
    started = {}
    for name, (changes, _, _) in SUBPROCESS_CASES.items():
        tmp = tmp_path_factory.mktemp(name)
        argv, outputs = split_argv(tmp, params_with(tmp, changes))
        proc = subprocess.Popen(
            [sys.executable, str(SPLIT_STAGE), *argv],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started[name] = (proc, outputs)
    done = {}
    for name, (proc, outputs) in started.items():
        out, err = proc.communicate(timeout=120)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), outputs)
    return done


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_split_process_bad_params(split_processes, name) -> None:
    result, outputs = split_processes[name]
    _, key, reason = SUBPROCESS_CASES[name]
    assert result.returncode == 2, result.stderr
    assert reason in error_line(result.stderr, key)
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not any(p.exists() for p in outputs)


def test_check_params_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline", "check-params", "--params", "params.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("params.yaml: OK")

    bad = params_with(tmp_path, {"train.epochs": -1})
    res = subprocess.run(
        [sys.executable, "-m", "pipeline", "check-params", "--params", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert "greater than or equal to 1" in error_line(res.stderr, "train.epochs")
    assert res.stdout == ""


# ----------------------------------------------------------------------------------------------------------- variants


def test_variant_overrides_only_its_keys(tmp_path):
    params = load_params(params_with(tmp_path, {}))
    assert list(params.variants) == ["cnn", "vit", "glsim", "ila"]
    cnn, glsim = params.with_variant("cnn"), params.with_variant("glsim")
    assert cnn.train == params.train  # {}: the train section as written
    distilled = "file:weights/vit_tiny_distilled_128.safetensors"
    assert (glsim.train.method, glsim.train.model, glsim.train.weights) == ("glsim", "vit_tiny_patch16_224", distilled)
    own = {
        "method": "cnn",
        "model": params.train.model,
        "weights": params.train.weights,
        "img_size": params.train.img_size,
        "epochs": params.train.epochs,
    }  # the keys glsim sets itself
    assert glsim.train.model_copy(update=own) == params.train


def test_variant_recipe_replaces_train_values_and_its_own_keys_win(tmp_path):
    from pipeline.config import RECIPES

    path = params_with(
        tmp_path,
        {
            "variants.paper": {
                "method": "glsim",
                "model": "test_vit",
                "recipe": "glsim",
                "backbone_cnn": "tf_efficientnet_lite0",
                "epochs": 3,
            }
        },
    )
    train = load_params(path).with_variant("paper").train
    assert train.lr == RECIPES["glsim"]["lr"] and train.augment == "med" and train.optimizer == "sgd"
    assert train.epochs == 3  # the variant's own key, not the recipe's 50


def test_unknown_variant_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"variants.vit-b: no such variant .*have cnn, vit, glsim, ila"):
        load_params(params_with(tmp_path, {})).with_variant("vit-b")


# ------------------------------------------------------------------------------------------------- issue 23 (params)


def _with_line(tmp_path: Path, old: str, new: str) -> Path:
    """The repo's params.yaml as text with one line replaced (YAML scalars exactly as a user types them)."""
    text = yaml.safe_dump(repo_raw(), sort_keys=False)
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_exponent_floats_read_as_numbers_as_dvc_reads_them(tmp_path: Path) -> None:
    """Issue 23 case 7: DVC (YAML 1.2) reads `lr: 1e-3` as 0.001 and saw no change, while the stage read the text
    '1e-3' and refused it: a forced single-stage run lost its outputs to that disagreement. Both read a number now."""
    params = load_params(_with_line(tmp_path, "  lr: 0.001\n", "  lr: 1e-3\n"))
    assert params.train.lr == 0.001
    params = load_params(_with_line(tmp_path, "  min_lr: 1.0e-05\n", "  min_lr: 1.0e5\n"))
    assert params.train.min_lr == 100000.0
    quoted = _with_line(tmp_path, "  lr: 0.001\n", "  lr: '1e-3'\n")  # text stays text
    with pytest.raises(ParamsError, match="YAML reads 1e-3 as text"):
        load_params(quoted)


def test_a_yaml_boolean_for_a_number_names_yamls_booleans(tmp_path: Path) -> None:
    """Issue 23 case 7: `epochs: yes` said `(got True)` with no hint."""
    with pytest.raises(ParamsError) as info:
        load_params(_with_line(tmp_path, "  epochs: 15\n", "  epochs: yes\n"))
    line = error_line(str(info.value), "train.epochs")
    assert "(got True)" in line and "YAML reads yes/no/on/off/true/false" in line


def _declared_sections() -> list[str]:
    """Top-level sections of params.yaml that some dvc.yaml stage names in its params (read with plain yaml)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = set()
    for stage in stages.values():
        for entry in stage.get("do", stage).get("params", []):
            if isinstance(entry, str):
                names.add(entry.split(".")[0])
    return sorted(names)


@pytest.mark.parametrize("section", _declared_sections())
def test_check_params_refuses_a_section_that_a_stage_declares(tmp_path: Path, section: str) -> None:
    """Issue 23 case 4: with `evaluate:` deleted, check_params passed (defaults), and DVC deleted evaluate's
    outputs before stopping on the missing params. The stage now fails first, naming the section."""
    raw = repo_raw()
    del raw[section]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / "dvc.yaml").write_bytes((REPO / "dvc.yaml").read_bytes())
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "emoji").symlink_to(EMOJI)  # the default path, once the acquire section is gone
    res = subprocess.run(
        [sys.executable, str(REPO / "stages/check_params.py"), "--out", "ok.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert "missing from params.yaml" in error_line(res.stderr, section)
    assert not (tmp_path / "ok.txt").exists()


def test_declared_keys_cover_foreach_and_matrix_bodies(tmp_path: Path) -> None:
    from pipeline import dvcparams

    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "plain": {"cmd": "x", "params": ["base.seed", {"params.yaml": ["split"]}, {"other.yaml": ["foo"]}]},
                    "each": {
                        "foreach": "${variants}",
                        "do": {"cmd": "x", "params": ["variants.${key}", "evaluate.top_k"]},
                    },
                    "grid": {"matrix": {"seed": [1, 2]}, "cmd": "x", "params": ["train", "seeds.${item.seed}"]},
                    "all": {"cmd": "x", "params": [{"params.yaml": None}]},
                }
            }
        )
    )
    declared = dvcparams.declared_keys(tmp_path / "dvc.yaml")
    assert declared == {
        "base.seed": ["plain"],
        "split": ["plain"],
        "variants": ["each"],
        "evaluate.top_k": ["each"],
        "train": ["grid"],
        "seeds": ["grid"],
    }
    raw = {"base": {"seed": 1}, "split": {}, "variants": {}, "evaluate": {}, "train": {}}
    assert [m.split(":")[0].strip() for m in dvcparams.missing_keys(raw, tmp_path / "dvc.yaml")] == [
        "- evaluate.top_k",
        "- seeds",
    ]
