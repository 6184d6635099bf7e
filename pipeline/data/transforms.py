"""Albumentations pipelines whose mean/std/interpolation come from the model's timm data config.

The CPU does only what must run there: decode and the geometric crop/resize (plus the default recipe's colour
jitter), and hands over uint8 HWC arrays, as decoders give them (the dataset makes them tensors; a channel transpose
on the CPU costs more than the whole crop, on the device it is free). Medaugs' TrivialAugmentWide, normalisation and
random erasing run on the device, batched (`pipeline/data/batch_augment.py`, applied by
`pipeline/data/prefetch.py`), which also sends 4x fewer bytes.

`train.augment` picks the training pipeline:
- rrc: RandomResizedCrop + optional flip + colour jitter (the emoji default: artists differ in colour and line).
- weak: GLSim/ILA "weakaugs": resize to a square of int(img_size * resize_ratio), random crop, horizontal flip.
- med: GLSim "medaugs": weak + TrivialAugmentWide (torchvision's op set and 31 bins, drawn in the worker, applied
  batched on the device before normalisation) + random erasing (p 0.3, after normalisation, on the device).
Evaluation mirrors it: weak/med resize to the same square and centre-crop (GLSim's test transform); rrc resizes the
short side to img_size and centre-crops. The eval resize is stored in the checkpoint's data config, so the evaluate
stage applies the one the model was trained with.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from torch import nn

from pipeline.config import TrainParams
from pipeline.data.batch_augment import BatchAugment

ERASE_PROB = 0.3  # medaugs: torchvision RandomErasing(p=0.3, scale=(0.02, 0.4), ratio=(0.3, 3.3)), value 0


def data_config(model: nn.Module) -> dict:
    """mean/std/interpolation the model's pretrained weights expect (timm's resolve_model_data_config)."""
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    return {
        "mean": [float(x) for x in cfg["mean"]],
        "std": [float(x) for x in cfg["std"]],
        "interpolation": cfg.get("interpolation", "bilinear"),
    }


def eval_resize(cfg: TrainParams) -> dict:
    """The eval-time resize that matches `cfg.augment`, as data-config keys (empty: the rrc default)."""
    if cfg.augment == "rrc":
        return {}
    return {"eval_resize": int(cfg.img_size * cfg.resize_ratio)}  # int() as GLSim: 224 -> 300, 448 -> 600


_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


def _interp(dcfg: dict) -> int:
    return _INTERP.get(dcfg["interpolation"], cv2.INTER_LINEAR)


def train_transform(cfg: TrainParams, dcfg: dict, seed: int) -> A.Compose | PaperAugment:
    """The CPU half of the training augmentation: uint8 HWC in, uint8 HWC out (see `batch_augment` for the device
    half). Seeded: it draws from its own generator (`set_random_seed`), never from numpy/torch global state."""
    size, interp = cfg.img_size, _interp(dcfg)
    if cfg.augment == "rrc":
        ops = [
            A.RandomResizedCrop(size=(size, size), scale=(cfg.scale_min, 1.0), interpolation=interp),
            A.HorizontalFlip(p=cfg.hflip),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=cfg.color_jitter),
        ]
        return A.Compose(ops, seed=seed)
    return PaperAugment(size, int(size * cfg.resize_ratio), interp, cfg.hflip, seed)  # med: + the device half


class PaperAugment:
    """GLSim's weakaugs (resize to a `big` square, random `size` crop, horizontal flip) on uint8 HWC arrays: the CPU
    half of weakaugs and medaugs alike (medaugs' TrivialAugmentWide and erasing run batched on the device).

    The same ops as albumentations' Resize, RandomCrop and HorizontalFlip (cv2 resize, a uniformly placed crop, a
    mirrored view), called directly with one NumPy Generator per image: an albumentations Compose spends more time
    reseeding its transforms per image (0.5 ms) than the crop and flip take. Interface as a seeded Compose:
    `set_random_seed(seed)`, then `t(image=arr)["image"]`.
    """

    def __init__(self, size: int, big: int, interpolation: int, hflip: float, seed: int = 0):
        self.size, self.big, self.interpolation, self.hflip = size, big, interpolation, hflip
        self.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def set_rng(self, rng: np.random.Generator) -> None:
        """Draw from `rng` (the dataset's per-image generator, which then draws the device half's parameters)."""
        self.rng = rng

    def draw(self) -> tuple[int, int, bool]:
        """(top, left, flip) of the next image: what `__call__` applies, and what a device decoder gets. Three uniforms
        from one call: each Generator call costs a worker more than its numbers (integers() twice took 18 us)."""
        u_top, u_left, u_flip = self.rng.random(3).tolist()
        positions = self.big - self.size + 1
        return int(u_top * positions), int(u_left * positions), u_flip < self.hflip

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        size = self.size
        img = cv2.resize(image, (self.big, self.big), interpolation=self.interpolation)
        top, left, flip = self.draw()
        img = img[top : top + size, left : left + size]
        if flip:
            img = cv2.flip(img, 1)  # a copy: NumPy copies a reversed 3-channel view 50x slower
        return {"image": img}


def batch_augment(cfg: TrainParams, dcfg: dict) -> BatchAugment:
    """The device half of the training augmentation of `cfg.augment`: normalisation, and for med TrivialAugmentWide
    and random erasing."""
    med = cfg.augment == "med"
    return BatchAugment(
        mean=tuple(dcfg["mean"]), std=tuple(dcfg["std"]), erase_prob=ERASE_PROB if med else 0.0, trivial=med
    )


def eval_batch_augment(dcfg: dict) -> BatchAugment:
    """Evaluation's device half: normalisation only."""
    return BatchAugment(mean=tuple(dcfg["mean"]), std=tuple(dcfg["std"]))


def eval_transform(img_size: int, dcfg: dict, normalize: bool = True) -> A.Compose:
    """The evaluation transform: a normalised float CHW tensor, or with `normalize=False` the uint8 HWC crop for a
    device that normalises (eval_batch_augment)."""
    interp = _interp(dcfg)
    if "eval_resize" in dcfg:  # weak/med: GLSim's test transform (square resize, centre crop)
        resize = A.Resize(dcfg["eval_resize"], dcfg["eval_resize"], interpolation=interp)
    else:
        resize = A.SmallestMaxSize(max_size=img_size, interpolation=interp)
    crop = [resize, A.CenterCrop(height=img_size, width=img_size)]
    if not normalize:
        return A.Compose(crop)
    return A.Compose([*crop, A.Normalize(mean=dcfg["mean"], std=dcfg["std"]), A.ToTensorV2()])
