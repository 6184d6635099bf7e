"""The GLSim authors' checkpoints (arkel23/GLSim; hub: NYCU-PCSxNTHU-MIS/GLSim, `dafb_vit_b16_16_2.pth`, ...) as
state dicts of our GLSimViT, and back.

Their trainer saves `{"config": argparse.Namespace, "epoch", "model": state_dict, "accuracy", "optimizer"}`; the
state dict is that of their wrapper `VisionTransformer`, whose `.model` is `ViTGLSim`, so every key starts with
`model.`. Their names, per tensor, and ours (GLSimViT: `vit` is a timm VisionTransformer):

    patch_embedding.{weight,bias}                  vit.patch_embed.proj.{weight,bias}
    class_token                                    vit.cls_token
    positional_embedding.pos_embedding             vit.pos_embed                    (1, 1 + N, D)
    encoder.blocks.I.attn.proj_{q,k,v}.W           vit.blocks.I.attn.qkv.W          q, k, v stacked (timm's order)
    encoder.blocks.I.proj.W                        vit.blocks.I.attn.proj.W
    encoder.blocks.I.norm1.W / norm2.W             vit.blocks.I.norm1.W / norm2.W
    encoder.blocks.I.pwff.fc1.W / fc2.W            vit.blocks.I.mlp.fc1.W / fc2.W
    encoder_norm.W                                 vit.norm.W
    aggregator.blocks.0.<block>                    aggregator.0.<block>             same block names as above
    aggregator_norm.W                              aggregator.1.W
    head.W                                         head.W
    anchor_class_token                             (none)                           built, never read by their forward

W is weight and bias. Their reducer is an Identity when representation_size == hidden_size (every released
checkpoint), so it has no tensors. Both sides compute the same function: their attention splits the heads of q, k, v
the way timm splits its fused qkv, the MLP is fc1 -> exact GELU -> fc2, LayerNorm eps 1e-12 (train.layer_norm_eps).
"""

from __future__ import annotations

import re

import torch

PREFIX = "model."  # their wrapper's attribute holding ViTGLSim
UNUSED = ("anchor_class_token",)  # present in their checkpoints (anchor_class_token: True), unused by the forward
# The authors' ViT (the same code in their GLSim and ILA repositories) against timm's names: a block's layers, and the
# tensors outside the blocks (our wrappers hold the timm ViT as `vit`).
BLOCK_KEYS = {"proj": "attn.proj", "norm1": "norm1", "norm2": "norm2", "pwff.fc1": "mlp.fc1", "pwff.fc2": "mlp.fc2"}
VIT_KEYS = {
    "patch_embedding.weight": "vit.patch_embed.proj.weight",
    "patch_embedding.bias": "vit.patch_embed.proj.bias",
    "class_token": "vit.cls_token",
    "positional_embedding.pos_embedding": "vit.pos_embed",
    "encoder_norm.weight": "vit.norm.weight",
    "encoder_norm.bias": "vit.norm.bias",
}
_TOP = {
    **VIT_KEYS,
    "aggregator_norm.weight": "aggregator.1.weight",
    "aggregator_norm.bias": "aggregator.1.bias",
    "head.weight": "head.weight",
    "head.bias": "head.bias",
}
_STACKS = {"encoder": "vit.blocks", "aggregator": "aggregator.0"}  # aggregator: one block, index 0
_BLOCK_KEY = re.compile(r"^(encoder|aggregator)\.blocks\.(\d+)\.(.+)\.(weight|bias)$")


class AuthorsFormatError(ValueError):
    """A state dict in the authors' GLSim format with tensors this mapping does not know or cannot fill."""


def is_authors_glsim(state: dict) -> bool:
    """Their ViTGLSim's names (with or without the wrapper's `model.` prefix)."""
    keys = {k.removeprefix(PREFIX) for k in state}
    return "patch_embedding.weight" in keys and "encoder.blocks.0.attn.proj_q.weight" in keys


def authors_to_ours(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Their state dict -> GLSimViT names. Returns (ours, their unused keys dropped); an unknown key or an
    incomplete q/k/v triple raises AuthorsFormatError naming every such key."""
    theirs = {k.removeprefix(PREFIX): v for k, v in state.items()}
    ours, dropped, unknown, qkv = {}, [], [], {}
    for key, value in theirs.items():
        if key in UNUSED:
            dropped.append(key)
        elif key in _TOP:
            ours[_TOP[key]] = value
        elif m := _BLOCK_KEY.match(key):
            stack, index, name, kind = m.groups()
            base = f"{_STACKS[stack]}.{index}" if stack == "encoder" else _STACKS[stack]
            if stack == "aggregator" and index != "0":
                unknown.append(key)  # we build one aggregator block, as every released checkpoint has
            elif name in ("attn.proj_q", "attn.proj_k", "attn.proj_v"):
                qkv.setdefault(f"{base}.attn.qkv.{kind}", {})[name[-1]] = value
            elif name in BLOCK_KEYS:
                ours[f"{base}.{BLOCK_KEYS[name]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{key} (only {''.join(sorted(parts))} of q/k/v)")
            continue
        ours[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unknown:
        raise AuthorsFormatError(
            f"{len(unknown)} tensors of the authors' GLSim checkpoint have no counterpart in "
            f"GLSimViT: {sorted(unknown)}"
        )
    return ours, sorted(dropped)


def ours_to_authors(state: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """GLSimViT state dict -> the authors' names (their wrapper's `model.` prefix by default). Their unused
    anchor_class_token is written as zeros so that their strict load_state_dict accepts the result."""
    top = {v: k for k, v in _TOP.items()}
    block = {v: k for k, v in BLOCK_KEYS.items()}
    out, unknown = {}, []
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"^(vit\.blocks\.(\d+)|aggregator\.0)\.(.+)\.(weight|bias)$", key)
        if m is None:
            if not key.startswith(("vit.fc_norm", "vit.head")):  # timm's Identity slots hold no tensors
                unknown.append(key)
            continue
        _, index, name, kind = m.groups()
        base = f"encoder.blocks.{index}" if index is not None else "aggregator.blocks.0"
        if name == "attn.qkv":
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{base}.attn.proj_{part}.{kind}"] = chunk.clone()
        elif name in block:
            out[f"{base}.{block[name]}.{kind}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise AuthorsFormatError(f"GLSimViT tensors without a name in the authors' format: {sorted(unknown)}")
    out["anchor_class_token"] = torch.zeros_like(state["vit.cls_token"])
    return {f"{prefix}{k}": v for k, v in out.items()}


def config_summary(config: object) -> dict:
    """What the checkpoint's `config` (their argparse Namespace) says about the model, for messages and the
    data config: image size, classes, top-k, mean/std choice. Missing entries are left out."""
    fields = (
        "model_name",
        "image_size",
        "num_classes",
        "dynamic_top",
        "dataset_name",
        "custom_mean_std",
        "test_resize_size",
        "layer_norm_eps",
    )
    values = vars(config) if hasattr(config, "__dict__") else (config if isinstance(config, dict) else {})
    return {k: values[k] for k in fields if k in values}
