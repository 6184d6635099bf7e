"""The GLSim authors' checkpoints (arkel23/GLSim, NYCU-PCSxNTHU-MIS/GLSim on the hub) load into our GLSimViT.

The key/shape table below is written from the authors' architecture definition (ViTGLSim in glsim/model_utils/glsim.py,
Transformer/BlockVanilla in transformer.py, their trainer's save_model wrapper), at tiny dimensions so the suite stays
fast: the same names as their ViT-B/16, with a ViT-Ti width, 32 px images (a 2x2 grid) and 5 classes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from pipeline.models import build_model
from pipeline.models.glsim_authors import authors_to_ours, ours_to_authors
from pipeline.models.weights import WeightsError

MODEL, IMG, CLASSES, TOP_K = "vit_tiny_patch16_224", 32, 5, 2
DIM, MLP, DEPTH, PATCH = 192, 768, 12, 16  # timm's vit_tiny_patch16_224 = their vit_t16 config
TOKENS = (IMG // PATCH) ** 2 + 1


def _block(prefix: str) -> dict[str, tuple[int, ...]]:
    """Their BlockVanilla: separate q/k/v projections, an output projection beside attn, pwff.fc1/fc2, norm1/2."""
    shapes = {}
    for name in ("attn.proj_q", "attn.proj_k", "attn.proj_v", "proj"):
        shapes |= {f"{prefix}.{name}.weight": (DIM, DIM), f"{prefix}.{name}.bias": (DIM,)}
    for name in ("norm1", "norm2"):
        shapes |= {f"{prefix}.{name}.weight": (DIM,), f"{prefix}.{name}.bias": (DIM,)}
    return shapes | {
        f"{prefix}.pwff.fc1.weight": (MLP, DIM),
        f"{prefix}.pwff.fc1.bias": (MLP,),
        f"{prefix}.pwff.fc2.weight": (DIM, MLP),
        f"{prefix}.pwff.fc2.bias": (DIM,),
    }


def authors_table() -> dict[str, tuple[int, ...]]:
    """Every tensor of their wrapper's state dict (`model.` = the wrapper's ViTGLSim) for the GLSim method config
    (classifier cls, dynamic_anchor, anchor_class_token, reducer cls = Identity, aggregator + aggregator_norm)."""
    table = {
        "patch_embedding.weight": (DIM, 3, PATCH, PATCH),
        "patch_embedding.bias": (DIM,),
        "class_token": (1, 1, DIM),
        "positional_embedding.pos_embedding": (1, TOKENS, DIM),
        "encoder_norm.weight": (DIM,),
        "encoder_norm.bias": (DIM,),
        "aggregator_norm.weight": (DIM,),
        "aggregator_norm.bias": (DIM,),
        "head.weight": (CLASSES, DIM),
        "head.bias": (CLASSES,),
        "anchor_class_token": (1, 1, DIM),
    }
    for i in range(DEPTH):
        table |= _block(f"encoder.blocks.{i}")
    table |= _block("aggregator.blocks.0")
    return {f"model.{k}": v for k, v in table.items()}


def _authors_checkpoint(path, state: dict[str, torch.Tensor]) -> None:
    """Their trainer's file: config (an argparse Namespace), epoch, model, accuracy, optimizer."""
    config = argparse.Namespace(
        model_name="vit_t16",
        image_size=IMG,
        num_classes=CLASSES,
        dynamic_top=TOP_K,
        dataset_name="dafb",
        custom_mean_std=True,
        device=torch.device("cpu"),
    )
    torch.save(
        {
            "config": config,
            "epoch": 3,
            "model": state,
            "accuracy": 0.5,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        },
        path,
    )


def _random_authors_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.1 for k, shape in authors_table().items()}


def _glsim(weights: str = "none", method: str = "glsim") -> torch.nn.Module:
    return build_model(method, MODEL, CLASSES, weights, IMG, glsim_top_k=TOP_K, layer_norm_eps=1e-12).eval()


def test_authors_state_dict_loads_with_no_missing_or_unexpected_key(tmp_path):
    theirs = _random_authors_state()
    ours, unused = authors_to_ours(theirs)
    model = _glsim()
    assert unused == ["anchor_class_token"]  # the one tensor their forward never reads
    assert set(ours) == set(model.state_dict())  # every GLSimViT tensor, nothing else
    result = model.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert len(theirs) == 219 and len(ours) == 166  # the ViT-B/16 counts too (12 blocks + 1 aggregator block)

    _authors_checkpoint(tmp_path / "dafb_vit_t16.pth", theirs)
    loaded = _glsim(f"file:{tmp_path / 'dafb_vit_t16.pth'}")
    state = loaded.state_dict()
    assert torch.equal(state["head.weight"], theirs["model.head.weight"])
    assert torch.equal(state["aggregator.1.bias"], theirs["model.aggregator_norm.bias"])
    q, k, v = state["vit.blocks.7.attn.qkv.weight"].chunk(3)
    assert torch.equal(k, theirs["model.encoder.blocks.7.attn.proj_k.weight"])
    assert loaded.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # custom_mean_std on DAF:re: Google's [-1, 1] range


def test_ours_to_theirs_to_ours_is_identical_and_has_their_exact_names_and_shapes():
    model = _glsim()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero-initialised head hiding a mix-up
    ours = model.state_dict()
    theirs = ours_to_authors(ours)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == authors_table()
    back, _ = authors_to_ours(theirs)
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_forward_of_loaded_model_equals_the_source_model(tmp_path):
    source = _glsim()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(std=0.2)
    path = tmp_path / "ckpt.pth"
    _authors_checkpoint(path, ours_to_authors(source.state_dict()))
    loaded = _glsim(f"file:{path}")
    x = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = source.forward_with_crops(x), loaded.forward_with_crops(x)
    assert torch.equal(a.boxes, b.boxes)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-6)
    assert a.logits.abs().max() > 0.1  # a real comparison, not two zero heads


def test_a_plain_vit_takes_the_encoder_of_an_authors_checkpoint(tmp_path):
    theirs = _random_authors_state(2)
    _authors_checkpoint(tmp_path / "c.pth", theirs)
    vit = build_model("vit", MODEL, 7, f"file:{tmp_path / 'c.pth'}", IMG)  # 7 classes: a new head
    assert torch.equal(vit.state_dict()["blocks.3.mlp.fc2.weight"], theirs["model.encoder.blocks.3.pwff.fc2.weight"])
    assert torch.equal(vit.state_dict()["pos_embed"], theirs["model.positional_embedding.pos_embedding"])


def test_unmatched_keys_are_named(tmp_path):
    theirs = _random_authors_state()
    theirs["model.reducer.weight"] = torch.zeros(DIM, DIM)  # a representation_size != hidden_size reducer
    del theirs["model.encoder.blocks.2.attn.proj_v.bias"]
    _authors_checkpoint(tmp_path / "bad.pth", theirs)
    with pytest.raises(WeightsError) as err:
        _glsim(f"file:{tmp_path / 'bad.pth'}")
    assert "model.reducer.weight" not in str(err.value)  # names are given without the wrapper prefix
    assert "reducer.weight" in str(err.value) and "vit.blocks.2.attn.qkv.bias (only kq of q/k/v)" in str(err.value)

    theirs = _random_authors_state()
    del theirs["model.encoder.blocks.5.norm2.weight"]
    _authors_checkpoint(tmp_path / "short.pth", theirs)
    with pytest.raises(WeightsError, match=r"lacks 1 of the 166 tensors.*vit\.blocks\.5\.norm2\.weight"):
        _glsim(f"file:{tmp_path / 'short.pth'}")


def _fake_hub_cache(cache, repo: str, filename: str, payload) -> None:
    """huggingface_hub's cache layout: models--ORG--NAME/refs/main -> snapshots/<commit>/<file>."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    (folder / "snapshots" / commit).mkdir(parents=True)
    _authors_checkpoint(folder / "snapshots" / commit / filename, payload)


def test_hf_hub_file_reference_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    theirs = _random_authors_state(3)
    _fake_hub_cache(tmp_path / "hub", "NYCU-PCSxNTHU-MIS/GLSim", "dafb_vit_t16.pth", theirs)
    model = _glsim("hf-hub:NYCU-PCSxNTHU-MIS/GLSim/dafb_vit_t16.pth")
    assert torch.equal(model.state_dict()["head.bias"], theirs["model.head.bias"])
    with pytest.raises(
        WeightsError,
        match=r"cub_vit_t16\.pth of NYCU-PCSxNTHU-MIS/GLSim is not in the local "
        r"Hugging Face cache.*hf download NYCU-PCSxNTHU-MIS/GLSim cub_vit_t16\.pth",
    ):
        _glsim("hf-hub:NYCU-PCSxNTHU-MIS/GLSim/cub_vit_t16.pth")


def _glsim_layout_release(base, rows: dict[str, list[tuple[int, str]]]) -> None:
    """A tiny DAF:re snapshot in GLSim's layout: the label CSVs beside fullMin256/ (see test_dafre.py)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    base.mkdir(parents=True)
    for split, items in rows.items():
        (base / f"{split}.csv").write_text("class_id,dir\n" + "".join(f"{c},{d}\n" for c, d in items))
        for _, d in items:
            (base / "fullMin256" / d).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(base / "fullMin256" / d)
    (base / "classid_classname.csv").write_text("class_id,class_name\n0,morrigan_aensland\n1,uchiha_sasuke\n")


def test_evaluate_weights_runs_the_authors_checkpoint_on_the_dafre_test_split(tmp_path, monkeypatch):
    """The README's two commands at tiny size: acquire dafre, then evaluate-weights on the authors' file."""
    import polars as pl

    from pipeline.cli import main as cli
    from pipeline.data.transforms import eval_transform

    monkeypatch.chdir(tmp_path)
    rows = {
        "train": [(0, "0001/101.jpg"), (1, "0002/102.jpg")],
        "val": [(1, "0003/103.jpg")],
        "test": [(0, f"0004/{200 + i}.jpg") for i in range(3)] + [(1, f"0005/{300 + i}.jpg") for i in range(3)],
    }
    _glsim_layout_release(tmp_path / "DAFB", rows)
    source = _glsim()
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(std=0.2)
    _authors_checkpoint(tmp_path / "dafb_vit_t16.pth", ours_to_authors(source.state_dict()))
    assert (
        cli(["acquire", "dafre", "--path", "DAFB", "--images", "fullMin256", "--shard-size", "0", "--out", "raw"]) == 0
    )
    assert (
        cli(
            [
                "evaluate-weights",
                "file:dafb_vit_t16.pth",
                "--split",
                "raw/manifest.parquet",
                "--images",
                "raw",
                "--out",
                "authors",
                "--model",
                MODEL,
            ]
        )
        == 0
    )  # size and top-k from the checkpoint's saved config
    metrics = json.loads((tmp_path / "authors" / "metrics.json").read_text())
    assert metrics["test_images"] == 6
    # the same predictions as the source model, through the authors' test transform (300/224: 42 -> 32 px here)
    df = pl.read_parquet(tmp_path / "raw" / "manifest.parquet").filter(pl.col("split") == "test")
    transform = eval_transform(
        IMG, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "eval_resize": int(IMG * 1.34)}
    )
    from PIL import Image

    x = torch.stack(
        [transform(image=np.asarray(Image.open(tmp_path / "raw" / p).convert("RGB")))["image"] for p in df["path"]]
    )
    with torch.no_grad():
        want = source(x).argmax(1).tolist()
    names = ["morrigan_aensland", "uchiha_sasuke", "class_2", "class_3", "class_4"]
    predictions = pl.read_csv(tmp_path / "authors" / "predictions.csv")
    assert predictions["predicted"].to_list() == [names[i] for i in want]
