"""TrivialAugmentWide on whole uint8 batches, on any torch device: each image its own op and magnitude.

The parameters come from `trivial_augment.params_of` (drawn in the DataLoader worker from the image's own
generator, so the same (seed, epoch, index) gives the same op on any device). Images are grouped by op, and each
group is transformed in a few batched kernels: the colour ops with the arithmetic of the Pillow code torchvision
runs (`trivial_augment.apply`, the CPU reference: float32 blends truncated to uint8, ImageOps' tables), the
geometric ops as one gather with PIL's nearest-neighbour rule (the output pixel centre mapped through the inverse
affine matrix, floored; outside the image: black). Results equal the CPU reference except where a mapped coordinate
or a blend lands within rounding of an integer (tests/test_loader_pipeline.py bounds how often).
"""

from __future__ import annotations

import torch

from pipeline.data.trivial_augment import OPS

_OP = {name: k for k, name in enumerate(OPS)}
_SMOOTH = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=torch.float32) / 13.0  # Pillow's SMOOTH


def apply_batch(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) and float64 (B, 8) parameters (params on the CPU: grouping needs no device sync) ->
    uint8 (B, H, W, C), each image transformed by its op (Identity: unchanged)."""
    ops = params[:, 0].long().cpu()
    out = x
    for name, fn in _BATCH_OPS.items():
        idx = (ops == _OP[name]).nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        if out is x:
            out = x.clone()
        idx_dev = idx.to(x.device, non_blocking=True)
        p = params[idx].to(x.device, non_blocking=True)
        out[idx_dev] = fn(x[idx_dev], p)
    return out


def _blend(degenerate: torch.Tensor, img: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's Image.blend in float32: degenerate + factor * (img - degenerate), clipped, truncated to uint8."""
    return (degenerate + factor * (img - degenerate)).clamp_(0, 255).to(torch.uint8)


def _factor(p: torch.Tensor) -> torch.Tensor:
    """ImageEnhance's factor 1 + magnitude, as float32 (n, 1, 1, 1)."""
    return (1.0 + p[:, 1]).float().view(-1, 1, 1, 1)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L (ITU-R 601-2 luma, fixed point with rounding): int32 (n, H, W)."""
    rgb = x.int()
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _brightness(x, p):
    return _blend(torch.zeros((), device=x.device), x.float(), _factor(p))


def _color(x, p):
    return _blend(_gray(x).float().unsqueeze(-1), x.float(), _factor(p))


def _contrast(x, p):
    mean = _gray(x).double().mean(dim=(1, 2))
    return _blend(torch.floor(mean + 0.5).float().view(-1, 1, 1, 1), x.float(), _factor(p))


def _sharpness(x, p):
    _, h, w, c = x.shape
    img = x.float()
    kernel = _SMOOTH.to(x.device).expand(c, 1, 3, 3)
    smooth = torch.nn.functional.conv2d(img.permute(0, 3, 1, 2), kernel, padding=1, groups=c).permute(0, 2, 3, 1)
    smooth = torch.round(smooth).clamp_(0, 255)  # cv2.filter2D's uint8 result (round half to even)
    inner = torch.zeros(h, w, 1, dtype=torch.bool, device=x.device)
    inner[1:-1, 1:-1] = True
    smooth = torch.where(inner, smooth, img)  # Pillow's filter leaves the border pixels as they are
    return _blend(smooth, img, _factor(p))


def _posterize(x, p):
    bits = p[:, 1].long()
    mask = ((0xFF << (8 - bits)) & 0xFF).to(torch.uint8).view(-1, 1, 1, 1)
    return x & mask


def _solarize(x, p):
    return torch.where(x.double() < p[:, 1].view(-1, 1, 1, 1), x, 255 - x)


def _autocontrast(x, p):
    lo = x.amin(dim=(1, 2), keepdim=True).double()
    hi = x.amax(dim=(1, 2), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    out = torch.trunc(x.double() * scale - lo * scale).clamp_(0, 255).to(torch.uint8)
    return torch.where(hi > lo, out, x)


def _equalize(x, p):
    n, h, w, c = x.shape
    flat = x.permute(0, 3, 1, 2).reshape(n * c, h * w).long()
    rows = torch.arange(n * c, device=x.device).view(-1, 1)
    hist = torch.bincount((flat + 256 * rows).reshape(-1), minlength=n * c * 256).view(n * c, 256)
    used = hist > 0
    last = 255 - used.flip(1).int().argmax(dim=1, keepdim=True)  # the highest level present
    step = (h * w - hist.gather(1, last)) // 255
    step = torch.where(used.sum(1, keepdim=True) > 1, step, torch.zeros_like(step))
    start = torch.cumsum(hist, 1) - hist + step // 2
    lut = torch.where(
        step > 0,
        torch.minimum(start // step.clamp_min(1), torch.tensor(255, device=x.device)),
        torch.arange(256, device=x.device),
    )
    return lut.gather(1, flat).view(n, c, h, w).permute(0, 2, 3, 1).to(torch.uint8)


def _affine(x, p):
    """PIL's AFFINE transform with NEAREST: output (x, y) <- input (floor(a x' + b y' + c), floor(d x' + e y' + f)),
    x' = x + .5, y' = y + .5; coordinates outside the image give black."""
    n, h, w, c = x.shape
    ys = torch.arange(h, dtype=torch.float64, device=x.device).view(1, -1, 1) + 0.5
    xs = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, -1) + 0.5
    a, b, cc, d, e, f = (p[:, 2 + k].view(-1, 1, 1) for k in range(6))
    xin = torch.floor(a * xs + b * ys + cc).long()
    yin = torch.floor(d * xs + e * ys + f).long()
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    src = torch.where(inside, yin * w + xin, 0).view(n, h * w, 1).expand(n, h * w, c)
    out = x.reshape(n, h * w, c).gather(1, src).view(n, h, w, c)
    return out * inside.unsqueeze(-1).to(torch.uint8)


_BATCH_OPS = {
    "ShearX": _affine,
    "ShearY": _affine,
    "TranslateX": _affine,
    "TranslateY": _affine,
    "Rotate": _affine,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Sharpness": _sharpness,
    "Posterize": _posterize,
    "Solarize": _solarize,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
}
