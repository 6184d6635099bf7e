"""The ILA authors' checkpoints (arkel23/DownSamplingInterLayerAdapter; hub:
NYCU-PCSxNTHU-MIS/DownSamplingInterLayerAdapter) as state dicts of our ILAViT (ila.py), and back.

Their trainer saves `{"config": argparse.Namespace, "epoch", "model": state_dict, "accuracy", "optimizer"}`; the
state dict is that of their wrapper `VisionTransformer`, whose `.model` is their `ViT`, so every key starts with
`model.`. Their names, per tensor, and ours (`vit` is a timm VisionTransformer; B = our block prefix, below):

    patch_embedding.W                              vit.patch_embed.proj.W
    class_token                                    vit.cls_token
    positional_embedding.pos_embedding             vit.pos_embed                    (1, 1 + N, D)
    encoder.blocks.I.attn.proj_{q,k,v}.W           B.attn.qkv.W                     q, k, v stacked (timm's order)
    encoder.blocks.I.proj.W                        B.attn.proj.W
    encoder.blocks.I.norm1.W / norm2.W             B.norm1.W / norm2.W
    encoder.blocks.I.pwff.fc1.W / fc2.W            B.mlp.fc1.W / fc2.W
    encoder.blocks.I.adapter_attn.adapter_down.W   vit.blocks.I[.block].adapter_attn.down.W      ila++ (convpass path)
    encoder.blocks.I.adapter_pwffn.adapter_up.W    vit.blocks.I[.block].adapter_mlp.up.W         (down / up each)
    encoder.ila_ds.K.<ILA>                         vit.blocks.L.ila.<ILA>           L: K-th down-sampling location
    encoder.ila.K.<ILA>                            vit.blocks.L.ila.<ILA>           ila+: L: K-th other block
    encoder_norm.W                                 vit.norm.W
    head.head.W                                    vit.head.W                       their Heads wrapper, classifier cls

    <ILA> (their ILAdapter with --ila_norm1/2/3 bn, --ila_dws_conv_groups 1, --ila_cls_conv, ds_conv dws):
    adapter_down.W / adapter_up.W                  down.W / up.W
    norm1.1.BN / norm3.1.BN                        norm1.BN / norm3.BN              BatchNorm1d between Rearranges
    adapter_conv.0.W                               dwconv.W                         3x3 depthwise, r -> r
    adapter_conv.1.0.BN                            norm2.BN                         BatchNorm2d (+ GELU, no tensors)
    adapter_conv.2.W                               pwconv.W                         1x1, r -> r
    adapter_cls.W                                  cls_conv.W
    ds_conv.weight                                 rsds.weight                      down-sampling ILAs only

W is weight and bias; BN is weight, bias, running_mean, running_var, num_batches_tracked. B is vit.blocks.I, with
`.block` once more for each wrapper our block has: BlockWithILA where an ILA follows block I, AdaptedBlock for ila++.
Variants, as their README's flags give them: `--ila --ila_locs` (no locations) = ila; `--ila` alone (ila_locs -1: every
block without a down-sampling ILA) = ila+; `--adapter adapter --ila --ila_locs` = ila++. A checkpoint without ILA
modules (their frozen `_cls_fz_` baselines) maps to a plain ViT (variant "vit"). Their down-sampling locations
(`--ila_ds_locs`, default 3 7) must be ours (ila.downsample_locations: 3, 7 of 12 blocks).
"""

from __future__ import annotations

import re

import torch

from pipeline.models.glsim_authors import BLOCK_KEYS, VIT_KEYS
from pipeline.models.ila import downsample_locations

PREFIX = "model."  # their wrapper's attribute holding their ViT
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_W = ("weight", "bias")
_TOP = {**VIT_KEYS, "head.head.weight": "vit.head.weight", "head.head.bias": "vit.head.bias"}
_ADAPTER = {"adapter_attn": "adapter_attn", "adapter_pwffn": "adapter_mlp"}
_ADAPTER_PART = {"adapter_down": "down", "adapter_up": "up"}
_ILA = {
    **{f"adapter_down.{w}": f"down.{w}" for w in _W},
    **{f"adapter_up.{w}": f"up.{w}" for w in _W},
    **{f"adapter_conv.0.{w}": f"dwconv.{w}" for w in _W},
    **{f"adapter_conv.2.{w}": f"pwconv.{w}" for w in _W},
    **{f"adapter_cls.{w}": f"cls_conv.{w}" for w in _W},
    "ds_conv.weight": "rsds.weight",
    **{f"norm1.1.{b}": f"norm1.{b}" for b in _BN},
    **{f"adapter_conv.1.0.{b}": f"norm2.{b}" for b in _BN},
    **{f"norm3.1.{b}": f"norm3.{b}" for b in _BN},
}
_BLOCK_KEY = re.compile(r"^encoder\.blocks\.(\d+)\.(.+)\.(weight|bias)$")
_ILA_KEY = re.compile(r"^encoder\.(ila|ila_ds)\.(\d+)\.(.+)$")


class AuthorsFormatError(ValueError):
    """A state dict in the ILA authors' format with tensors this mapping does not know or cannot fill."""


def is_authors_ila(state: dict) -> bool:
    """Their ViT's names (with or without the wrapper's `model.` prefix) with their Heads wrapper (`head.head`) or
    ILA modules; GLSim's checkpoints (same backbone names) have a bare `head` and no ILA."""
    keys = {k.removeprefix(PREFIX) for k in state}
    if "patch_embedding.weight" not in keys or "encoder.blocks.0.attn.proj_q.weight" not in keys:
        return False
    return "head.head.weight" in keys or any(k.startswith(("encoder.ila.", "encoder.ila_ds.")) for k in keys)


def detect_variant(keys: set[str]) -> str:
    """ila / ila+ / ila++ (ila.VARIANTS), or "vit" for their ViT without ILA modules; names without the prefix."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    ds, plain = has("encoder.ila_ds."), has("encoder.ila.")
    adapters = any(".adapter_attn." in k or ".adapter_pwffn." in k for k in keys)
    if not ds:
        if plain or adapters:
            raise AuthorsFormatError(
                "the checkpoint has inter-layer / block adapters but no down-sampling ILA "
                "(encoder.ila_ds.*): not one of ILAViT's variants ila, ila+, ila++"
            )
        return "vit"
    if plain and adapters:
        raise AuthorsFormatError(
            "the checkpoint has both plain ILAs (encoder.ila.*) and block adapters: ILAViT "
            "builds ila+ or ila++, not both"
        )
    return "ila+" if plain else "ila++" if adapters else "ila"


def ila_locations(depth: int, variant: str) -> tuple[list[int], list[int]]:
    """(down-sampling ILA blocks, plain ILA blocks) as ILAViT places them: their ila_ds.K / ila.K in order."""
    if variant == "vit":
        return [], []
    ds = list(downsample_locations(depth))
    return ds, [i for i in range(depth) if i not in ds] if variant == "ila+" else []


def _prefixes(depth: int, variant: str) -> tuple[dict[int, str], dict[int, str]]:
    """Per block: (our prefix of the timm Block's own tensors, our prefix of its ila++ adapters)."""
    ds, plain = ila_locations(depth, variant)
    inner, outer = {}, {}
    for i in range(depth):
        outer[i] = f"vit.blocks.{i}" + (".block" if i in ds or i in plain else "")
        inner[i] = outer[i] + (".block" if variant == "ila++" else "")
    return inner, outer


def authors_to_ours(
    state: dict[str, torch.Tensor], saved_ds_locs: list[int] | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """Their state dict -> ILAViT names (or a plain ViT's `vit.*` for their baselines). Returns (ours, variant); an
    unknown key or an incomplete q/k/v triple raises AuthorsFormatError naming every such key. saved_ds_locs: their
    config's ila_ds_locs, checked against ILAViT's down-sampling blocks."""
    theirs = {k.removeprefix(PREFIX): v for k, v in state.items()}
    variant = detect_variant(set(theirs))
    depth = 1 + max(int(m.group(1)) for k in theirs if (m := _BLOCK_KEY.match(k)))
    if variant != "vit" and saved_ds_locs is not None and list(saved_ds_locs) != list(downsample_locations(depth)):
        raise AuthorsFormatError(
            f"the checkpoint's ila_ds_locs {list(saved_ds_locs)} are not ILAViT's down-sampling "
            f"blocks {list(downsample_locations(depth))} for {depth} blocks"
        )
    inner, outer = _prefixes(depth, variant)
    locations = dict(zip(("ila_ds", "ila"), ila_locations(depth, variant)))
    ours, unknown, qkv = {}, [], {}
    for key, value in theirs.items():
        if key in _TOP:
            ours[_TOP[key]] = value
        elif m := _BLOCK_KEY.match(key):
            index, name, kind = int(m.group(1)), m.group(2), m.group(3)
            adapter, _, part = name.partition(".")
            if name in ("attn.proj_q", "attn.proj_k", "attn.proj_v"):
                qkv.setdefault(f"{inner[index]}.attn.qkv.{kind}", {})[name[-1]] = value
            elif name in BLOCK_KEYS:
                ours[f"{inner[index]}.{BLOCK_KEYS[name]}.{kind}"] = value
            elif adapter in _ADAPTER and part in _ADAPTER_PART and variant == "ila++":
                ours[f"{outer[index]}.{_ADAPTER[adapter]}.{_ADAPTER_PART[part]}.{kind}"] = value
            else:
                unknown.append(key)
        elif (m := _ILA_KEY.match(key)) and m.group(3) in _ILA and int(m.group(2)) < len(locations[m.group(1)]):
            if m.group(1) == "ila" and m.group(3) == "ds_conv.weight":
                unknown.append(key)  # a plain ILA has no down-sampling residual in ILAViT
                continue
            ours[f"vit.blocks.{locations[m.group(1)][int(m.group(2))]}.ila.{_ILA[m.group(3)]}"] = value
        else:
            unknown.append(key)
    ours |= _stack_qkv(qkv, unknown)
    if unknown:
        raise AuthorsFormatError(
            f"{len(unknown)} tensors of the authors' ILA checkpoint ({variant}) have no "
            f"counterpart in ILAViT: {sorted(unknown)}"
        )
    return ours, variant


def _stack_qkv(qkv: dict[str, dict[str, torch.Tensor]], unknown: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown.append(f"{key} (only {''.join(sorted(parts))} of q/k/v)")
        else:
            out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def our_variant(state: dict) -> str:
    """ila / ila+ / ila++ / "vit" of an ILAViT state dict: ila+ has more ILAs than the two down-sampling ones."""
    with_ila = {k.split(".")[2] for k in state if re.match(r"^vit\.blocks\.\d+\.ila\.", k)}
    if any(".adapter_attn." in k for k in state):
        return "ila++"
    return "ila+" if len(with_ila) > 2 else "ila" if with_ila else "vit"


def ours_to_authors(state: dict[str, torch.Tensor], prefix: str = PREFIX) -> dict[str, torch.Tensor]:
    """ILAViT state dict -> the authors' names (their wrapper's `model.` prefix by default)."""
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("vit.blocks."))
    ds, plain = ila_locations(depth, our_variant(state))
    top = {v: k for k, v in _TOP.items()}
    out, unknown = {}, []
    for key, value in state.items():
        m = re.match(r"^vit\.blocks\.(\d+)\.(?:block\.)*(.+)$", key)
        if key in top:
            out[top[key]] = value
        elif m is not None and (named := _their_block_tensors(int(m.group(1)), m.group(2), value, ds, plain)):
            out |= named
        elif not key.startswith("vit.fc_norm"):  # timm's Identity slots hold no tensors
            unknown.append(key)
    if unknown:
        raise AuthorsFormatError(f"ILAViT tensors without a name in the authors' format: {sorted(unknown)}")
    return {f"{prefix}{k}": v for k, v in out.items()}


_OUR_ILA = {v: k for k, v in _ILA.items()}
_OUR_BLOCK = {v: k for k, v in BLOCK_KEYS.items()}
_OUR_ADAPTER = {
    f"{ours}.{p_ours}.{w}": f"{theirs}.{p_theirs}.{w}"
    for theirs, ours in _ADAPTER.items()
    for p_theirs, p_ours in _ADAPTER_PART.items()
    for w in _W
}


def _their_block_tensors(
    i: int, rest: str, value: torch.Tensor, ds: list[int], plain: list[int]
) -> dict[str, torch.Tensor]:
    """Their name(s) of our tensor `rest` of block i (wrappers' `.block.` removed); {} when it has none."""
    if rest.startswith("ila."):
        where = f"ila_ds.{ds.index(i)}" if i in ds else f"ila.{plain.index(i)}" if i in plain else None
        name = _OUR_ILA.get(rest.removeprefix("ila."))
        return {f"encoder.{where}.{name}": value} if where and name else {}
    if rest in _OUR_ADAPTER:
        return {f"encoder.blocks.{i}.{_OUR_ADAPTER[rest]}": value}
    module, _, kind = rest.rpartition(".")
    if module == "attn.qkv":
        return {f"encoder.blocks.{i}.attn.proj_{p}.{kind}": c.clone() for p, c in zip("qkv", value.chunk(3, dim=0))}
    return {f"encoder.blocks.{i}.{_OUR_BLOCK[module]}.{kind}": value} if module in _OUR_BLOCK else {}


def config_summary(config: object) -> dict:
    """What the checkpoint's `config` (their argparse Namespace) says about the model and its data: image size,
    classes, mean/std choice, test resize, where the ILAs sit. Missing entries are left out."""
    fields = (
        "model_name",
        "image_size",
        "num_classes",
        "dataset_name",
        "custom_mean_std",
        "test_resize_size",
        "layer_norm_eps",
        "ila_ds_locs",
        "ila_locs",
        "adapter",
        "adapter_dim",
    )
    values = vars(config) if hasattr(config, "__dict__") else (config if isinstance(config, dict) else {})
    return {k: values[k] for k in fields if k in values}
