"""The ILA authors' checkpoints (arkel23/DownSamplingInterLayerAdapter, NYCU-PCSxNTHU-MIS/DownSamplingInterLayerAdapter
on the hub) load into our ILAViT.

The key/shape table below is written from the authors' architecture definition (their ViT in model_utils/vit.py,
Transformer/BlockVanilla in modules_others/transformer.py, ILAdapter/Adapter in modules_others/adapters.py, Heads in
modules_fgir/ifa.py, the trainer's save_model wrapper) with their README's flags and build_args defaults (BatchNorms
1-3, depthwise groups 1, a CLS conv, the near-one depthwise residual, adapter_dim 8, the convpass adapter path). Tiny
dimensions keep the suite fast: timm's test_vit (6 blocks, width 64) with 8 px patches at 48 px, so the down-sampling
ILAs sit after blocks 1 and 3 (their `--ila_ds_locs 1 3`; 3 7 at ViT-B's 12 blocks).
"""

from __future__ import annotations

import argparse

import pytest
import torch

from pipeline.models import build_model
from pipeline.models.ila_authors import authors_to_ours, ours_to_authors
from pipeline.models.weights import WeightsError

MODEL, IMG, PATCH, CLASSES = "test_vit", 48, 8, 5
DIM, MLP, DEPTH, R = 64, 192, 6, 8  # timm's test_vit: width 64, mlp ratio 3, 6 blocks; r = their adapter_dim
TOKENS = (IMG // PATCH) ** 2 + 1
DS_LOCS = [1, 3]


def _linear(prefix: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out, inp), f"{prefix}.bias": (out,)}


def _bn(prefix: str) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (R,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def _block(i: int, adapters: bool) -> dict[str, tuple[int, ...]]:
    p = f"encoder.blocks.{i}"
    shapes = {}
    for name in ("attn.proj_q", "attn.proj_k", "attn.proj_v", "proj"):
        shapes |= _linear(f"{p}.{name}", DIM, DIM)
    for name in ("norm1", "norm2"):
        shapes |= {f"{p}.{name}.weight": (DIM,), f"{p}.{name}.bias": (DIM,)}
    shapes |= _linear(f"{p}.pwff.fc1", MLP, DIM) | _linear(f"{p}.pwff.fc2", DIM, MLP)
    if adapters:  # --adapter adapter, adapter_path convpass: one beside attention, one beside the MLP
        for name in ("adapter_attn", "adapter_pwffn"):
            shapes |= _linear(f"{p}.{name}.adapter_down", R, DIM) | _linear(f"{p}.{name}.adapter_up", DIM, R)
    return shapes


def _ila_tensors(prefix: str, downsample: bool) -> dict[str, tuple[int, ...]]:
    """Their ILAdapter: norm1/norm3 = Sequential(Rearrange, BatchNorm1d, Rearrange); adapter_conv = Sequential(3x3
    depthwise conv, Sequential(BatchNorm2d, GELU), 1x1 conv); adapter_cls; ds_conv (bias-free depthwise) when
    down-sampling."""
    shapes = _linear(f"{prefix}.adapter_down", R, DIM) | _linear(f"{prefix}.adapter_up", DIM, R)
    shapes |= _bn(f"{prefix}.norm1.1") | _bn(f"{prefix}.norm3.1") | _bn(f"{prefix}.adapter_conv.1.0")
    shapes |= {
        f"{prefix}.adapter_conv.0.weight": (R, 1, 3, 3),
        f"{prefix}.adapter_conv.0.bias": (R,),
        f"{prefix}.adapter_conv.2.weight": (R, R, 1, 1),
        f"{prefix}.adapter_conv.2.bias": (R,),
        f"{prefix}.adapter_cls.weight": (R, R, 1, 1),
        f"{prefix}.adapter_cls.bias": (R,),
    }
    return shapes | ({f"{prefix}.ds_conv.weight": (DIM, 1, 3, 3)} if downsample else {})


def authors_table(variant: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of their wrapper's state dict (`model.` = the wrapper's ViT) for one variant."""
    table = {
        "patch_embedding.weight": (DIM, 3, PATCH, PATCH),
        "patch_embedding.bias": (DIM,),
        "class_token": (1, 1, DIM),
        "positional_embedding.pos_embedding": (1, TOKENS, DIM),
        "encoder_norm.weight": (DIM,),
        "encoder_norm.bias": (DIM,),
        "head.head.weight": (CLASSES, DIM),
        "head.head.bias": (CLASSES,),
    }
    for i in range(DEPTH):
        table |= _block(i, adapters=variant == "ila++")
    if variant != "vit":
        for k in range(len(DS_LOCS)):
            table |= _ila_tensors(f"encoder.ila_ds.{k}", downsample=True)
    if variant == "ila+":  # --ila_locs -1: every block without a down-sampling ILA
        for k in range(DEPTH - len(DS_LOCS)):
            table |= _ila_tensors(f"encoder.ila.{k}", downsample=False)
    return {f"model.{k}": v for k, v in table.items()}


def _random_authors_state(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in authors_table(variant).items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(17)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        else:
            state[key] = torch.randn(shape, generator=g) * 0.1
    return state


def _authors_checkpoint(path, state: dict[str, torch.Tensor], **config) -> None:
    """Their trainer's file: config (an argparse Namespace), epoch, model, accuracy, optimizer."""
    saved = argparse.Namespace(
        **(
            {
                "model_name": "vit_t16",
                "image_size": IMG,
                "num_classes": CLASSES,
                "dataset_name": "soylocal",
                "custom_mean_std": False,
                "ila_ds_locs": DS_LOCS,
                "device": torch.device("cpu"),
            }
            | config
        )
    )
    torch.save(
        {
            "config": saved,
            "epoch": 3,
            "model": state,
            "accuracy": 0.5,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        },
        path,
    )


def _ila(weights: str = "none", variant: str = "ila") -> torch.nn.Module:
    return build_model(
        "ila", MODEL, CLASSES, weights, IMG, patch_size=PATCH, ila_variant=variant, layer_norm_eps=1e-12
    ).eval()


VARIANT_COUNTS = [("ila", 156, 132), ("ila+", 256, 232), ("ila++", 204, 180)]  # (theirs, ours: q/k/v fused)


@pytest.mark.parametrize(("variant", "n_theirs", "n_ours"), VARIANT_COUNTS)
def test_authors_state_dict_loads_with_no_missing_or_unexpected_key(tmp_path, variant, n_theirs, n_ours):
    theirs = _random_authors_state(variant)
    ours, found = authors_to_ours(theirs)
    assert found == variant
    model = _ila(variant=variant)
    assert set(ours) == set(model.state_dict())  # every ILAViT tensor, nothing else
    result = model.load_state_dict(ours, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert (len(theirs), len(ours)) == (n_theirs, n_ours)

    _authors_checkpoint(tmp_path / "ckpt.pth", theirs)
    state = _ila(f"file:{tmp_path / 'ckpt.pth'}", variant).state_dict()
    assert torch.equal(state["vit.head.weight"], theirs["model.head.head.weight"])
    assert torch.equal(state["vit.blocks.3.ila.rsds.weight"], theirs["model.encoder.ila_ds.1.ds_conv.weight"])
    assert torch.equal(
        state["vit.blocks.1.ila.norm2.running_var"], theirs["model.encoder.ila_ds.0.adapter_conv.1.0.running_var"]
    )
    v = state[("vit.blocks.3.block.block" if variant == "ila++" else "vit.blocks.3.block") + ".attn.qkv.weight"].chunk(
        3
    )[2]
    assert torch.equal(v, theirs["model.encoder.blocks.3.attn.proj_v.weight"])
    if variant == "ila+":  # their plain ILA k sits after the k-th block without a down-sampling one: 0, 2, 4, 5
        assert torch.equal(state["vit.blocks.4.ila.cls_conv.weight"], theirs["model.encoder.ila.2.adapter_cls.weight"])
    if variant == "ila++":
        assert torch.equal(
            state["vit.blocks.2.adapter_mlp.up.bias"], theirs["model.encoder.blocks.2.adapter_pwffn.adapter_up.bias"]
        )


@pytest.mark.parametrize("variant", ["ila", "ila+", "ila++"])
def test_ours_to_theirs_to_ours_is_identical_and_has_their_exact_names_and_shapes(variant):
    model = _ila(variant=variant)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # no zero-initialised bias hiding a mix-up
    ours = model.state_dict()
    theirs = ours_to_authors(ours)
    assert {k: tuple(v.shape) for k, v in theirs.items()} == authors_table(variant)
    back, found = authors_to_ours(theirs)
    assert found == variant and set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("variant", ["ila", "ila+", "ila++"])
def test_forward_of_loaded_model_equals_the_source_model(tmp_path, variant):
    source = _ila(variant=variant)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, t in source.state_dict().items():
            if t.is_floating_point():  # BatchNorm statistics too: eval mode reads them
                t.copy_(
                    torch.rand(t.shape, generator=g) + 0.5
                    if name.endswith("running_var")
                    else torch.randn(t.shape, generator=g) * 0.2
                )
    _authors_checkpoint(tmp_path / "ckpt.pth", ours_to_authors(source.state_dict()))
    loaded = _ila(f"file:{tmp_path / 'ckpt.pth'}", variant)
    x = torch.randn(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = source(x), loaded(x)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert a.abs().max() > 0.1  # a real comparison, not two zero heads
    assert loaded.pretrained_cfg["mean"] == (0.485, 0.456, 0.406)  # custom_mean_std off: their ImageNet statistics


def test_their_baseline_without_ilas_loads_into_a_plain_vit(tmp_path):
    theirs = _random_authors_state("vit", seed=2)
    _authors_checkpoint(tmp_path / "fz.pth", theirs)
    vit = build_model("vit", MODEL, CLASSES, f"file:{tmp_path / 'fz.pth'}", IMG, patch_size=PATCH)
    assert torch.equal(vit.state_dict()["blocks.4.mlp.fc2.weight"], theirs["model.encoder.blocks.4.pwff.fc2.weight"])
    assert torch.equal(vit.state_dict()["head.bias"], theirs["model.head.head.bias"])


def test_unmatched_keys_and_other_variants_are_named(tmp_path):
    theirs = _random_authors_state("ila")
    theirs["model.encoder.prompt"] = torch.zeros(DEPTH, 4, DIM)  # a VPT-deep prompt: not part of ILAViT
    del theirs["model.encoder.blocks.2.attn.proj_k.bias"]
    _authors_checkpoint(tmp_path / "bad.pth", theirs)
    with pytest.raises(WeightsError) as err:
        _ila(f"file:{tmp_path / 'bad.pth'}")
    assert "encoder.prompt" in str(err.value) and "model.encoder.prompt" not in str(err.value)
    assert "vit.blocks.2.attn.qkv.bias (only qv of q/k/v)" in str(err.value)

    _authors_checkpoint(tmp_path / "pp.pth", _random_authors_state("ila++"))
    with pytest.raises(ValueError, match=r"train\.ila_variant: 'ila'.*checkpoint of ILA variant 'ila\+\+'"):
        _ila(f"file:{tmp_path / 'pp.pth'}", "ila")

    _authors_checkpoint(tmp_path / "locs.pth", _random_authors_state("ila"), ila_ds_locs=[3, 7])
    with pytest.raises(WeightsError, match=r"ila_ds_locs \[3, 7\] are not ILAViT's down-sampling blocks \[1, 3\]"):
        _ila(f"file:{tmp_path / 'locs.pth'}")


def test_hf_hub_file_reference_resolves_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo, name = "NYCU-PCSxNTHU-MIS/DownSamplingInterLayerAdapter", "soylocal_vit_t16_ila_dso_cls_adapter_fz_1.pth"
    folder = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    (folder / "snapshots" / ("0" * 40)).mkdir(parents=True)
    theirs = _random_authors_state("ila++", seed=3)
    _authors_checkpoint(folder / "snapshots" / ("0" * 40) / name, theirs)
    model = _ila(f"hf-hub:{repo}/{name}", "ila++")
    assert torch.equal(
        model.state_dict()["vit.blocks.3.ila.up.weight"], theirs["model.encoder.ila_ds.1.adapter_up.weight"]
    )
