"""CPU kernels: fast native ones, or the AVX2 code paths that give the same bits on other x86 CPUs.

oneDNN (convolutions, matrix products) and MKL choose their kernels, and so the order in which floating-point sums
are added, by CPU model. Two AVX-512 AMD EPYC machines trained the default CNN to 66.5 % and 60.1 % held-out top-1;
with both libraries pinned to their AVX2 code paths they gave 56.65 % to the last bit. The pin slows a training step
(0.87x for EfficientNet-Lite0 at 96 px, 0.72x for ViT-Ti/16 at 128 px; README "Same results on another machine"), so
it is a param, off by default.
"""

from __future__ import annotations

import os

PORTABLE_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}  # read by the libraries at their first use


def use_portable_cpu_kernels(enabled: bool) -> None:
    """Pin oneDNN and MKL to AVX2 (base.portable_cpu) before this process runs its first convolution or GEMM;
    a value the user exported wins. Child processes (data loader workers, Ray trials) inherit it."""
    if enabled:
        for key, value in PORTABLE_ENV.items():
            os.environ.setdefault(key, value)
