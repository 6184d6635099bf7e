"""The device half of the augmentation: TrivialAugmentWide, normalisation and random erasing on whole uint8 batches.

Use (the training engine does this through `pipeline/data/prefetch.DeviceLoader`; distillation may reuse it):

    aug = BatchAugment(mean=(0.5,) * 3, std=(0.5,) * 3, erase_prob=0.3, trivial=True)
    params = aug.draw(rng, height, width)        # per image, on the CPU (a DataLoader worker): float64 (12,)
    x = aug(x_uint8.to(device), params_batch)     # per batch, on the device: (B, H, W, C) uint8 as decoded
                                                  # -> (B, C, H, W) float32, augmented, normalised, erased

Why the parameters are drawn on the CPU: drawing them from the image's own generator (seed, epoch, index) keeps the
same pixels for the same key whatever the batch size, worker count or device, as the CPU pipeline did. Their order
is GLSim's medaugs: TrivialAugmentWide on the uint8 image (torchvision's op set and 31 bins,
`pipeline/data/trivial_augment_batch.py`), then normalisation, then torchvision's RandomErasing (p, area scale
(0.02, 0.4), log-uniform aspect ratio (0.3, 3.3), up to 10 tries, value 0 after normalisation: the mean colour).
Params of one image: columns 0-3 the rectangle (top, left, height, width; height 0: none), 4-11 the TrivialAugment
draw (`trivial_augment.params_of`; op 0, Identity, when the recipe has none).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import trivial_augment
from pipeline.data.trivial_augment_batch import apply_batch

NO_ERASE = (0, 0, 0, 0)  # (top, left, height, width); height 0: the image is left as it is
ERASE, TRIVIAL = slice(0, 4), slice(4, 4 + trivial_augment.N_PARAMS)  # the columns of one image's parameters
NO_TRIVIAL = (0.0, 0.0, *trivial_augment.inverse_affine("Identity", 0.0, 1, 1))  # op 0 (Identity)


@dataclass(frozen=True)
class BatchAugment:
    mean: tuple[float, ...]  # per channel, in [0, 1] units (timm's data config)
    std: tuple[float, ...]
    erase_prob: float = 0.0  # share of images with one erased rectangle (0: none, no parameters to draw)
    erase_scale: tuple[float, float] = (0.02, 0.4)  # area of the rectangle, as a share of the image
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # its aspect ratio h/w, drawn log-uniformly
    trivial: bool = False  # TrivialAugmentWide on every image (GLSim medaugs), before normalisation

    @property
    def needs_params(self) -> bool:
        return self.erase_prob > 0 or self.trivial

    def draw(self, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
        """One image's parameters as float64 (12,): the erased rectangle, then the TrivialAugment draw. The uniforms of
        both (and of erasing's first try) come from one Generator call: a call costs a worker more than its numbers."""
        u = rng.random(8).tolist()
        trivial = (
            trivial_augment.params_of(*trivial_augment.choose(*u[:3]), height, width) if self.trivial else NO_TRIVIAL
        )
        rect = self._erase(u[3:], rng, height, width) if self.erase_prob > 0 else NO_ERASE
        return np.array([*rect, *trivial], np.float64)

    def _erase(self, u: list[float], rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
        """One image's rectangle (top, left, height, width), all zero when it is not erased, from five uniforms (the
        decision and the first try); torchvision's RandomErasing: up to 10 tries of (area, log-uniform aspect), then
        a uniform position. A further try draws its four uniforms from rng."""
        u_erase, *u = u
        if u_erase >= self.erase_prob:
            return NO_ERASE
        area = height * width
        (s0, s1), (r0, r1) = self.erase_scale, (math.log(self.erase_ratio[0]), math.log(self.erase_ratio[1]))
        for attempt in range(10):
            if attempt:
                u = rng.random(4).tolist()
            target = area * (s0 + (s1 - s0) * u[0])
            aspect = math.exp(r0 + (r1 - r0) * u[1])
            h, w = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if h < height and w < width:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        return NO_ERASE  # torchvision's fallback: no rectangle fits, the image stays

    def __call__(self, x: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float32 (B, C, H, W): each image's TrivialAugment op of `params` (B, 12), then
        normalised, then its rectangle set to 0. Params may stay on the CPU (pinned): the op grouping reads them
        there without a device sync.

        The result is a channels-last view of the computed tensor; `.contiguous()` gives NCHW when a model wants it."""
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"BatchAugment takes uint8 (B, H, W, C) batches, got {x.dtype} {tuple(x.shape)}")
        if params is not None and self.trivial:
            x = apply_batch(x, params[:, TRIVIAL])
        scale, neg_shift = _normalize_terms(self.mean, self.std, str(x.device))
        out = torch.addcmul(neg_shift, x.float(), scale)  # (x / 255 - mean) / std in one kernel, channels last
        if params is not None and self.erase_prob > 0:
            rect = params[:, ERASE].to(x.device, non_blocking=True)
            out = out.masked_fill(erase_mask(rect, x.shape[1], x.shape[2]).unsqueeze(-1), 0.0)
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
