"""Issue 6: the GLSim and ILA paper recipes as named presets, their albumentations pipelines, gradient clipping and
stochastic depth."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import timm
import torch
import yaml
from torch import nn

from pipeline.config import ParamsError, TrainParams, load_params
from pipeline.data.transforms import eval_resize, eval_transform, train_transform
from pipeline.models import build_model
from pipeline.training.engine import _optimization, recipe_overrides, train_step
from tests.conftest import write_tiny_params

VIT = {"method": "vit", "model": "vit_tiny_patch16_224", "weights": "none", "img_size": 32, "patch_size": 8}
DCFG = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic"}


def test_glsim_recipe_resolves_to_the_papers_values():
    cfg = TrainParams.model_validate({**VIT, "recipe": "glsim"})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == ("sgd", 0.01, 0.0, 8, 50)
    assert (cfg.warmup_steps, cfg.min_lr, cfg.grad_clip, cfg.label_smoothing) == (500, 1e-5, 1.0, 0.1)
    assert (cfg.augment, cfg.hflip, cfg.drop_path_rate, cfg.resize_ratio) == ("med", 0.5, 0.1, 1.34)
    assert recipe_overrides(cfg) == {}


def test_ila_recipe_is_the_same_trainer_with_lr_0_1_and_weak_augs():
    cfg = TrainParams.model_validate({**VIT, "method": "ila", "recipe": "ila"})
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps) == ("sgd", 0.1, 0.0, 1.0, 500)
    assert (cfg.augment, cfg.label_smoothing, cfg.drop_path_rate) == ("weak", 0.0, 0.0)


def test_keys_written_in_params_yaml_win_over_the_recipe(tmp_path, tiny_emoji):
    params = yaml.safe_load(write_tiny_params(tmp_path, tiny_emoji).read_text())
    recipe_keys = {"optimizer", "lr", "weight_decay", "batch_size", "epochs", "warmup_steps", "min_lr", "grad_clip",
                   "label_smoothing", "augment", "hflip", "drop_path_rate", "resize_ratio"}
    params["train"] = {k: v for k, v in params["train"].items() if k not in recipe_keys} | {
        **VIT, "recipe": "glsim", "lr": 0.003, "grad_clip": None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(params))
    cfg = load_params(path).train
    assert (cfg.lr, cfg.grad_clip, cfg.optimizer, cfg.augment) == (0.003, None, "sgd", "med")
    assert recipe_overrides(cfg) == {"lr": (0.003, 0.01), "grad_clip": (None, 1.0)}


def test_ila_recipe_needs_a_frozen_backbone_method(tmp_path, tiny_emoji):
    path = write_tiny_params(tmp_path, tiny_emoji)
    with pytest.raises(ParamsError, match=r"train\.recipe: 'ila' trains a frozen backbone"):
        load_params(path, overrides={"train.recipe": "ila", "train.method": "cnn"})


def test_glsim_optimizer_and_per_step_schedule():
    """timm "sgd" is Nesterov SGD with momentum 0.9; the lr warms up from 1e-6 over 500 steps and follows a per-step
    cosine to 1e-5 (timm's default warmup_prefix=False: the cosine spans the whole run, warm-up overlays its start)."""
    cfg = TrainParams.model_validate({**VIT, "recipe": "glsim", "epochs": 4})
    updates, total = 1000, 4000
    opt, sched = _optimization(nn.Linear(4, 3), cfg, updates)
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
def test_augment_pipelines_are_albumentations_and_give_the_model_size(augment):
    cfg = TrainParams.model_validate({**VIT, "img_size": 48, "augment": augment, "hflip": 0.5})
    t = train_transform(cfg, DCFG, seed=0)
    assert isinstance(t, A.Compose)
    img = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)  # not square, not 48 px
    out = t(image=img)["image"]
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    e = eval_transform(cfg.img_size, {**DCFG, **eval_resize(cfg)})
    assert e(image=img)["image"].shape == (3, 48, 48)
    names = [type(op).__name__ for op in t.transforms]
    if augment == "rrc":
        assert names[0] == "RandomResizedCrop" and eval_resize(cfg) == {}
    else:  # GLSim: resize to int(1.34 * size), random crop, flip; test: same resize, centre crop
        assert names[:3] == ["Resize", "RandomCrop", "HorizontalFlip"]
        assert (t.transforms[0].height, t.transforms[0].width) == (64, 64) == (int(48 * 1.34),) * 2
        assert eval_resize(cfg) == {"eval_resize": 64}
        assert [type(op).__name__ for op in e.transforms][:2] == ["Resize", "CenterCrop"]
    if augment == "med":
        trivial = t.transforms[3]
        assert isinstance(trivial, A.OneOf) and len(trivial.transforms) == 14  # TrivialAugmentWide's op set
        assert names[-3:] == ["Normalize", "Erasing", "ToTensorV2"]  # erasing after normalisation, as timm/GLSim
        assert t.transforms[-2].p == 0.3


def test_medaugs_erase_about_30_percent_of_images():
    cfg = TrainParams.model_validate({**VIT, "img_size": 32, "augment": "med"})
    t = train_transform(cfg, DCFG, seed=0)
    img = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    erased = 0
    for i in range(300):
        t.set_random_seed(i)
        x = t(image=img)["image"]
        # Normalised pixels are never exactly 0 here ((v/255 - 0.5)/0.5 with integer v), erased ones are.
        erased += bool((x == 0).all(0).any())
    assert 0.2 < erased / 300 < 0.4


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
