"""Issue 14: `train.weights` from every place a researcher keeps paper weights, offline.

Each test writes its own tiny checkpoint (timm's test_vit: 6 blocks of width 64) in the real format (safetensors,
a torch training checkpoint, timm's save_for_hf folder, a Hugging Face hub cache, Google's ViT .npz) and checks a
tensor of the built model against the source, so it fails whenever the weights were not really loaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

from pipeline.data.transforms import data_config
from pipeline.models import build_model
from pipeline.models.weights import WeightsError

ARCH = "test_vit"


def _source(num_classes: int = 10, img_size: int = 224, **kwargs) -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model(ARCH, num_classes=num_classes, img_size=img_size, **kwargs)
    with torch.no_grad():  # the init leaves pos_embed/cls small and some biases zero: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _same_backbone(model: torch.nn.Module, src: torch.nn.Module) -> None:
    own, theirs = model.state_dict(), src.state_dict()
    for key in (
        "patch_embed.proj.weight",
        "cls_token",
        "blocks.0.attn.qkv.weight",
        "blocks.5.mlp.fc2.bias",
        "norm.weight",
    ):
        assert torch.equal(own[key], theirs[key]), key


def _pos_resampled(src: torch.nn.Module, grid: int, **how) -> torch.Tensor:
    return resample_abs_pos_embed(src.pos_embed.detach(), new_size=(grid, grid), num_prefix_tokens=1, **how)


# ----------------------------------------------------------------------------------------------------- local files


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_weight_files_load_with_a_new_head_and_a_resampled_grid(tmp_path, fmt):
    import safetensors.torch

    src = _source()
    path = tmp_path / f"vit.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(src.state_dict(), path)
    else:  # a DDP training checkpoint: state under "state_dict", "module." prefixes, plain-data extras
        torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    model = build_model("vit", ARCH, 5, f"file:{path}", 224)
    _same_backbone(model, src)
    assert torch.equal(model.pos_embed, src.pos_embed)
    assert model.head.weight.shape == (5, 64)  # 10 classes in the file: the head is new

    at_448 = build_model("vit", ARCH, 5, f"file:{path}", 448)  # timm's ViT filter resamples 14x14 -> 28x28
    _same_backbone(at_448, src)
    assert torch.allclose(at_448.pos_embed, _pos_resampled(src, 28, interpolation="bicubic", antialias=True))


def test_a_pth_file_with_pickled_code_is_refused(tmp_path):
    """weights_only=True: a checkpoint that would run code when unpickled is an error, not a load."""
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _source().state_dict(), "hook": _Unsafe()}, path)
    with pytest.raises(WeightsError, match=rf"train.weights=file:{path}: cannot be read .*weights_only"):
        build_model("vit", ARCH, 5, f"file:{path}", 224)


class _Unsafe:
    pass


def test_local_timm_folder_loads_weights_and_normalisation(tmp_path):
    from timm.models import save_for_hf

    src = _source()
    src.pretrained_cfg = {**src.pretrained_cfg, "mean": (0.1, 0.2, 0.3), "std": (0.4, 0.5, 0.6)}
    save_for_hf(src, tmp_path / "vit", safe_serialization=True)
    model = build_model("glsim", ARCH, 5, f"local-dir:{tmp_path / 'vit'}", 224)  # through the GLSim wrapper
    _same_backbone(model.vit, src)
    assert data_config(model)["mean"] == pytest.approx([0.1, 0.2, 0.3])  # the folder's config.json, not timm's
    assert data_config(model)["std"] == pytest.approx([0.4, 0.5, 0.6])


# ------------------------------------------------------------------------------------------ Hugging Face hub cache


def _hub_cache(cache, repo: str, src: torch.nn.Module) -> None:
    """The layout huggingface_hub leaves after `hf download ORG/NAME`: blobs, a snapshot of links, refs/main."""
    from timm.models import save_for_hf

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    staging = cache / "staging"
    save_for_hf(src, staging, safe_serialization=True)
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    for i, f in enumerate(sorted(staging.iterdir())):
        blob = repo_dir / "blobs" / f"{i:040x}"
        f.rename(blob)
        (repo_dir / "snapshots" / commit / f.name).symlink_to(f"../../blobs/{blob.name}")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    staging.rmdir()


def test_hf_hub_name_loads_from_the_offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE, "the suite runs with HF_HUB_OFFLINE=1 (tests/conftest.py)"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    src = _source(img_size=224)
    _hub_cache(tmp_path / "hub", "testorg/test_vit.tiny_in21k", src)
    model = build_model("ila", ARCH, 5, "hf-hub:testorg/test_vit.tiny_in21k", 224)  # through ILA's frozen ViT
    assert torch.equal(model.vit.patch_embed.proj.weight, src.patch_embed.proj.weight)
    assert torch.equal(model.vit.pos_embed, src.pos_embed)

    with pytest.raises(WeightsError, match="hf-hub:testorg/absent is not in the local Hugging Face cache"):
        build_model("vit", ARCH, 5, "hf-hub:testorg/absent", 224)


# ------------------------------------------------------------------------------------------- Google's ViT-B_16.npz


def _google_npz(src: torch.nn.Module, path) -> None:
    """A timm ViT written in the layout of Google's original ViT-B_16.npz (vit_jax names, HWIO/(D, heads, d) kernels,
    with the pre-logits layer the ImageNet-21k checkpoints carry)."""
    sd = {k: v.detach().numpy() for k, v in src.state_dict().items()}
    dim, heads = src.embed_dim, src.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
        "pre_logits/kernel": np.eye(dim, dtype=np.float32),
        "pre_logits/bias": np.zeros(dim, np.float32),
    }
    for i in range(len(src.blocks)):
        b, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, dim, dim), sd[b + "attn.qkv.bias"].reshape(3, dim)
        for j, name in enumerate(("query", "key", "value")):
            w[f"{g}MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j].T.reshape(dim, heads, dim // heads)
            w[f"{g}MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j].reshape(heads, dim // heads)
        w[f"{g}MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        )
        w[f"{g}MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, norm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{g}{ln}/scale"], w[f"{g}{ln}/bias"] = sd[f"{b}{norm}.weight"], sd[f"{b}{norm}.bias"]
        for r in range(2):
            w[f"{g}MlpBlock_3/Dense_{r}/kernel"] = sd[f"{b}mlp.fc{r + 1}.weight"].T
            w[f"{g}MlpBlock_3/Dense_{r}/bias"] = sd[f"{b}mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_google_vit_npz_loads_at_224_and_448_with_a_replaced_head(tmp_path):
    src = _source(num_classes=10, img_size=224)
    path = tmp_path / "ViT-B_16.npz"
    _google_npz(src, path)

    same = build_model("vit", ARCH, 10, f"file:{path}", 224)  # the file's own size and class count: all of it
    assert all(torch.allclose(same.state_dict()[k], v) for k, v in src.state_dict().items())
    assert data_config(same)["mean"] == [0.5, 0.5, 0.5] and data_config(same)["std"] == [0.5, 0.5, 0.5]

    glsim = build_model("glsim", ARCH, 5, f"file:{path}", 448)  # the papers' 448 px GLSim setting, new classes
    vit, theirs = glsim.vit.state_dict(), src.state_dict()
    for key in (
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.3.attn.proj.weight",
        "blocks.5.mlp.fc1.weight",
        "norm.bias",
    ):
        assert torch.allclose(vit[key], theirs[key]), key
    assert glsim.vit.pos_embed.shape == (1, 1 + 28 * 28, 64)
    assert torch.allclose(
        glsim.vit.pos_embed, _pos_resampled(src, 28, interpolation="bilinear", antialias=False), atol=1e-6
    )
    assert glsim.head.weight.shape[0] == 5  # GLSim's own head after the aggregator: 5 classes


# -------------------------------------------------------------------------------------------------------- errors


def test_missing_sources_name_train_weights_and_the_path(tmp_path):
    for spec, what in ((f"file:{tmp_path / 'ViT-B_16.npz'}", "file"), (f"local-dir:{tmp_path / 'vit'}", "folder")):
        with pytest.raises(WeightsError, match=rf"train.weights: {what} {tmp_path}/\S+ does not exist"):
            build_model("vit", ARCH, 5, spec, 224)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=rf"folder {tmp_path / 'empty'} holds no model.safetensors"):
        build_model("vit", ARCH, 5, f"local-dir:{tmp_path / 'empty'}", 224)


def test_weights_of_another_shape_are_named_not_skipped(tmp_path):
    import safetensors.torch

    narrow = _source(embed_dim=32)  # same names, another width
    path = tmp_path / "narrow.safetensors"
    safetensors.torch.save_file(narrow.state_dict(), path)
    with pytest.raises(
        WeightsError,
        match=rf"train.weights=file:{path} does not fit test_vit: \d+ tensors have "
        r"other shapes, e.g. \S+ \(.*\) in the weights vs \(.*\) in the model",
    ):
        build_model("vit", ARCH, 5, f"file:{path}", 224)

    cnn = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), cnn)
    with pytest.raises(WeightsError, match=rf"train.weights=file:{cnn} lacks \d+ of the \d+ tensors of test_vit"):
        build_model("vit", ARCH, 5, f"file:{cnn}", 224)

    npz = tmp_path / "narrow.npz"
    _google_npz(narrow, npz)
    with pytest.raises(
        WeightsError,
        match=rf"train.weights=file:{npz} does not fit test_vit: embedding width 32 in "
        "the file vs 64 in the model",
    ):
        build_model("vit", ARCH, 5, f"file:{npz}", 224)
    with pytest.raises(WeightsError, match="a Google .npz checkpoint loads into a timm VisionTransformer only"):
        build_model("cnn", "resnet18", 5, f"file:{npz}")


def test_params_accept_the_weight_sources_and_check_local_paths(tmp_path):
    import yaml

    from pipeline.config import ParamsError, load_params
    from tests.conftest import REPO

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["acquire"]["embedded"]["path"] = str(REPO / "datasets/emoji")
    path = tmp_path / "params.yaml"
    for ok in ("hf-hub:timm/vit_base_patch16_224.augreg_in21k", "hf-hub:google/vit-base@main"):
        raw["train"]["weights"] = ok
        path.write_text(yaml.safe_dump(raw))
        assert load_params(path).train.weights == ok
    for bad, message in (
        ("hf-hub:vit_base", "must be none, hub, hf-hub:ORG/NAME"),
        ("local-dir:no/such/folder", "train.weights: folder 'no/such/folder' does not exist"),
    ):
        raw["train"]["weights"] = bad
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match=message):
            load_params(path)
