"""Options of timm's ViT blocks that the GLSim/ILA authors' blocks set differently from timm's defaults.

- Stochastic depth: the authors' blocks all use DropPath(sd); timm spreads drop_path_rate linearly from 0 in the first
  block to the rate in the last (measured: 0.0 ... 0.1). `constant_drop_path` is a timm `block_fn` that builds timm's
  own block with the rate in every block.
- Hidden dropout: the authors drop the attention projection's and the MLP's outputs (hidden_dropout_prob 0.1 when
  stochastic depth is off); timm's proj_drop_rate does that and also drops the MLP's hidden activations, which
  `output_dropout_only` switches off.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import timm
import torch
from torch import nn


def block_type(model_name: str) -> type[nn.Module]:
    """The block class timm builds this ViT from (read on the meta device: no memory, no init)."""
    with torch.device("meta"):
        return type(timm.create_model(model_name, pretrained=False).blocks[0])


def constant_drop_path(block_cls: type[nn.Module], rate: float, **block_kwargs: Any) -> nn.Module:
    """timm's block_fn hook (use with functools.partial(constant_drop_path, cls, rate)): the block timm would build,
    with drop_path=rate instead of the linearly decayed rate timm hands each block."""
    return block_cls(**{**block_kwargs, "drop_path": rate})


def output_dropout_only(blocks: Iterable[nn.Module]) -> None:
    """Leave only the authors' two dropouts per block: timm's Mlp(drop=p) drop1 (after the activation) gets p = 0.
    A Dropout has no parameters, so the state dict is unchanged."""
    for block in blocks:
        drop1 = getattr(getattr(block, "mlp", None), "drop1", None)
        if isinstance(drop1, nn.Dropout):
            drop1.p = 0.0
