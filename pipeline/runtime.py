"""Runtime helpers every stage shares: the device, autocast, seeding and CUDA-synchronised timing.

The ground floor of the package's runtime side: it imports only torch and numpy, so train, evaluate, predict,
distill, bench, profile and gpu-check can all use it without importing the trainer.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable

import numpy as np
import torch


def resolve_device(spec: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; an explicit cuda device on a machine without CUDA is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"base.device={spec!r} but CUDA is not available on this machine (use auto or cpu)")
    return torch.device(spec)


def seed_everything(seed: int, threads: int, device: torch.device) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cpu":
        torch.set_num_threads(threads)
        # Same seed + same machine -> same weights, so a re-run reproduces dvc.lock's hashes.
        torch.use_deterministic_algorithms(True, warn_only=True)


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (fp32: none); fp16 exists only on CUDA."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train.precision=fp16 needs CUDA; use bf16 or fp32 on CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU): a wall-clock reading then means work done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], n: int, device: torch.device) -> float:
    """Seconds for `n` calls of `fn`, synchronised with the device before and after (kernels run asynchronously)."""
    synchronize(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return time.perf_counter() - t


def fused_optimizer_kwargs(device: torch.device, opt: str) -> dict:
    """Optimizer kwargs for the fastest update kernel: one fused CUDA kernel for torch's AdamW/Adam/SGD on CUDA,
    else foreach (a few ops for all tensors; on CPU torch does not pick it by default)."""
    if device.type == "cuda" and opt.lower() in ("adamw", "adam", "sgd", "nesterov", "momentum"):
        return {"fused": True}
    return {"foreach": True}
