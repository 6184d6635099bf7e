"""Issues 6 and 16: the GLSim and ILA paper recipes as named presets that match the authors' code (optimiser,
schedule, albumentations pipelines with torchvision's TrivialAugmentWide, gradient clipping, per-block stochastic
depth, hidden dropout, the original ImageNet-21k weights, LayerNorm eps)."""

from __future__ import annotations

import re

import albumentations as A
import cv2
import numpy as np
import pytest
import timm
import torch
import yaml
from torch import nn

from pipeline.config import ParamsError, TrainParams, load_params
from pipeline.data.transforms import batch_augment, eval_resize, eval_transform, train_transform
from pipeline.models import build_model
from pipeline.training.engine import make_optimizer, recipe_overrides, train_step
from tests.conftest import write_tiny_params

VIT = {"method": "vit", "model": "vit_tiny_patch16_224", "weights": "none", "img_size": 32, "patch_size": 8}
DCFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}


def test_glsim_recipe_resolves_to_the_papers_values():
    cfg = TrainParams.model_validate({**VIT, "recipe": "glsim"})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("sgd", 0.01, 0.0, 8, 50)
    assert (cfg.warmup_steps, cfg.min_lr, cfg.grad_clip, cfg.label_smoothing) == (500, 1e-5, 1.0, 0.1)
    assert (cfg.augment, cfg.hflip, cfg.drop_path_rate, cfg.resize_ratio) == ("med", 0.5, 0.1, 1.34)
    # SD on: DropPath(0.1) in every block *instead of* the hidden dropout; the authors' ViT LayerNorm and init
    assert (cfg.drop_path_rule, cfg.proj_drop_rate, cfg.layer_norm_eps, cfg.init) == ("constant", 0.0, 1e-12, "paper")
    assert recipe_overrides(cfg) == {
        "model": ("vit_tiny_patch16_224", "vit_base_patch16_224.orig_in21k"),
        "weights": ("none", "hub"),
    }  # VIT names its own (tiny, random) model


def test_ila_recipe_is_the_same_trainer_with_lr_0_1_and_weak_augs():
    cfg = TrainParams.model_validate({**VIT, "method": "ila", "recipe": "ila"})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps) == ("sgd", 0.1, 0.0, 1.0, 500)
    assert (cfg.augment, cfg.label_smoothing, cfg.drop_path_rate) == ("weak", 0.0, 0.0)
    # SD off: the authors' hidden_dropout_prob 0.1 on the attention and MLP outputs
    assert (cfg.proj_drop_rate, cfg.layer_norm_eps, cfg.init) == (0.1, 1e-12, "paper")


@pytest.mark.parametrize(
    "written, resolved",
    [
        (None, "vit_base_patch16_224.orig_in21k"),  # the recipe's own model
        ("vit_base_patch16_224", "vit_base_patch16_224.orig_in21k"),  # bare name: timm would pick augreg2_in21k_ft_in1k
        ("vit_large_patch16_224", "vit_large_patch16_224.orig_in21k"),
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),  # a chosen tag
        ("vit_small_patch16_224", "vit_small_patch16_224"),  # timm has no orig_in21k for it
    ],
)
def test_recipes_pin_the_papers_imagenet21k_weights(written, resolved):
    from pipeline.config import variant_train
    from pipeline.models import describe_weights

    model = {} if written is None else {"model": written}
    cfg = TrainParams.model_validate({"method": "glsim", "img_size": 224, "recipe": "glsim", **model})
    assert cfg.model == resolved and cfg.weights == "hub"
    via_variant = variant_train(TrainParams(), {"method": "glsim", "img_size": 224, "recipe": "glsim", **model})
    assert via_variant["model"] == resolved
    assert TrainParams(model="vit_base_patch16_224", method="vit").model == "vit_base_patch16_224"  # no recipe
    if resolved.endswith("orig_in21k"):
        with torch.device("meta"):
            built = build_model("vit", cfg.model, 5, "none", 224)
        assert built.pretrained_cfg["tag"] == "orig_in21k"
        assert describe_weights(cfg.model, "hub") == f"hub {resolved}"
    assert describe_weights("vit_base_patch16_224", "hub") == "hub vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert describe_weights(cfg.model, "file:/w/ViT-B_16.npz") == "file ViT-B_16.npz"


def test_the_pinned_architectures_are_timms_orig_in21k_list():
    from pipeline.config import ORIG_IN21K

    assert ORIG_IN21K == {n.split(".")[0] for n in timm.list_pretrained("*.orig_in21k")}


def _drop_rates(blocks) -> list[list[float]]:
    return [[getattr(getattr(b, a), "drop_prob", 0.0) for a in ("drop_path1", "drop_path2")] for b in blocks]


def test_constant_drop_path_gives_every_block_and_the_aggregator_the_rate():
    """The authors' DropPath(sd) in every block (timm's linear rule: 0.0 in block 0 ... the rate in the last)."""
    kw = dict(patch_size=8, drop_path_rate=0.1)
    constant = build_model("vit", "test_vit", 5, "none", 32, **kw, drop_path_rule="constant")
    assert type(constant.blocks[0]) is timm.models.vision_transformer.Block  # timm's own block, only its option
    assert _drop_rates(constant.blocks) == [[pytest.approx(0.1)] * 2] * 6
    linear = build_model("vit", "test_vit", 5, "none", 32, **kw)
    assert _drop_rates(linear.blocks)[0] == [0.0, 0.0] and _drop_rates(linear.blocks)[-1] == [pytest.approx(0.1)] * 2
    glsim = build_model("glsim", "test_vit", 5, "none", 32, **kw, drop_path_rule="constant")
    assert _drop_rates(glsim.vit.blocks) == [[pytest.approx(0.1)] * 2] * 6
    assert _drop_rates([glsim.aggregator[0]]) == [[pytest.approx(0.1)] * 2]  # GLSim's aggregator: sd too
    assert _drop_rates([build_model("glsim", "test_vit", 5, "none", 32, **kw).aggregator[0]]) == [
        [pytest.approx(0.1)] * 2
    ]  # under timm's rule as well: it follows the deepest block
    # block 0 really drops its residual branches in training (timm's linear rule leaves it deterministic)
    x = torch.randn(64, 17, 64)
    block0 = constant.blocks[0].train()
    assert not torch.equal(block0(x), block0(x))
    assert torch.equal(linear.blocks[0].train()(x), linear.blocks[0](x))
    with pytest.raises(ValueError, match="train.drop_path_rule: applies to the blocks of a timm ViT"):
        build_model("cnn", "resnet18", 5, "none", 32, drop_path_rate=0.1, drop_path_rule="constant")


def test_hidden_dropout_on_attention_and_mlp_outputs_also_in_ilas_frozen_backbone():
    cfg = TrainParams.model_validate({**VIT, "method": "ila", "recipe": "ila"})
    ila = build_model("ila", "test_vit", 5, "none", 48, patch_size=8, proj_drop_rate=cfg.proj_drop_rate)
    blocks = [b.block if hasattr(b, "block") else b for b in ila.vit.blocks]  # the ILA wrappers hold timm's Block
    for b in blocks:  # the authors' two dropouts per block, not timm's third one inside the MLP
        assert (b.attn.proj_drop.p, b.mlp.drop2.p, b.mlp.drop1.p) == (0.1, 0.1, 0.0)
    assert not any(p.requires_grad for b in blocks for p in b.parameters())  # frozen ...
    ila.train()
    assert all(b.attn.proj_drop.training and b.mlp.drop2.training for b in blocks)  # ... but dropping while training
    seen = []
    blocks[0].attn.proj_drop.register_forward_hook(lambda _m, _i, out: seen.append((out == 0).float().mean().item()))
    ila(torch.randn(8, 3, 48, 48))
    assert 0.05 < seen[0] < 0.15  # about 10 % of the attention outputs zeroed
    ila.eval()
    x = torch.randn(2, 3, 48, 48)
    assert torch.equal(ila(x), ila(x))
    agg = build_model("glsim", "test_vit", 5, "none", 32, patch_size=8, proj_drop_rate=0.1).aggregator[0]
    assert (agg.attn.proj_drop.p, agg.mlp.drop2.p, agg.mlp.drop1.p) == (0.1, 0.1, 0.0)
    assert build_model("vit", "test_vit", 5, "none", 32, patch_size=8).blocks[0].attn.proj_drop.p == 0


def test_layer_norm_eps_reaches_every_norm_and_the_checkpoint(tmp_path):
    from pipeline.models import load_checkpoint, save_checkpoint

    model = build_model("glsim", "test_vit", 3, "none", 32, patch_size=8, layer_norm_eps=1e-12)
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 6 + 1 + 2 + 1 and {m.eps for m in norms} == {1e-12}  # blocks, final, aggregator
    save_checkpoint(
        tmp_path / "m.pt",
        model,
        {"classes": ["a", "b", "c"], "model_spec": {"method": "glsim", "model": "test_vit", "img_size": 32}},
    )
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert {m.eps for m in loaded.modules() if isinstance(m, nn.LayerNorm)} == {1e-12}
    assert {
        m.eps
        for m in build_model("vit", "test_vit", 3, "none", 32, patch_size=8).modules()
        if isinstance(m, nn.LayerNorm)
    } == {1e-6}  # timm's default without the recipe


def test_keys_written_in_params_yaml_win_over_the_recipe(tmp_path, tiny_emoji):
    params = yaml.safe_load(write_tiny_params(tmp_path, tiny_emoji).read_text())
    recipe_keys = {
        "optimizer",
        "lr",
        "weight_decay",
        "batch_size",
        "epochs",
        "warmup_steps",
        "min_lr",
        "grad_clip",
        "label_smoothing",
        "augment",
        "hflip",
        "drop_path_rate",
        "resize_ratio",
        "drop_path_rule",
        "proj_drop_rate",
        "layer_norm_eps",
        "init",
    }
    params["train"] = {k: v for k, v in params["train"].items() if k not in recipe_keys} | {
        **VIT,
        "recipe": "glsim",
        "lr": 0.003,
        "grad_clip": None,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = load_params(path).train
    assert (cfg.lr, cfg.grad_clip, cfg.optimizer, cfg.augment) == (0.003, None, "sgd", "med")
    assert recipe_overrides(cfg) == {
        "lr": (0.003, 0.01),
        "grad_clip": (None, 1.0),
        "weights": ("none", "hub"),
        "model": ("vit_tiny_patch16_224", "vit_base_patch16_224.orig_in21k"),
    }


def test_ila_recipe_needs_a_frozen_backbone_method(tmp_path, tiny_emoji):
    path = write_tiny_params(tmp_path, tiny_emoji)
    with pytest.raises(ParamsError, match=r"train\.recipe: 'ila' trains a frozen backbone"):
        load_params(path, overrides={"train.recipe": "ila", "train.method": "cnn"})


def test_glsim_optimizer_and_per_step_schedule():
    """timm "sgd" is Nesterov SGD with momentum 0.9; the lr warms up from 1e-6 over 500 steps and follows a per-step
    cosine to 1e-5 (timm's default warmup_prefix=False: the cosine spans the whole run, warm-up overlays its start)."""
    cfg = TrainParams.model_validate({**VIT, "recipe": "glsim", "epochs": 4})
    updates, total = 1000, 4000
    opt, sched = make_optimizer(nn.Linear(4, 3), cfg, updates)
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.SGD)
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.0)
    lrs = {}
    for step in (0, 250, 500, 2000, total):
        sched.step_update(num_updates=step)
        lrs[step] = opt.param_groups[0]["lr"]

    def cosine(t):
        return 1e-5 + 0.5 * (0.01 - 1e-5) * (1 + np.cos(np.pi * t / total))

    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[250] == pytest.approx(1e-6 + (0.01 - 1e-6) / 2)  # linear warm-up, half way
    assert lrs[500] == pytest.approx(cosine(500)) and lrs[2000] == pytest.approx(cosine(2000))
    assert lrs[total] == pytest.approx(1e-5)


@pytest.mark.parametrize("augment", ["rrc", "weak", "med"])
def test_augment_pipelines_give_uint8_crops_of_the_model_size(augment):
    """The CPU half ends at a uint8 HWC crop (normalisation and erasing run on the device, see
    tests/test_loader_pipeline.py); evaluation's uint8 form equals its normalised form after the device half."""
    cfg = TrainParams.model_validate({**VIT, "img_size": 48, "augment": augment, "hflip": 0.5})
    t = train_transform(cfg, DCFG, seed=0)
    img = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)  # not square, not 48 px
    out = t(image=img)["image"]
    assert out.shape == (48, 48, 3) and out.dtype == np.uint8
    e = eval_transform(cfg.img_size, {**DCFG, **eval_resize(cfg)})
    assert e(image=img)["image"].shape == (3, 48, 48)
    if augment == "rrc":
        assert isinstance(t, A.Compose) and type(t.transforms[0]).__name__ == "RandomResizedCrop"
        assert eval_resize(cfg) == {}
    else:  # GLSim: resize to int(1.34 * size), random crop, flip; test: same resize, centre crop
        assert (t.big, t.size, t.hflip) == (64, 48, 0.5) and 64 == int(48 * 1.34)
        assert eval_resize(cfg) == {"eval_resize": 64}
        assert [type(op).__name__ for op in e.transforms][:2] == ["Resize", "CenterCrop"]
    device_half = batch_augment(cfg, DCFG)  # medaugs' TrivialAugmentWide and RandomErasing run on the device
    assert (device_half.erase_prob, device_half.trivial) == ((0.3, True) if augment == "med" else (0.0, False))


def test_weak_crop_is_a_window_of_the_resized_square_and_flips_half_the_time():
    cfg = TrainParams.model_validate({**VIT, "img_size": 32, "augment": "weak", "hflip": 0.5})
    t = train_transform(cfg, DCFG, seed=0)
    img = np.random.default_rng(0).integers(0, 256, (50, 60, 3), dtype=np.uint8)
    big = cv2.resize(img, (t.big, t.big), interpolation=cv2.INTER_CUBIC)
    windows = {
        (y, x, flip): (big[y : y + 32, x : x + 32][:, ::-1] if flip else big[y : y + 32, x : x + 32])
        for y in range(t.big - 31)
        for x in range(t.big - 31)
        for flip in (0, 1)
    }
    found = []
    for seed in range(200):
        t.set_random_seed(seed)
        out = t(image=img)["image"]
        found.append(next(k for k, w in windows.items() if np.array_equal(out, w)))
    assert 0.35 < np.mean([f for _, _, f in found]) < 0.65
    assert {y for y, _, _ in found} == set(range(t.big - 31))  # every offset reached: a uniform placement


def test_grad_clip_bounds_the_total_gradient_norm():
    def grad_norm(clip):
        torch.manual_seed(0)
        model = nn.Linear(16, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the gradients are what is left to inspect
        x, y = 100 * torch.randn(8, 16), torch.randint(0, 4, (8,))
        train_step(model, x, y, opt, nn.CrossEntropyLoss(), torch.device("cpu"), "fp32", grad_clip=clip)
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()

    assert grad_norm(None) > 10
    assert grad_norm(1.0) == pytest.approx(1.0, rel=1e-4)


def test_stochastic_depth_matches_timms_own_rule():
    torch.manual_seed(0)
    ours = build_model("vit", "vit_tiny_patch16_224", 1000, "none", 32, patch_size=8, drop_path_rate=0.1)
    assert len(ours.blocks) == 12
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, drop_path_rate=0.1)
    rates = [[getattr(getattr(b, a), "drop_prob", 0.0) for a in ("drop_path1", "drop_path2")] for b in ours.blocks]
    expected = [[getattr(getattr(b, a), "drop_prob", 0.0) for a in ("drop_path1", "drop_path2")] for b in ref.blocks]
    np.testing.assert_allclose(rates, expected)
    assert rates[-1] == [pytest.approx(0.1)] * 2 and rates[0] == [0.0, 0.0]
    ours.train()
    x = torch.randn(4, 3, 32, 32)
    assert not torch.equal(ours(x), ours(x))  # blocks are dropped at random in training
    ours.eval()
    assert torch.equal(ours(x), ours(x))


def test_stochastic_depth_reaches_glsim_and_names_the_key_where_timm_has_none():
    glsim = build_model("glsim", "vit_tiny_patch16_224", 5, "none", 32, patch_size=8, drop_path_rate=0.1)
    assert glsim.vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    with pytest.raises(ValueError, match="train.drop_path_rate"):
        build_model("cnn", "vgg11", 5, "none", 32, drop_path_rate=0.1)


def test_readme_papers_settings_resolve_to_what_the_table_says():
    """The README's table of the papers' settings: each variant cell is valid params and resolves to the stated
    weights, rates and sizes (the table cannot drift from RECIPES)."""
    from pipeline.config import AcquireParams, variant_train
    from pipeline.data.registry import source_dataset
    from tests.conftest import REPO

    lines = (REPO / "README.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| variant | `glsim224:"))
    cells = [yaml.safe_load("{" + c + "}") for c in re.findall(r"`([^`]+)`", row)]
    data = next(line for line in lines if line.startswith("| data | `acquire:"))
    sources = [yaml.safe_load(c)["acquire"] for c in re.findall(r"`([^`]+)`", data)]
    resolved = [TrainParams.model_validate(variant_train(TrainParams(), next(iter(c.values())))) for c in cells]
    glsim224, glsim448, ila448 = resolved
    for cfg in resolved:
        assert (cfg.model, cfg.weights, cfg.layer_norm_eps, cfg.init) == (
            "vit_base_patch16_224.orig_in21k",
            "hub",
            1e-12,
            "paper",
        )
    assert (glsim224.img_size, glsim448.img_size, ila448.img_size) == (224, 448, 448)
    assert (glsim448.drop_path_rate, glsim448.drop_path_rule, glsim448.proj_drop_rate) == (0.1, "constant", 0.0)
    assert (ila448.ila_variant, ila448.proj_drop_rate, ila448.drop_path_rate, ila448.lr) == ("ila++", 0.1, 0.0, 0.1)
    assert [source_dataset(AcquireParams.model_validate(a)) for a in sources] == ["daf", "cotton"]
