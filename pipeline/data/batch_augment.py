"""The device half of the augmentation: normalisation and random erasing on whole uint8 batches.

Use (the training engine does this through `pipeline/data/prefetch.DeviceLoader`; distillation may reuse it):

    aug = BatchAugment(mean=(0.5,) * 3, std=(0.5,) * 3, erase_prob=0.3)
    params = aug.draw(rng, height, width)        # per image, on the CPU (a DataLoader worker): int32 (4,)
    x = aug(x_uint8.to(device), params_batch)     # per batch, on the device: (B, H, W, C) uint8 as decoded
                                                  # -> (B, C, H, W) float32, normalised, erased

Why the erasing rectangles are drawn on the CPU: drawing them from the image's own generator (seed, epoch, index)
keeps the same pixels for the same key whatever the batch size, worker count or device, as the CPU pipeline did.
The draw is torchvision's RandomErasing (the GLSim code's): p, area scale (0.02, 0.4), log-uniform aspect ratio
(0.3, 3.3), up to 10 tries, value 0 after normalisation (the mean colour).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

NO_ERASE = (0, 0, 0, 0)  # (top, left, height, width); height 0: the image is left as it is


@dataclass(frozen=True)
class BatchAugment:
    mean: tuple[float, ...]  # per channel, in [0, 1] units (timm's data config)
    std: tuple[float, ...]
    erase_prob: float = 0.0  # share of images with one erased rectangle (0: none, no parameters to draw)
    erase_scale: tuple[float, float] = (0.02, 0.4)  # area of the rectangle, as a share of the image
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # its aspect ratio h/w, drawn log-uniformly

    @property
    def needs_params(self) -> bool:
        return self.erase_prob > 0

    def draw(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """One image's rectangle (top, left, height, width) as int32; all zero when it is not erased."""
        if rng.random() >= self.erase_prob:
            return np.array(NO_ERASE, np.int32)
        area = height * width
        log_ratio = (math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.erase_scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if h < height and w < width:
                top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
                return np.array((top, left, h, w), np.int32)
        return np.array(NO_ERASE, np.int32)  # torchvision's fallback: no rectangle fits, the image stays

    def __call__(self, x: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, H, W) normalised, each image's rectangle of `params` (B, 4) set to 0.

        The result is a channels-last view of the computed tensor; `.contiguous()` gives NCHW when a model wants it."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"BatchAugment takes uint8 (B, H, W, C) batches, got {x.dtype} {tuple(x.shape)}")
        scale, neg_shift = _normalize_terms(self.mean, self.std, str(x.device))
        out = torch.addcmul(neg_shift, x.float(), scale)  # (x / 255 - mean) / std in one kernel, channels last
        if params is not None and self.needs_params:
            out = out.masked_fill(erase_mask(params.to(x.device), x.shape[1], x.shape[2]).unsqueeze(-1), 0.0)
        return out.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=16)
def _normalize_terms(mean: tuple[float, ...], std: tuple[float, ...], device: str) -> tuple[torch.Tensor, ...]:
    """(1 / (255 std), -mean / std) on `device`, made once: a per-batch host-to-device copy would block the host."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device)
    return scale, torch.tensor([-m / s for m, s in zip(mean, std)], device=device)


def erase_mask(params: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H, W) bool: True inside each image's rectangle (top, left, h, w)."""
    top, left, h, w = (params[:, i].view(-1, 1, 1) for i in range(4))
    rows = torch.arange(height, device=params.device).view(1, -1, 1)
    cols = torch.arange(width, device=params.device).view(1, 1, -1)
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
