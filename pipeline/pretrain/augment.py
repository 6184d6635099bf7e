"""Batched, seeded augmentation of the distillation pool on the device that trains (pretrain.* params).

The pool lives on the device as one uint8 tensor; each step gathers its batch and augments it with a handful of
batched tensor ops, so a GPU is not starved by per-image CPU work (albumentations works image by image on the CPU;
torchvision's v2 transforms draw one parameter set per call, i.e. per batch, not per image). Every random number is
drawn on the CPU from a generator seeded by (seed, step), so a batch is a pure function of (seed, step) on any device
and a killed run resumes to the same weights.

The views are heavy on purpose ("function matching", Beyer et al. 2022: both networks see the same view, so any view
is a valid lesson): random resized crops from `scale_min` of the area, flips, rotation/shear, colour jitter, grey,
channel shuffle, blur, inversion, and mixup with the reversed batch on a `mixup` share of the steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN_STD = (0.5, 0.5)  # the teacher's (and the ViT cards') normalisation: inputs in [-1, 1]
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 grey, as albumentations' ToGray
P_AFFINE, P_JITTER, P_GREY, P_SHUFFLE, P_BLUR, P_INVERT = 0.3, 0.8, 0.1, 0.1, 0.1, 0.05
ROTATE_DEG, SHEAR_DEG = 20.0, 10.0
JITTER, HUE = 0.4, 0.1  # brightness/contrast/saturation factors in 1 +- JITTER; hue shift in +-HUE turns
BLUR_SIGMA = (0.3, 1.2)  # Gaussian blur sigma range (5x5 kernel), in pixels of the output view


class BatchAugment:
    """`batch(step)`: B x 3 x S x S float views in [-1, 1] of the pool (N x P x P x 3 uint8, on its device)."""

    def __init__(self, pool: torch.Tensor, batch_size: int, img_size: int, seed: int, scale_min: float, mixup: float):
        if pool.dtype != torch.uint8 or pool.ndim != 4 or pool.shape[-1] != 3:
            raise ValueError(f"pretrain pool: want N x P x P x 3 uint8, got {tuple(pool.shape)} {pool.dtype}")
        self.pool, self.batch_size, self.size, self.seed = pool, batch_size, img_size, seed
        self.scale_min, self.mixup = scale_min, mixup
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(len(self.pool), generator=g))
        return self._perm[1]

    def indices(self, step: int) -> torch.Tensor:
        """Epochs are seeded permutations of the pool: every image once per epoch."""
        n = len(self.pool)
        j = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = j // n
        out = torch.empty_like(j)
        for e in epochs.unique().tolist():  # a batch spans at most a few epochs
            mask = epochs == e
            out[mask] = self._order(e)[j[mask] % n]
        return out

    def __call__(self, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        idx = self.indices(step).to(self.pool.device)
        x = self.pool.index_select(0, idx).permute(0, 3, 1, 2).float().div_(255)
        x = _crop_flip_affine(x, self.size, self.scale_min, g)
        x = _colour(x, g)
        if self.mixup and float(torch.rand((), generator=g)) < self.mixup:
            lam = float(torch.rand((), generator=g))
            x = lam * x + (1 - lam) * x.flip(0)
        return (x - MEAN_STD[0]) / MEAN_STD[1]


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _crop_flip_affine(x: torch.Tensor, size: int, scale_min: float, g: torch.Generator) -> torch.Tensor:
    """Random resized crop (area scale_min..1, aspect 3/4..4/3) + h-flip + rotation/shear, in one grid_sample."""
    b = x.shape[0]
    area = _uniform(g, b, scale_min, 1.0)
    log_ratio = _uniform(g, b, math.log(3 / 4), math.log(4 / 3))
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # crop sides as fractions of the image side
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (1 - w) * _uniform(g, b, -1.0, 1.0)  # centre in grid_sample's [-1, 1] coordinates
    cy = (1 - h) * _uniform(g, b, -1.0, 1.0)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    affine = torch.rand(b, generator=g) < P_AFFINE
    rot = torch.deg2rad(_uniform(g, b, -ROTATE_DEG, ROTATE_DEG)) * affine
    shear = torch.tan(torch.deg2rad(_uniform(g, b, -SHEAR_DEG, SHEAR_DEG))) * affine
    cos, sin = rot.cos(), rot.sin()
    # output (u, v) -> input: centre + diag(w * flip, h) @ rotation @ shear @ (u, v)
    m00, m01 = cos, cos * shear - sin
    m10, m11 = sin, sin * shear + cos
    theta = torch.stack(
        [torch.stack([w * flip * m00, w * flip * m01, cx], -1), torch.stack([h * m10, h * m11, cy], -1)], 1
    ).to(x.device)
    grid = F.affine_grid(theta, [b, 3, size, size], align_corners=False)
    # Outside the drawing is white (the pool's background): sample x - 1 with zero padding, add 1 back.
    return F.grid_sample(x - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1


def _grey(x: torch.Tensor) -> torch.Tensor:
    luma = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def _hue_matrices(turns: torch.Tensor) -> torch.Tensor:
    """B x 3 x 3 RGB -> RGB rotations of the chroma plane (YIQ) by `turns` of a full circle."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    a = 2 * math.pi * turns
    rot = torch.zeros(len(turns), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = a.cos(), -a.sin(), a.sin(), a.cos()
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.device, x.dtype).view(-1, 1, 1, 1)


def _colour(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Colour jitter (brightness, contrast, saturation, hue), grey, channel shuffle, blur, inversion; per image."""
    b = x.shape[0]
    on = (torch.rand(b, generator=g) < P_JITTER).float()
    bright, contrast, sat = (1 + on * _uniform(g, b, -JITTER, JITTER) for _ in range(3))
    hue = on * _uniform(g, b, -HUE, HUE)
    x = x * _per_sample(bright, x)
    mean = _grey(x).mean((2, 3), keepdim=True)
    x = (x - mean) * _per_sample(contrast, x) + mean
    grey = _grey(x)
    x = (x - grey) * _per_sample(sat, x) + grey
    x = torch.einsum("bij,bjhw->bihw", _hue_matrices(hue).to(x.device, x.dtype), x).clamp_(0, 1)
    x = torch.where(_per_sample(torch.rand(b, generator=g) < P_GREY, x) > 0, _grey(x).expand_as(x), x)
    shuffle = torch.rand(b, generator=g) < P_SHUFFLE
    order = torch.where(shuffle[:, None], torch.rand(b, 3, generator=g).argsort(1), torch.arange(3))
    x = x.gather(1, order.to(x.device).view(b, 3, 1, 1).expand_as(x))
    x = torch.where(_per_sample(torch.rand(b, generator=g) < P_BLUR, x) > 0, _blur(x, _uniform(g, b, *BLUR_SIGMA)), x)
    invert = _per_sample(torch.rand(b, generator=g) < P_INVERT, x)
    return x * (1 - 2 * invert) + invert


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """5x5 Gaussian blur with one sigma per image (a grouped convolution over the B*3 channels)."""
    b, c, h, w = x.shape
    t = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None].to(x.device, x.dtype)
    out = F.conv2d(F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate"), k2, groups=b * c)
    return out.view(b, c, h, w)
