"""TrivialAugmentWide (Mueller & Hutter 2021) as two plain functions: `draw` its parameters, `apply` them.

The op set and the "wide" magnitudes are torchvision's (`TrivialAugmentWide(num_magnitude_bins=31)`, the op the
GLSim code uses): 14 ops, 31 bins, a random sign for the signed ops. torchvision draws from torch's global
generator, which forced the old wrapper to fork and seed it per image (`torch.manual_seed` costs a Python stack
trace per call in a worker without CUDA: a third of the worker's time). Here the draw takes any NumPy Generator (the
per-sample one of albumentations), and the ops are torchvision's functional ops with the arguments torchvision's
transform passes them (nearest interpolation, black fill, shears about the top-left corner), so the pixels follow the
same rules; only where the random numbers come from changed.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

NUM_BINS = 31  # torchvision's default num_magnitude_bins


def _bins(low: float, high: float) -> tuple[float, ...]:
    import torch  # torch's float32 linspace: the bins equal torchvision's to the last bit

    return tuple(torch.linspace(low, high, NUM_BINS).tolist())


# op -> (magnitude of each bin, signed); the order is torchvision's (an op is drawn by index).
SPACE: dict[str, tuple[tuple[float, ...], bool]] = {
    "Identity": ((0.0,), False),
    "ShearX": (_bins(0.0, 0.99), True),
    "ShearY": (_bins(0.0, 0.99), True),
    "TranslateX": (_bins(0.0, 32.0), True),
    "TranslateY": (_bins(0.0, 32.0), True),
    "Rotate": (_bins(0.0, 135.0), True),
    "Brightness": (_bins(0.0, 0.99), True),
    "Color": (_bins(0.0, 0.99), True),
    "Contrast": (_bins(0.0, 0.99), True),
    "Sharpness": (_bins(0.0, 0.99), True),
    # 8 bits down to 2 in 31 steps, rounded half to even as torch.round does
    "Posterize": (tuple(float(8 - int(np.round(i / ((NUM_BINS - 1) / 6)))) for i in range(NUM_BINS)), False),
    "Solarize": (_bins(255.0, 0.0), False),
    "AutoContrast": ((0.0,), False),
    "Equalize": ((0.0,), False),
}
OPS = tuple(SPACE)


def draw(rng: np.random.Generator) -> tuple[str, float]:
    """(op, signed magnitude): an op uniformly, a bin uniformly (ops with bins), a fair sign (signed ops), all three
    from one call of the generator (three uniforms: a worker draws this per image)."""
    return choose(*rng.random(3).tolist())


def choose(u_op: float, u_bin: float, u_sign: float) -> tuple[str, float]:
    """`draw` from three uniforms in [0, 1) that the caller drew."""
    op = OPS[int(u_op * len(OPS))]
    mags, signed = SPACE[op]
    magnitude = mags[int(u_bin * len(mags))]
    if signed and u_sign < 0.5:
        magnitude = -magnitude
    return op, magnitude


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
N_PARAMS = 8  # (op index, magnitude, a, b, c, d, e, f): one image's draw as `params_of` packs it


def inverse_affine(op: str, magnitude: float, height: int, width: int) -> tuple[float, ...]:
    """The (a, b, c, d, e, f) that torchvision hands PIL's Image.transform(AFFINE) for a geometric op: output pixel
    centre (x + .5, y + .5) reads the input at (a x + b y + c, d x + e y + f). Identity coefficients otherwise."""
    if op in ("ShearX", "ShearY"):  # torchvision: shear angle atan(m) in degrees, about the top-left corner
        t = math.tan(math.radians(math.degrees(math.atan(magnitude))))
        return (1.0, t, 0.0, 0.0, 1.0, 0.0) if op == "ShearX" else (1.0, 0.0, 0.0, t, 1.0, 0.0)
    if op in ("TranslateX", "TranslateY"):  # whole pixels: torchvision passes int(m)
        tx, ty = (int(magnitude), 0) if op == "TranslateX" else (0, int(magnitude))
        return (1.0, 0.0, float(-tx), 0.0, 1.0, float(-ty))
    if op == "Rotate":  # PIL's Image.rotate: counter-clockwise about (w / 2, h / 2), coefficients rounded to 1e-15
        rad = -math.radians(magnitude % 360.0)
        a, b = round(math.cos(rad), 15), round(math.sin(rad), 15)
        d, e = round(-math.sin(rad), 15), round(math.cos(rad), 15)
        cx, cy = width / 2, height / 2
        return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def params_of(op: str, magnitude: float, height: int, width: int) -> tuple[float, ...]:
    """One image's draw as the N_PARAMS numbers the batched ops of `trivial_augment_batch` read."""
    return (float(OPS.index(op)), magnitude, *inverse_affine(op, magnitude, height, width))


def apply(img: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    """`op` at `magnitude` on a uint8 HxWx3 RGB array. The colour ops are NumPy/OpenCV versions of the Pillow code
    torchvision runs on the PIL images the GLSim code feeds it (ImageEnhance's blend, ImageOps' lookup tables), 5-20x
    faster than a PIL round trip; the geometric ops go through torchvision's functional ops on a PIL image."""
    if op == "Identity":
        return img
    if op in _ARRAY_OPS:
        return _ARRAY_OPS[op](img, magnitude)
    from PIL import Image

    out = _PIL_OPS[op](Image.fromarray(img), magnitude)
    return np.asarray(out)  # read-only: the caller's copy into a tensor follows


def _blend(degenerate: np.ndarray | float, img: np.ndarray, factor: float) -> np.ndarray:
    """Pillow's Image.blend(degenerate, img, factor): float32 degenerate + factor * (img - degenerate), clipped to
    0..255 and truncated, as ImageEnhance computes every enhancement."""
    deg = np.asarray(degenerate, dtype=np.float32)
    out = deg + np.float32(factor) * (img.astype(np.float32) - deg)
    return np.clip(out, 0, 255).astype(np.uint8)


def _gray(img: np.ndarray) -> np.ndarray:
    """Pillow's RGB -> L conversion (ITU-R 601-2 luma, fixed point with rounding), as uint32 HxW."""
    rgb = img.astype(np.uint32)
    return (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16


def _smooth(img: np.ndarray) -> np.ndarray:
    """Pillow's ImageFilter.SMOOTH (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1 over 13, rounded); the border keeps its pixels."""
    kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
    out = cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REPLICATE)
    out[0], out[-1], out[:, 0], out[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]
    return out


_LEVELS = np.arange(256)


def _lut(img: np.ndarray, luts: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """A 256-entry table for all channels, or one per channel (OpenCV's LUT: one pass over the image)."""
    table = np.stack(luts, axis=-1) if isinstance(luts, list) else np.repeat(luts[:, None], img.shape[-1], 1)
    return cv2.LUT(img, table.astype(np.uint8).reshape(256, 1, img.shape[-1]))


def _autocontrast_lut(channel: np.ndarray) -> np.ndarray:
    """ImageOps.autocontrast (no cutoff): the used range stretched to 0..255, int() truncation, clamped."""
    used = np.flatnonzero(np.bincount(channel.ravel(), minlength=256))
    lo, hi = int(used[0]), int(used[-1])
    if hi <= lo:
        return _LEVELS
    scale = 255.0 / (hi - lo)
    return np.clip(np.trunc(_LEVELS * scale - lo * scale), 0, 255)


def _equalize_lut(channel: np.ndarray) -> np.ndarray:
    """ImageOps.equalize: the cumulative histogram in steps of (pixels - count of the last used level) // 255."""
    hist = np.bincount(channel.ravel(), minlength=256)
    used = hist[hist > 0]
    step = (int(used.sum()) - int(used[-1])) // 255 if len(used) > 1 else 0
    if not step:
        return _LEVELS
    start = np.concatenate([[0], np.cumsum(hist)[:-1]]) + step // 2
    return np.minimum(start // step, 255)


_ARRAY_OPS = {  # a blend with a constant degenerate, and every ImageOps op, is a lookup table per level
    "Brightness": lambda im, m: _lut(im, _blend(0.0, _LEVELS, 1.0 + m)),
    "Color": lambda im, m: _blend(_gray(im)[..., None], im, 1.0 + m),
    "Contrast": lambda im, m: _lut(im, _blend(float(int(_gray(im).mean() + 0.5)), _LEVELS, 1.0 + m)),
    "Sharpness": lambda im, m: _blend(_smooth(im), im, 1.0 + m),
    "Posterize": lambda im, m: im & np.uint8((0xFF << (8 - int(m))) & 0xFF),
    "Solarize": lambda im, m: _lut(im, np.where(_LEVELS < m, _LEVELS, 255 - _LEVELS)),
    "AutoContrast": lambda im, m: _lut(im, [_autocontrast_lut(im[..., c]) for c in range(im.shape[-1])]),
    "Equalize": lambda im, m: _lut(im, [_equalize_lut(im[..., c]) for c in range(im.shape[-1])]),
}


def _affine(img, magnitude: float, shear=(0.0, 0.0), translate=(0, 0)):
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    return F.affine(
        img,
        angle=0.0,
        translate=list(translate),
        scale=1.0,
        shear=list(shear),
        interpolation=InterpolationMode.NEAREST,
        fill=None,
        center=[0, 0],
    )


def _pil_ops() -> dict:
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    nearest = InterpolationMode.NEAREST
    return {
        # shears: the angle whose tangent is the magnitude, about the top-left corner (torchvision's center=[0, 0])
        "ShearX": lambda im, m: _affine(im, m, shear=(math.degrees(math.atan(m)), 0.0)),
        "ShearY": lambda im, m: _affine(im, m, shear=(0.0, math.degrees(math.atan(m)))),
        "TranslateX": lambda im, m: _affine(im, m, translate=(int(m), 0)),
        "TranslateY": lambda im, m: _affine(im, m, translate=(0, int(m))),
        "Rotate": lambda im, m: F.rotate(im, m, interpolation=nearest, fill=None),
    }


class _LazyOps(dict):
    """torchvision is imported on the first op, not when the data package is."""

    def __missing__(self, key):
        self.update(_pil_ops())
        return dict.__getitem__(self, key)


_PIL_OPS = _LazyOps()
