"""GLSim: the crop box rule on hand-made similarity maps, batched crops, selection without gradients, the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import build_model, glsim
from pipeline.models.glsim import boxes_from_indices, crop_and_resize, default_top_k, select_boxes
from pipeline.models.profile import count_flops

GRID, P, IMG = (4, 4), (16, 16), (64, 64)  # a 4x4 patch grid of 16 px: a 64 px image


def feats_selecting(cells: list[list[tuple[int, int]]], dim: int = 8) -> torch.Tensor:
    """Final-layer tokens (B, 1 + 16, dim) whose CLS is most similar (cosine 1) to the given (row, col) cells and
    orthogonal (cosine 0) to all others: a hand-made similarity map."""
    feats = torch.zeros(len(cells), 1 + GRID[0] * GRID[1], dim)
    feats[:, :, 1] = 1.0  # every patch: e_1
    feats[:, 0] = 0.0
    feats[:, 0, 0] = 2.0  # CLS: 2 e_0
    for b, sample in enumerate(cells):
        for r, c in sample:
            feats[b, 1 + r * GRID[1] + c] = torch.eye(dim)[0] * 3.0  # selected: e_0
    return feats


@pytest.mark.parametrize(
    "cells, paper, corrected",
    [
        ([(1, 2)], (32, 16, 48, 32), (32, 16, 48, 32)),  # k = 1: one patch either way
        ([(3, 3)], (48, 48, 64, 64), (48, 48, 64, 64)),  # bottom-right edge patch, k = 1
        ([(0, 0)], (0, 0, 16, 16), (0, 0, 16, 16)),  # top-left edge patch, k = 1
        ([(0, 0), (3, 3)], (0, 0, 48, 48), (0, 0, 64, 64)),  # opposite corners: the paper box stops at the last start
        ([(1, 0), (1, 3)], (0, 16, 48, 32), (0, 16, 64, 32)),  # one row: at least one patch tall
        ([(r, c) for r in range(4) for c in range(4)], (0, 0, 48, 48), (0, 0, 64, 64)),  # k = all patches
    ],
)
def test_box_rule_on_hand_made_similarity(cells, paper, corrected):
    feats = feats_selecting([cells])
    for rule, want in (("paper", paper), ("corrected", corrected)):
        box = select_boxes(feats, len(cells), GRID, P, IMG, rule)
        assert box.tolist() == [list(want)], rule


def test_boxes_are_computed_per_sample_in_one_batch():
    idx = torch.tensor([[5, 6], [0, 15], [12, 3]])
    boxes = boxes_from_indices(idx, GRID, P, IMG, "paper")
    assert boxes.tolist() == [[16, 16, 32, 32], [0, 0, 48, 48], [0, 0, 48, 48]]
    with pytest.raises(ValueError, match="train.glsim_box"):
        boxes_from_indices(idx, GRID, P, IMG, "loose")


def test_batched_crop_equals_per_sample_slice_and_resize():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 64, 64)
    boxes = torch.tensor([[0, 0, 64, 64], [16, 0, 48, 16], [48, 48, 64, 64], [5, 9, 40, 33]])
    crops = crop_and_resize(images, boxes, (64, 64))
    for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        want = F.interpolate(images[i : i + 1, :, y0:y1, x0:x1], size=(64, 64), mode="bilinear", align_corners=True)
        torch.testing.assert_close(crops[i : i + 1], want, atol=1e-4, rtol=1e-4)  # float32 grid round trip
    torch.testing.assert_close(crops[0], images[0], atol=1e-4, rtol=1e-4)  # the full box is the image itself


def test_selection_runs_without_gradient(monkeypatch):
    grad_modes = []
    real = glsim.gls_similarity

    def spy(*args, **kwargs):
        grad_modes.append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(glsim, "gls_similarity", spy)
    model = build_model("glsim", "test_vit", 3, "none", 32, patch_size=8).train()
    model.head.weight.data.normal_()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = model.forward_with_crops(x)
    assert grad_modes == [False]
    assert out.boxes.grad_fn is None and not out.crops.requires_grad
    F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
    assert model.aggregator[0].attn.qkv.weight.grad is not None  # the rest of the model does learn


@pytest.mark.parametrize("img_size", [32, 48])
def test_glsim_shapes_at_two_sizes_and_one_training_step(img_size):
    model = build_model("glsim", "test_vit", 5, "none", img_size, patch_size=8)
    assert model.top_k == 8 and model.grid == (img_size // 8,) * 2
    x = torch.randn(2, 3, img_size, img_size)
    out = model.forward_with_crops(x)
    assert out.logits.shape == (2, 5) and torch.equal(out.logits, torch.zeros(2, 5))  # zero-initialised head
    assert out.crops.shape == x.shape and torch.isfinite(out.crops).all()
    assert ((out.boxes >= 0) & (out.boxes <= img_size)).all()
    assert (out.boxes[:, 2] > out.boxes[:, 0]).all() and (out.boxes[:, 3] > out.boxes[:, 1]).all()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # step 1 trains only the zero head; step 2 reaches the aggregator and the encoder
        opt.zero_grad()
        F.cross_entropy(model(x), torch.tensor([0, 4])).backward()
        opt.step()
    logits = model(x)
    assert torch.isfinite(logits).all() and not torch.equal(logits, torch.zeros(2, 5))
    model.eval()  # the selection is a function of the image: the same boxes on every pass
    assert torch.equal(model.forward_with_crops(x).boxes, model.forward_with_crops(x).boxes)


@pytest.mark.parametrize(
    "img_size, dataset, k", [(224, None, 8), (448, None, 8), (448, "cub", 8), (224, "dogs", 16), (448, "dogs", 16)]
)
def test_default_top_k_is_the_glsim_repos_rule(img_size, dataset, k):
    """GLSim's build_args.py: dynamic_top 8 at every size, doubled for Stanford Dogs only (the ILA repo's doubling at
    448 is not the default). The checkpoint records the resolved k, so reloading needs no dataset name."""
    assert default_top_k(dataset) == k
    with torch.device("meta"):
        model = build_model("glsim", "test_vit", 2, "none", img_size, patch_size=16, dataset=dataset)
    assert model.top_k == k and model.spec.options["glsim_top_k"] == k


def test_top_k_default_and_errors():
    assert build_model("glsim", "test_vit", 2, "none", 32).top_k == 4  # only 4 patches at 32 px
    with pytest.raises(ValueError, match="train.glsim_top_k: 5 exceeds the 4 patches"):
        build_model("glsim", "test_vit", 2, "none", 32, glsim_top_k=5)
    with pytest.raises(ValueError, match="train.model: glsim needs a timm VisionTransformer"):
        build_model("glsim", "resnet18", 2, "none", 32)


def test_paper_selection_formula_gives_table_1():
    """(D + 2(D + 1) + 1) * N of the paper's calc_flops.py: 0.45 MFLOPs at 224 and 1.8 at 448 for ViT-B/16."""
    assert glsim.paper_selection_flops(768, 196) == 452_172
    assert round(glsim.paper_selection_flops(768, 196) / 1e6, 2) == 0.45
    assert round(glsim.paper_selection_flops(768, 784) / 1e6, 1) == 1.8


def test_selection_flops_vit_b_224_under_one_mflop():
    feats = torch.randn(1, 197, 768)  # ViT-B/16 at 224: CLS + 196 patches of 768 dims
    flops = count_flops(select_boxes, feats, 8, (14, 14), (16, 16), (224, 224))
    assert flops == 2 * 196 * 768  # one multiply-add per patch and channel, 2 FLOPs each
    assert flops <= 1_000_000


def test_paper_init_of_the_aggregator():
    """init paper: every Linear of the aggregator Xavier-uniform with N(0, 1e-6) biases (the authors' init_weights);
    init timm: trunc-normal(0.02), zero biases. The head is zero in both (A.1 step 7)."""
    torch.manual_seed(0)
    paper = build_model("glsim", "vit_tiny_patch16_224", 5, "none", 32, patch_size=8, init="paper")
    timm_init = build_model("glsim", "vit_tiny_patch16_224", 5, "none", 32, patch_size=8)
    lins = [m for m in paper.aggregator.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lins) == 4  # qkv, proj, fc1, fc2
    for lin in lins:
        fan_in, fan_out = lin.in_features, lin.out_features
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.99 * bound  # uniform up to the bound
        assert lin.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
        assert (lin.bias != 0).all() and 0.5e-6 < lin.bias.std() < 2e-6
    for lin in (m for m in timm_init.aggregator.modules() if isinstance(m, torch.nn.Linear)):
        assert lin.weight.std().item() == pytest.approx(0.02, rel=0.1) and (lin.bias == 0).all()
    for model in (paper, timm_init):
        assert (model.head.weight == 0).all() and (model.head.bias == 0).all()
