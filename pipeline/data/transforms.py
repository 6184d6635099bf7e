"""Albumentations pipelines whose mean/std/interpolation come from the model's timm data config.

`train.augment` picks the training pipeline:
- rrc: RandomResizedCrop + optional flip + colour jitter (the emoji default: artists differ in colour and line).
- weak: GLSim/ILA "weakaugs": resize to a square of int(img_size * resize_ratio), random crop, horizontal flip.
- med: GLSim "medaugs": weak + a TrivialAugmentWide-style op + random erasing (p 0.3, after normalisation).
Evaluation mirrors it: weak/med resize to the same square and centre-crop (GLSim's test transform); rrc resizes the
short side to img_size and centre-crops. The eval resize is stored in the checkpoint's data config, so the evaluate
stage applies the one the model was trained with.
"""

from __future__ import annotations

import albumentations as A
import cv2
from torch import nn

from pipeline.config import TrainParams

ERASE_PROB = 0.3  # medaugs: torchvision RandomErasing(p=0.3, scale=(0.02, 0.4), ratio=(0.3, 3.3))


def data_config(model: nn.Module) -> dict:
    """mean/std/interpolation the model's pretrained weights expect (timm's resolve_model_data_config)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]],
            "interpolation": cfg.get("interpolation", "bilinear")}


def eval_resize(cfg: TrainParams) -> dict:
    """The eval-time resize that matches `cfg.augment`, as data-config keys (empty: the rrc default)."""
    if cfg.augment == "rrc":
        return {}
    return {"eval_resize": int(cfg.img_size * cfg.resize_ratio)}  # int() as GLSim: 224 -> 300, 448 -> 600


_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _interp(dcfg: dict) -> int:
    return _INTERP.get(dcfg["interpolation"], cv2.INTER_LINEAR)


def train_transform(cfg: TrainParams, dcfg: dict, seed: int) -> A.Compose:
    """Seeded: albumentations 2 draws from its own generator, not from numpy/torch global state."""
    size, interp = cfg.img_size, _interp(dcfg)
    normalize = [A.Normalize(mean=dcfg["mean"], std=dcfg["std"])]
    if cfg.augment == "rrc":
        ops = [A.RandomResizedCrop(size=(size, size), scale=(cfg.scale_min, 1.0), interpolation=interp),
               A.HorizontalFlip(p=cfg.hflip),
               A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=cfg.color_jitter),
               *normalize]
    else:
        big = int(size * cfg.resize_ratio)
        ops = [A.Resize(big, big, interpolation=interp), A.RandomCrop(size, size), A.HorizontalFlip(p=cfg.hflip)]
        if cfg.augment == "med":
            ops += [trivial_augment_wide(), *normalize,
                    A.Erasing(scale=(0.02, 0.4), ratio=(0.3, 3.3), fill=0, p=ERASE_PROB)]
        else:
            ops += normalize
    return A.Compose([*ops, A.ToTensorV2()], seed=seed)


def trivial_augment_wide() -> A.OneOf:
    """TrivialAugmentWide (Mueller & Hutter 2021; torchvision's op set and "wide" ranges) in albumentations.

    TrivialAugment applies ONE op, picked uniformly, with a magnitude drawn uniformly from its range: exactly what
    OneOf over equally weighted p=1 ops with ranges does. Ranges: shear +-0.99 (as an angle: atan(0.99) = 44.7 deg),
    translate +-32 px at 224 px (as a fraction of the size), rotate +-135 deg, brightness/saturation/contrast factors
    1 +- 0.99, posterize 2..8 bits, solarize at any threshold. Sharpness only sharpens here (albumentations has no
    PIL-style sharpness factor below 1). Geometric ops fill with black, as torchvision's default.
    """
    shear, move = 44.7, 32 / 224
    ops = [
        A.NoOp(p=1.0),
        A.Affine(shear={"x": (-shear, shear), "y": (0, 0)}, p=1.0),
        A.Affine(shear={"x": (0, 0), "y": (-shear, shear)}, p=1.0),
        A.Affine(translate_percent={"x": (-move, move), "y": (0, 0)}, p=1.0),
        A.Affine(translate_percent={"x": (0, 0), "y": (-move, move)}, p=1.0),
        A.Affine(rotate=(-135, 135), p=1.0),
        A.ColorJitter(brightness=(0.01, 1.99), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1.0),
        A.ColorJitter(brightness=(1, 1), contrast=(1, 1), saturation=(0.01, 1.99), hue=(0, 0), p=1.0),
        A.ColorJitter(brightness=(1, 1), contrast=(0.01, 1.99), saturation=(1, 1), hue=(0, 0), p=1.0),
        A.Sharpen(alpha=(0.0, 0.99), lightness=(1.0, 1.0), p=1.0),
        A.Posterize(num_bits=(2, 8), p=1.0),
        A.Solarize(threshold_range=(0.0, 1.0), p=1.0),
        A.AutoContrast(p=1.0),
        A.Equalize(p=1.0),
    ]
    return A.OneOf(ops, p=1.0)


def eval_transform(img_size: int, dcfg: dict) -> A.Compose:
    interp = _interp(dcfg)
    if "eval_resize" in dcfg:  # weak/med: GLSim's test transform (square resize, centre crop)
        resize = A.Resize(dcfg["eval_resize"], dcfg["eval_resize"], interpolation=interp)
    else:
        resize = A.SmallestMaxSize(max_size=img_size, interpolation=interp)
    return A.Compose([
        resize,
        A.CenterCrop(height=img_size, width=img_size),
        A.Normalize(mean=dcfg["mean"], std=dcfg["std"]),
        A.ToTensorV2(),
    ])
