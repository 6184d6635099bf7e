"""ILA: module structure and parameter counts (docs/methods.md#ila), token down-sampling, freezing, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from pipeline.models import build_model
from pipeline.models.ila import BottleneckAdapter, ILAdapter, downsample_locations
from pipeline.models.profile import count_params, encoder_tokens

HEAD_AND_CLS = 768 * 200 + 200 + 768  # ViT-B head for 200 classes + the CLS token


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_module_parameter_counts_match_the_reference_arithmetic():
    assert n_params(ILAdapter(768, downsample=True)) == 20_248
    assert n_params(ILAdapter(768, downsample=False)) == 13_336
    assert n_params(BottleneckAdapter(768)) == 13_064
    assert downsample_locations(12) == (3, 7)


def test_down_sampling_ila_shrinks_the_grid_and_starts_near_a_neighbour_sum():
    ila = ILAdapter(16, downsample=True).eval()
    z = torch.randn(2, 1 + 6 * 6, 16)
    out = ila(z)
    assert out.shape == (2, 1 + 4 * 4, 16)  # unpadded 3x3: 6x6 -> 4x4, CLS kept
    w = ila.rsds.weight
    assert abs(w.mean().item() - 1.0) < 1e-3 and w.std().item() < 5e-3  # near-one init, N(1, 0.001)
    plain = ILAdapter(16, downsample=False).eval()
    assert plain(z).shape == z.shape and plain.rsds is None


@pytest.mark.parametrize("variant, extra", [("ila", 40_496), ("ila+", 173_856), ("ila++", 354_032)])
def test_vit_b_trainable_parameters(variant, extra):
    with torch.device("meta"):  # shapes only: ViT-B costs nothing to build here
        model = build_model("ila", "vit_base_patch16_224", 200, "none", 224, ila_variant=variant)
    total, trainable = count_params(model)
    assert trainable == HEAD_AND_CLS + extra
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"vit.head.weight", "vit.head.bias", "vit.cls_token"} <= names
    assert all(n.startswith("vit.head.") or n == "vit.cls_token" or ".ila." in n or ".adapter_" in n for n in names)


@pytest.mark.parametrize("img_size, tokens", [(224, [197, 145, 101]), (448, [785, 677, 577])])
def test_vit_b_tokens_per_encoder_group(img_size, tokens):
    with torch.device("meta"):
        model = build_model("ila", "vit_base_patch16_224", 200, "none", img_size, ila_variant="ila+").eval()
        assert encoder_tokens(model, torch.empty(1, 3, img_size, img_size)) == (tokens, 1)


@pytest.mark.parametrize("variant", ["ila+", "ila++"])
def test_frozen_parameters_are_bit_identical_after_an_optimiser_step(variant):
    torch.manual_seed(0)
    model = build_model("ila", "test_vit", 4, "none", 48, patch_size=8, ila_variant=variant).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = create_optimizer_v2(trainable, opt="adamw", lr=0.01, weight_decay=0.05)  # as the training engine does
    F.cross_entropy(model(torch.randn(4, 3, 48, 48)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = dict(model.named_parameters())
    frozen = [n for n, p in after.items() if not p.requires_grad]
    assert len(frozen) > 50 and all(torch.equal(before[n], after[n]) for n in frozen)
    moved = {n for n, p in after.items() if p.requires_grad and not torch.equal(before[n], p)}
    assert {"vit.head.weight", "vit.cls_token", "vit.blocks.3.ila.up.weight"} <= moved
    if variant == "ila++":
        assert "vit.blocks.0.adapter_attn.up.weight" in moved


@pytest.mark.parametrize("img_size", [40, 56])
def test_ila_output_shapes_at_two_sizes(img_size):
    model = build_model("ila", "test_vit", 3, "none", img_size, patch_size=8, ila_variant="ila++")
    x = torch.randn(2, 3, img_size, img_size)
    for mode in (True, False):
        out = model.train(mode)(x)
        assert out.shape == (2, 3) and torch.isfinite(out).all()
    side = img_size // 8
    assert encoder_tokens(model, x[:1]) == ([side**2 + 1, (side - 2) ** 2 + 1, (side - 4) ** 2 + 1], 1)


def test_ila_errors_name_the_param():
    with pytest.raises(ValueError, match="train.img_size: 32 gives a 4x4 token grid"):
        build_model("ila", "test_vit", 3, "none", 32, patch_size=8)
    with pytest.raises(ValueError, match="train.ila_variant"):
        build_model("ila", "test_vit", 3, "none", 48, patch_size=8, ila_variant="ila+++")


def _xavier_bound(w: torch.Tensor) -> float:
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(w)
    return (6 / (fan_in + fan_out)) ** 0.5


def test_paper_init_is_the_authors_xavier_uniform_with_tiny_normal_biases():
    """init paper: the convs Xavier-uniform (ILAdapter.init_weights), every added Linear and the head Xavier-uniform
    with N(0, 1e-6) biases (the authors' ViT.init_weights); RSDS stays near one. init timm: PyTorch's default convs
    (bound 1/sqrt(fan_in)), zero adapter biases."""
    torch.manual_seed(0)
    paper = build_model("ila", "vit_tiny_patch16_224", 7, "none", 48, patch_size=8, ila_variant="ila++", init="paper")
    ilas = [m for m in paper.modules() if isinstance(m, ILAdapter)]
    assert len(ilas) == 2
    for conv in (c for a in ilas for c in (a.pwconv, a.cls_conv)):  # 8x8x1x1: Xavier bound 0.61, PyTorch's 0.35
        w = conv.weight.abs()
        assert w.max() <= _xavier_bound(conv.weight) and w.max() > 1.2 / 8**0.5
    linears = [lin for m in paper.modules() if isinstance(m, (ILAdapter, BottleneckAdapter)) for lin in (m.down, m.up)]
    head = paper.get_classifier()
    biases = torch.cat([lin.bias for lin in [*linears, head]])
    assert (biases != 0).all() and 0.5e-6 < biases.std() < 2e-6
    for lin in [*linears, head]:
        bound = _xavier_bound(lin.weight)
        assert lin.weight.abs().max() <= bound and lin.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    assert abs(ilas[0].rsds.weight.mean() - 1) < 1e-3

    torch.manual_seed(0)
    timm_init = build_model("ila", "vit_tiny_patch16_224", 7, "none", 48, patch_size=8, ila_variant="ila++")
    ila = next(m for m in timm_init.modules() if isinstance(m, ILAdapter))
    assert ila.pwconv.weight.abs().max() <= 1 / 8**0.5 and (ila.down.bias == 0).all()
    with pytest.raises(ValueError, match="train.init: unknown init 'jax'"):
        build_model("ila", "test_vit", 7, "none", 48, patch_size=8, init="jax")
