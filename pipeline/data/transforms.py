"""Albumentations pipelines whose mean/std come from the model's timm data config."""

from __future__ import annotations

import albumentations as A
import cv2
from torch import nn

from pipeline.config import TrainParams


def data_config(model: nn.Module) -> dict:
    """mean/std/interpolation the model's pretrained weights expect (timm's resolve_model_data_config)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {"mean": [float(x) for x in cfg["mean"]], "std": [float(x) for x in cfg["std"]],
            "interpolation": cfg.get("interpolation", "bilinear")}


_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def train_transform(cfg: TrainParams, dcfg: dict, seed: int) -> A.Compose:
    """Seeded: albumentations 2 draws from its own generator, not from numpy/torch global state."""
    interp = _INTERP.get(dcfg["interpolation"], cv2.INTER_LINEAR)
    return A.Compose([
        A.RandomResizedCrop(size=(cfg.img_size, cfg.img_size), scale=(cfg.scale_min, 1.0), interpolation=interp),
        A.HorizontalFlip(p=cfg.hflip),
        A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=cfg.color_jitter),
        A.Normalize(mean=dcfg["mean"], std=dcfg["std"]),
        A.ToTensorV2(),
    ], seed=seed)


def eval_transform(img_size: int, dcfg: dict) -> A.Compose:
    interp = _INTERP.get(dcfg["interpolation"], cv2.INTER_LINEAR)
    return A.Compose([
        A.SmallestMaxSize(max_size=img_size, interpolation=interp),
        A.CenterCrop(height=img_size, width=img_size),
        A.Normalize(mean=dcfg["mean"], std=dcfg["std"]),
        A.ToTensorV2(),
    ])
