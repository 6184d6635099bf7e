"""Models built by name: `build_model(method, model_name, num_classes, weights, img_size, **model_options(cfg))`.

Methods: cnn, vit, linear (timm models as they are), glsim (glsim.GLSimViT) and ila (ila.ILAViT, variants ila / ila+ /
ila++); `python -m pipeline profile` (profile.py) reports their parameters, FLOPs, tokens, speed and memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["METHODS", "build_model", "describe_weights", "load_checkpoint", "model_options", "save_checkpoint"]

if TYPE_CHECKING:
    from pipeline.models.factory import (
        METHODS,
        build_model,
        describe_weights,
        load_checkpoint,
        model_options,
        save_checkpoint,
    )


def __getattr__(name: str):
    # Lazy (PEP 562): `python -m pipeline` imports pipeline.models.profile to build its parser, and a params error
    # must not wait for the 3 s torch + timm import that factory needs.
    if name in __all__:
        from pipeline.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'pipeline.models' has no attribute {name!r}")
