"""Albumentations pipelines whose mean/std/interpolation come from the model's timm data config.

`train.augment` picks the training pipeline:
- rrc: RandomResizedCrop + optional flip + colour jitter (the emoji default: artists differ in colour and line).
- weak: GLSim/ILA "weakaugs": resize to a square of int(img_size * resize_ratio), random crop, horizontal flip.
- med: GLSim "medaugs": weak + TrivialAugmentWide (torchvision's own, as the GLSim code uses it) + random erasing
  (p 0.3, after normalisation).
Evaluation mirrors it: weak/med resize to the same square and centre-crop (GLSim's test transform); rrc resizes the
short side to img_size and centre-crops. The eval resize is stored in the checkpoint's data config, so the evaluate
stage applies the one the model was trained with.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
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
            ops += [TrivialAugmentWide(), *normalize,
                    A.Erasing(scale=(0.02, 0.4), ratio=(0.3, 3.3), fill=0, p=ERASE_PROB)]
        else:
            ops += normalize
    return A.Compose([*ops, A.ToTensorV2()], seed=seed)


class TrivialAugmentWide(A.ImageOnlyTransform):
    """torchvision's TrivialAugmentWide (Mueller & Hutter 2021), the op the GLSim code applies, inside albumentations.

    Albumentations has no exact one: its Sharpen only sharpens (torchvision's sharpness factor runs 0.01 .. 1.99, so it
    also blurs), and a translate given as a fraction of the size grows with the image (torchvision: at most 32 px at
    any size). This runs torchvision's transform itself on the uint8 RGB image (as a PIL image, as in the GLSim code:
    before ToTensor and normalisation). Its randomness (one op uniformly out of 14, one of 31 magnitude bins, a random
    sign) comes from torch's generator, which is seeded here from albumentations' own generator and restored
    afterwards: seeded pipelines stay reproducible and the global torch stream is left untouched.
    """

    NUM_BINS = 31  # torchvision's default num_magnitude_bins

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import TrivialAugmentWide as TorchTrivialAugmentWide

        # torchvision's defaults, as the GLSim code calls it: nearest interpolation, black fill
        self.op = TorchTrivialAugmentWide(num_magnitude_bins=self.NUM_BINS, interpolation=InterpolationMode.NEAREST)

    def space(self) -> dict[str, tuple[float, float, bool]]:
        """op -> (smallest, largest magnitude, signed): the op set and ranges the transform draws from."""
        out = {}
        for name, (mags, signed) in self.op._augmentation_space(self.NUM_BINS).items():
            values = mags.reshape(-1).tolist()
            out[name] = (float(min(values)), float(max(values)), bool(signed))
        return out

    def get_params(self) -> dict[str, Any]:
        return {"torch_seed": int(self.random_generator.integers(0, 2**63 - 1))}

    def apply(self, img: np.ndarray, torch_seed: int = 0, **params: Any) -> np.ndarray:
        import torch
        from PIL import Image

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            return np.asarray(self.op(Image.fromarray(img)))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


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
