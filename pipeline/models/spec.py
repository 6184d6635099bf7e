"""ModelSpec: the one description of a model's architecture, from the build to the checkpoint and back.

build_model sets `model.spec`; save_checkpoint writes it as the checkpoint's `model_spec` (a plain dict on disk, so
`torch.load(weights_only=True)` reads it); load_checkpoint, evaluate, predict and export read it back with
`ModelSpec.of(ckpt)`. Checkpoints written before `options` was recorded still load (no options: the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    method: str  # a name of the method registry (pipeline/methods.py)
    model: str  # the timm model name
    img_size: int | None = None  # the square input size it was built for (None: timm's default)
    options: dict[str, Any] = field(default_factory=dict)  # build options beyond the name (methods.COMMON_OPTIONS
    # and the method's own): what rebuilds the same architecture; training-only knobs (dropout rates) are not here

    @classmethod
    def from_dict(cls, spec: dict) -> ModelSpec:
        return cls(spec["method"], spec["model"], spec.get("img_size"), dict(spec.get("options") or {}))

    @classmethod
    def of(cls, ckpt: dict) -> ModelSpec:
        """The spec of a loaded checkpoint (save_checkpoint's dict)."""
        return cls.from_dict(ckpt["model_spec"])

    def as_dict(self) -> dict[str, Any]:
        """The checkpoint's form (plain data; the key order is part of the checkpoint's bytes)."""
        return {"method": self.method, "model": self.model, "img_size": self.img_size, "options": dict(self.options)}
