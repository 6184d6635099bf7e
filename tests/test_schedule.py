"""The learning rate the engine trains with: linear warm-up from 1e-6, then cosine to min_lr, stepped per update
(timm's CosineLRScheduler as the GLSim/ILA trainers use it: the cosine spans the whole run, the warm-up overlays its
start)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainParams
from pipeline.training.engine import make_optimizer


@pytest.mark.parametrize("warmup", [{"warmup_epochs": 1}, {"warmup_steps": 7}], ids=["epochs", "steps"])
def test_lr_follows_warmup_then_cosine_per_step(warmup):
    cfg = TrainParams(epochs=4, lr=0.01, min_lr=1e-4, optimizer="adamw", **warmup)
    per_epoch = 10
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = make_optimizer(model, cfg, per_epoch)
    total, w = cfg.epochs * per_epoch, (cfg.warmup_steps or cfg.warmup_epochs * per_epoch)
    seen = []
    for step in range(1, total + 1):  # as the engine: one step_update per optimiser step, nothing per epoch
        optimizer.step()
        scheduler.step_update(num_updates=step)
        seen.append(optimizer.param_groups[0]["lr"])
    for t, lr in enumerate(seen, start=1):
        if t < w:
            expected = 1e-6 + t * (cfg.lr - 1e-6) / w
        else:
            expected = cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * t / total))
        assert lr == pytest.approx(expected, rel=1e-6), t
    assert seen[-1] == pytest.approx(cfg.min_lr, rel=1e-6)
    assert all(a < b for a, b in zip(seen[: w - 2], seen[1 : w - 1]))  # rising through the warm-up (t < w)
    assert all(a >= b for a, b in zip(seen[w - 1 :], seen[w:]))  # then never rising (t >= w)
