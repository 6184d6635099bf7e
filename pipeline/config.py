"""Typed, frozen parameters loaded from params.yaml.

One section per stage plus `base`, as in DVC's example-get-started. Every stage loads and validates the whole file
before doing any work, so a typo anywhere fails fast with one message naming the key and the reason.
"""

from __future__ import annotations

import functools
import re
import typing
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline import dvcparams
from pipeline.tuning import space as tune_space

PositiveInt = Annotated[int, Field(ge=1)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@functools.cache
def _tuple_fields(model: type[BaseModel]) -> frozenset[str]:
    """Names of the fields of `model` whose type is a tuple (or an optional tuple)."""
    names = set()
    for name, info in model.model_fields.items():
        types = (info.annotation, *typing.get_args(info.annotation))
        if any(t is tuple or typing.get_origin(t) is tuple for t in types):
            names.add(name)
    return frozenset(names)


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or invalid. The message names every bad key and why."""


class _Section(BaseModel):
    # Unknown keys are errors (a misspelt knob must not be silently ignored); configs are immutable once loaded.
    # Strict types: `epochs: '15'` or `epochs: yes` is an error, never a number (an int is still a valid float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, data: object) -> object:
        """YAML has lists, not tuples: a list is the form a tuple-typed key is written in (its items stay strict)."""
        if not isinstance(data, dict):
            return data
        return {k: tuple(v) if isinstance(v, list) and k in _tuple_fields(cls) else v for k, v in data.items()}


class BaseParams(_Section):
    seed: NonNegInt = 42  # seeds Python, NumPy and torch; splits and training derive from it
    data_root: str = "data"  # folder (relative to the project) that holds the stages' data outputs
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto picks CUDA when available
    threads: PositiveInt = 2  # torch intra-op threads on CPU
    mlflow_dir: str = "mlflow"  # SQLite store + artifacts, relative to the project, unless MLFLOW_TRACKING_URI
    experiment: str = "anime-fgvc"  # MLflow experiment name

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {v!r}")
        return v


class EmbeddedSource(_Section):
    path: str = "datasets/emoji"  # committed copy of the cross-artist emoji set (see datasets/emoji/ATTRIBUTION.md)
    categories: tuple[str, ...] = ("Smileys & Emotion", "People & Body")  # emoji categories kept as classes
    styles: tuple[str, ...] = ("noto", "twemoji", "openmoji", "emojione")  # artists kept (the group column)


class FolderSource(_Section):
    path: str | None = None  # ImageFolder layout: <path>/<class name>/<image>


class CsvSource(_Section):
    path: str | None = None  # image root that the CSVs' `dir` column is relative to
    labels: str | None = None  # folder with train.csv/val.csv/test.csv (`class_id,dir`, no header); default <path>/labels
    class_names: str | None = None  # optional `id,name` CSV; default <labels>/classid_classname.csv if present
    dataset: str | None = None  # optional registry name (pipeline/data/registry.py): checks the class count
    shard_size: PositiveInt | None = None  # images per tar shard (pipeline/data/images.py); null: plain files


class DafreSource(_Section):
    path: str | None = None  # unpacked DAF:re release: faces/ or fullMin256/ plus labels/
    images: Literal["faces", "fullMin256"] = "faces"  # which image folder of the release to import
    shard_size: PositiveInt | None = 2048  # images per tar shard (pipeline/data/images.py); null: plain files


class DanbooruSource(_Section):
    base_url: str = "https://danbooru.donmai.us"  # API host; only http(s)
    cdn_hosts: tuple[str, ...] = ("cdn.donmai.us",)  # hosts images may be downloaded from, besides the API host
    characters: tuple[str, ...] = ()  # character tags to crawl; empty: the top_characters by post count
    top_characters: NonNegInt = 0  # with characters empty: crawl the N character tags with most posts
    max_posts_per_character: PositiveInt = 200  # stop paging a character after this many kept posts
    ratings: tuple[Literal["g", "s", "q", "e"], ...] = ("g", "s")  # keep posts with these ratings
    exclude_tags: tuple[str, ...] = ()  # drop posts carrying any of these tags
    single_character: bool = True  # DAF:re rule: keep posts tagged with exactly one character
    file: Literal["large", "original"] = "large"  # large_file_url (smaller, jpg/webp) or file_url (original)
    page_limit: Annotated[int, Field(ge=1, le=200)] = 200  # posts per API page (the API caps it at 200)
    requests_per_second: Annotated[float, Field(gt=0)] = 2.0  # polite rate across all connections
    max_connections: Annotated[int, Field(ge=1, le=16)] = 2  # concurrent downloads
    timeout_s: Annotated[float, Field(gt=0)] = 30.0  # per request (connect + read)
    max_retries: NonNegInt = 5  # retries of 429/5xx/timeouts/truncated bodies before a clear error
    max_retry_after_s: Annotated[float, Field(gt=0)] = 600.0  # a longer Retry-After fails the request (run again
    # later: the crawl resumes) instead of sleeping as long as the server says
    backoff_s: Annotated[float, Field(gt=0)] = 1.0  # first backoff; doubles each retry, with jitter
    max_file_mb: Annotated[float, Field(gt=0)] = 50.0  # larger files are skipped
    credentials_file: str = ".danbooru-credentials"  # git-ignored `login=...`/`api_key=...` file (env vars win)

    @field_validator("base_url")
    @classmethod
    def _http_origin(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if parts.username or parts.password:  # checked first: the URL holds a secret, so it is never echoed
            raise ValueError("must not contain a login; use DANBOORU_LOGIN/DANBOORU_API_KEY or "
                             "acquire.danbooru.credentials_file")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{v!r} is not an http(s) URL (expected e.g. https://danbooru.donmai.us)")
        if parts.query or parts.fragment:
            raise ValueError(f"{v!r} must not have a query or fragment")
        return v


class AcquireParams(_Section):
    source: Literal["embedded", "folder", "csv", "dafre", "danbooru"] = "embedded"  # which source fills data/raw
    embedded: EmbeddedSource = EmbeddedSource()
    folder: FolderSource = FolderSource()
    csv: CsvSource = CsvSource()
    dafre: DafreSource = DafreSource()
    danbooru: DanbooruSource = DanbooruSource()


class FacesParams(_Section):
    enabled: bool = False  # crop anime faces (animeface); off: images pass through unchanged (hard links)
    threshold: Fraction = 0.85  # keep detections with at least this confidence (DAF:re: 0.85)
    margin: Annotated[float, Field(ge=0)] = 0.25  # grow the box by this fraction of its size on each side
    one_face_only: bool = True  # DAF:re rule: images with several confident faces are dropped
    no_face: Literal["drop", "keep"] = "drop"  # images without a confident face: drop (recorded) or keep whole
    max_side: PositiveInt | None = 1024  # downscale before detection for speed (boxes are mapped back)


class CleanParams(_Section):
    min_per_class: PositiveInt = 4  # classes with fewer clean images are dropped (DAF:re used 20)
    max_per_class: PositiveInt | None = None  # optional cap (first N in manifest order)
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels are composited on this (DAF:re: white)
    max_image_pixels: PositiveInt = 89_478_485  # larger images are quarantined (decompression-bomb guard)
    resize_short_side: PositiveInt | None = None  # optional downscale so training reads small files (DAF:re Full: 256)
    reencode: Literal["png", "jpeg"] = "png"  # format of converted/resized images (RGB input is copied byte for byte)
    jpeg_quality: Annotated[int, Field(ge=1, le=100)] = 95  # used when reencode is jpeg
    normalize_class_names: bool = False  # NFKC, trim, lower case, runs of spaces/underscores -> '_'; equal names merge
    near_dup_hamming: Annotated[int, Field(ge=0, le=16)] = 0  # pHash bits; 0: off (see pipeline/data/clean.py why)
    near_dup_action: Literal["drop", "group"] = "group"  # drop: keep the first; group: keep all, share a dup_group
    shard_size: PositiveInt | None = 2048  # images per output tar shard when the input is sharded; null: plain files
    workers: PositiveInt = 2  # decode processes (results do not depend on it)

    @field_validator("max_per_class")
    @classmethod
    def _max(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v < info.data.get("min_per_class", 1):
            raise ValueError(f"{v} is below clean.min_per_class={info.data['min_per_class']}: every class would go")
        return v

    @field_validator("background")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in v):
            raise ValueError(f"each channel must be in 0..255, got {list(v)}")
        return v


class SplitRatios(_Section):
    train: Fraction = 0.7  # DAF:re: first int(0.7 n) of each class
    val: Fraction = 0.1  # DAF:re: up to int(0.8 n)
    test: Fraction = 0.2  # the rest

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class SplitParams(_Section):
    # per_class: DAF:re rule; group: hold out whole groups; official: keep the source's split column (DAF:re, CUB)
    strategy: Literal["official", "per_class", "group"] = "group"
    ratios: SplitRatios = SplitRatios()  # used by per_class and by group with group_assign: ratio
    shuffle: bool = False  # per_class: seeded shuffle inside each class first (DAF:re: manifest order)
    group_column: str = "group"  # group: manifest column whose values are held out (artist, post, dup_group, ...)
    group_assign: Literal["listed", "ratio"] = "listed"  # group: test/val_groups below, or seeded groups by ratios
    test_groups: tuple[str, ...] = ("twemoji",)  # group + listed: these groups form the test set (unseen artist)
    val_groups: tuple[str, ...] = ("emojione",)  # group + listed: these groups form the validation set

    # Field validators (not model validators) so that errors name the exact dotted key.
    @field_validator("test_groups")
    @classmethod
    def _test_groups(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if info.data.get("strategy") == "group" and info.data.get("group_assign") == "listed" and not v:
            raise ValueError("must name at least one group for strategy 'group' (or set split.group_assign: ratio)")
        return v

    @field_validator("val_groups")
    @classmethod
    def _val_groups(cls, v: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        both = set(v) & set(info.data.get("test_groups", ()))
        if both:
            raise ValueError(f"groups {sorted(both)} are also in split.test_groups")
        return v


# Paper training recipes for `train.recipe` (reference-methods.md A.4, A.5, C.2 and C.6, checked against the authors'
# code). Precision is left to the user (the papers use fp16 AMP, which needs CUDA), and so are method and img_size
# (224 or 448 in the papers). The model is the papers' original Google ImageNet-21k ViT-B/16 (timm's `orig_in21k`
# tag; the bare name would resolve to timm's default augreg2_in21k_ft_in1k weights).
PAPER_MODEL = "vit_base_patch16_224.orig_in21k"
# Architectures whose original Google ImageNet-21k weights timm tags `orig_in21k` (timm.list_pretrained
# ("*.orig_in21k") of the pinned timm): under a recipe their bare name gets the tag.
ORIG_IN21K = frozenset({"vit_base_patch16_224", "vit_base_patch32_224", "vit_base_r50_s16_224",
                        "vit_large_patch16_224", "vit_large_patch32_224", "vit_huge_patch14_224"})
_PAPER_TRAINER = dict(model=PAPER_MODEL, weights="hub",  # or file:ViT-B_16.npz, the original Google release
                      optimizer="sgd",  # timm "sgd": SGD with Nesterov momentum 0.9
                      weight_decay=0.0, batch_size=8, epochs=50, warmup_steps=500, min_lr=1.0e-5, grad_clip=1.0,
                      resize_ratio=1.34, hflip=0.5,
                      layer_norm_eps=1.0e-12,  # the authors' ViT (timm's: 1e-6)
                      init="paper",  # Xavier-uniform weights, N(0, 1e-6) biases for the new layers
                      drop_path_rule="constant")  # the authors' DropPath(sd) has one rate in every block
RECIPES: dict[str, dict] = {
    # GLSim README command: lr 0.01, medaugs = flip + TrivialAugmentWide + random erasing 0.3 + LS 0.1 + SD 0.1.
    # With stochastic depth on, the authors' blocks use DropPath *instead of* their hidden dropout: no dropout.
    "glsim": {**_PAPER_TRAINER, "lr": 0.01, "augment": "med", "label_smoothing": 0.1, "drop_path_rate": 0.1,
              "proj_drop_rate": 0.0},
    # ILA README commands: frozen backbone, lr 0.1, weakaugs = flip only (no label smoothing, no stochastic depth),
    # so the blocks keep hidden_dropout_prob 0.1, also in the frozen backbone while training
    "ila": {**_PAPER_TRAINER, "lr": 0.1, "augment": "weak", "label_smoothing": 0.0, "drop_path_rate": 0.0,
            "proj_drop_rate": 0.1},
}


class TrainParams(_Section):
    # cnn/vit: full fine-tune; linear: frozen backbone + head; glsim/ila: pipeline/models/glsim.py, ila.py
    method: Literal["cnn", "linear", "vit", "glsim", "ila"] = "cnn"
    model: str = "tf_efficientnet_lite0"  # any timm model name
    patch_size: PositiveInt | None = None  # ViT patch size (timm resamples pretrained embeddings); null: from the name
    backbone_cnn: str | None = None  # hybrid ViT: this timm CNN's stage at stride patch_size is the patch embedding
    weights: str = "package:efficientnet_lite0"  # none|hub|hf-hub:ID|local-dir:DIR|file:PATH|package:... (weights.py)
    img_size: PositiveInt = 96  # training/eval resolution (square)
    glsim_top_k: PositiveInt | None = None  # glsim: patches selected by similarity; null: 8, 16 for dogs (GLSim repo)
    glsim_box: Literal["paper", "corrected"] = "paper"  # glsim crop end: paper max_index*P (as published) or (max+1)*P
    ila_variant: Literal["ila", "ila+", "ila++"] = "ila"  # ila: 2 down-sampling ILAs; +: plain ILAs; ++: adapters
    epochs: PositiveInt = 15  # full passes over the train split
    batch_size: PositiveInt = 32  # images per optimiser step
    optimizer: str = "adamw"  # any timm optimizer name (create_optimizer_v2)
    lr: Annotated[float, Field(gt=0)] = 1.0e-3  # peak learning rate
    weight_decay: Annotated[float, Field(ge=0)] = 0.05  # decoupled weight decay (AdamW)
    warmup_epochs: NonNegInt = 1  # linear warm-up before the cosine decay (stepped per iteration)
    min_lr: Annotated[float, Field(ge=0)] = 1.0e-5  # floor of the cosine schedule
    label_smoothing: Fraction = 0.1  # cross-entropy label smoothing
    hflip: Fraction = 0.0  # horizontal-flip probability (0 for emoji: 'pointing left' != 'pointing right')
    scale_min: Annotated[float, Field(gt=0, le=1)] = 0.6  # RandomResizedCrop lower area bound
    color_jitter: Fraction = 0.4  # probability of brightness/contrast/saturation/hue jitter (artists differ)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype; fp16 only on CUDA
    num_workers: NonNegInt = 0  # DataLoader workers (0 is fastest for small images on 2 cores)
    resume: bool = True  # continue a killed run from checkpoint_dir/<run key>/last.pt (same params + data only)
    checkpoint_dir: str = "checkpoints"  # per-epoch resumable state, outside DVC outputs; removed when a run ends
    recipe: Literal["glsim", "ila"] | None = None  # paper preset (RECIPES); keys written in params.yaml win over it
    augment: Literal["rrc", "weak", "med"] = "rrc"  # rrc: crop+jitter above; weak/med: GLSim weakaugs/medaugs
    resize_ratio: Annotated[float, Field(ge=1.0)] = 1.34  # weak/med: resize to img_size*ratio, random/centre crop
    drop_path_rate: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # stochastic depth (see drop_path_rule)
    drop_path_rule: Literal["linear", "constant"] = "linear"  # linear: timm's 0 .. rate over the blocks; constant:
    # the rate in every block (GLSim/ILA code), ViTs only. GLSim's aggregator block always gets the rate itself
    proj_drop_rate: Fraction = 0.0  # ViT: dropout on each block's attention and MLP outputs (authors: 0.1 w/o SD)
    layer_norm_eps: Annotated[float, Field(gt=0)] | None = None  # ViT LayerNorm eps; null: the model's (timm: 1e-6)
    init: Literal["timm", "paper"] = "timm"  # new glsim/ila layers: timm/PyTorch init, or the authors' Xavier-uniform
    grad_clip: Annotated[float, Field(gt=0)] | None = None  # max L2 norm of all gradients; null: no clipping
    warmup_steps: NonNegInt | None = None  # warm-up in optimiser steps (GLSim: 500); null: warmup_epochs
    sync_bn: bool = False  # data-parallel runs on CUDA: synchronise BatchNorm statistics across processes
    compile: bool = False  # torch.compile the training forward (pays off on CUDA for long runs; compiles first)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: object) -> object:
        """A recipe fills the keys params.yaml leaves out; every key written there (even null) wins."""
        if isinstance(data, dict) and isinstance(data.get("recipe"), str) and data["recipe"] in RECIPES:
            return pin_paper_weights({**RECIPES[data["recipe"]], **data})
        return data

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v == "ila" and info.data.get("method") not in ("ila", "linear"):
            raise ValueError("'ila' trains a frozen backbone: set train.method to ila or linear")
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        hub_id = r"hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?"  # ORG/NAME[@REVISION], as timm's hf-hub: names
        if not re.fullmatch(rf"none|hub|{hub_id}|local-dir:.+|file:.+|package:efficientnet_lite0", v):
            raise ValueError("must be none, hub, hf-hub:ORG/NAME, local-dir:PATH, file:PATH or "
                             f"package:efficientnet_lite0, got {v!r}")
        return v

    @field_validator("patch_size", "backbone_cnn")
    @classmethod
    def _vit_only(cls, v: object, info: ValidationInfo) -> object:
        if v is not None and info.data.get("method") == "cnn":
            raise ValueError("applies to ViT models (method vit, linear, glsim or ila), not method cnn")
        return v

    @field_validator("img_size")
    @classmethod
    def _img_size(cls, v: int, info: ValidationInfo) -> int:
        name = re.search(r"patch(\d+)", info.data.get("model", ""))
        patch = info.data.get("patch_size") or (int(name.group(1)) if name else None)
        if patch and v % patch:
            raise ValueError(f"{v} is not divisible by the patch size {patch} of {info.data['model']}")
        return v


class EvaluateParams(_Section):
    batch_size: PositiveInt = 64  # images per forward pass
    top_k: PositiveInt = 5  # the k of top-k accuracy
    # Long-tail groups by TRAINING images per class (ImageNet-LT many/medium/few-shot convention; see metrics.py):
    head_above: NonNegInt = 100  # classes with more than this many training images are "head"
    tail_below: NonNegInt = 20  # classes with fewer than this many training images are "tail"; the rest "medium"
    confused_pairs: NonNegInt = 20  # the N most frequent (actual, predicted) mistakes written to confused_pairs.csv
    sample_images: NonNegInt = 6  # seeded test images kept with predictions (+ GLSim selection) for the report

    @field_validator("tail_below")
    @classmethod
    def _tail_below(cls, v: int, info: ValidationInfo) -> int:
        head = info.data.get("head_above")
        if head is not None and v > head + 1:
            raise ValueError(f"{v} is above evaluate.head_above + 1 = {head + 1}: a class would be head and tail")
        return v


class ReportParams(_Section):
    grid_classes: PositiveInt = 8  # classes shown in the sample grid (one row per class, one column per split)
    confused_examples: NonNegInt = 4  # per variant: the most frequent mistakes shown with example images


def _keyed_errors(errors: list[tuple[tuple, str]], value) -> ValidationError:
    """A ValidationError whose locations go below the field (e.g. tune.space.lr), so messages name the exact key."""
    return ValidationError.from_exception_data("params", [
        InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=loc, input=value) for loc, msg in errors])


class TuneResources(_Section):
    cpu: Annotated[float, Field(gt=0)] = 1.0  # CPUs reserved per trial; its torch threads: this, rounded down (min 1)
    gpu: Annotated[float, Field(ge=0)] = 0.0  # GPUs per trial (0.5: two trials share one); 0: trials train on the CPU


def _default_space() -> dict[str, list]:
    return {"lr": ["loguniform", 3.0e-4, 3.0e-3], "label_smoothing": ["choice", 0.0, 0.1]}


class TuneParams(_Section):
    apply: bool = False  # train stage: train with best_params.yaml's values for the searched keys
    space: dict[str, object] = Field(default_factory=_default_space)  # train key: [distribution, args]; tuning/space.py
    num_samples: PositiveInt = 4  # trials sampled from the space (per combination of grid values)
    epochs: PositiveInt = 2  # per-trial budget (ASHA max_t); replaces train.epochs inside the sweep
    metric: Literal["val_top1", "val_top5", "val_loss", "train_top1", "train_loss"] = "val_top1"  # per-epoch score
    mode: Literal["max", "min"] = "max"  # whether a higher or a lower metric is better
    scheduler: Literal["asha", "median", "fifo"] = "asha"  # early stopping: ASHA, median stopping rule, none (fifo)
    grace_period: PositiveInt = 1  # asha/median: epochs every trial trains before it may be stopped
    reduction_factor: Annotated[int, Field(ge=2)] = 2  # asha: one trial in reduction_factor goes on at each rung
    search: Literal["random", "optuna", "hyperopt"] = "random"  # random: Ray's sampler; others need their package
    seed: NonNegInt | None = None  # seed of the search algorithm; null: base.seed
    resources: TuneResources = TuneResources()  # reserved per trial (Ray schedules trials by them)
    max_concurrent: PositiveInt | None = None  # trials at once; null: as many as the resources allow
    max_failures: NonNegInt = 1  # retries of a crashed trial before it is recorded as failed (the sweep goes on)
    results_dir: str = ".ray_results"  # Ray's experiments (resume state, trial outputs), relative to the project

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, object]) -> dict[str, object]:
        if not v:
            raise ValueError("must name at least one train key to search, e.g. {lr: [loguniform, 1.0e-4, 1.0e-2]}")
        errors = []
        for key, spec in v.items():
            try:
                if key.startswith("train."):
                    raise ValueError(f"write {key.removeprefix('train.')!r}: every key of tune.space is a train key")
                tune_space.check_key(key, set(TrainParams.model_fields))
                tune_space.parse(spec)
            except ValueError as exc:
                errors.append(((key,), str(exc)))
        if errors:
            raise _keyed_errors(errors, v)
        return v

    @field_validator("mode")
    @classmethod
    def _mode(cls, v: str, info: ValidationInfo) -> str:
        metric = info.data.get("metric", "")
        if v != ("min" if metric.endswith("_loss") else "max"):
            raise ValueError(f"{v} does not fit tune.metric={metric} (losses: min, accuracies: max)")
        return v

    @field_validator("grace_period")
    @classmethod
    def _grace(cls, v: int, info: ValidationInfo) -> int:
        if "epochs" in info.data and v > info.data["epochs"]:
            raise ValueError(f"{v} is above tune.epochs={info.data['epochs']}: no trial could ever be stopped")
        return v

    @field_validator("search")
    @classmethod
    def _search(cls, v: str, info: ValidationInfo) -> str:
        import importlib.util

        if v != "random" and importlib.util.find_spec(v) is None:
            raise ValueError(f"{v} needs the {v} package (pip install {v}), or use random")
        if v != "random" and tune_space.has_grid(info.data.get("space") or {}):
            raise ValueError(f"{v} cannot search a grid entry of tune.space: use choice, or search: random")
        return v


def pin_paper_weights(train: dict) -> dict:
    """Under a recipe, a bare ViT name that timm also has as `orig_in21k` gets that tag (the papers' weights); a
    name with a tag of its own (`vit_base_patch16_224.augreg2_in21k_ft_in1k`) is kept as written."""
    model = train.get("model")
    if isinstance(model, str) and "." not in model and model in ORIG_IN21K:
        return {**train, "model": f"{model}.orig_in21k"}
    return train


VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # used in paths, DVC stage names and `-S variants.<name>.*`


class PretrainParams(_Section):
    """`python -m pipeline pretrain` / the pretrain stage: distil the offline CNN into a ViT (pipeline/pretrain)."""

    teacher: Literal["tf_efficientnet_lite0"] = "tf_efficientnet_lite0"  # the CNN with offline ImageNet weights
    student: str = "vit_tiny_patch16_224"  # timm ViT name (one CLS token); built at img_size with a 1000-way head
    patch_size: PositiveInt | None = None  # null: from the name; tokens regress the teacher map at this stride
    img_size: PositiveInt = 96  # distillation resolution (the train default, so GLSim's grid is the same)
    min_grid: PositiveInt = 6  # smallest token grid side accepted (GLSim needs room to crop)
    sources: tuple[Literal["openclipart", "emoji"], ...] = ("openclipart", "emoji")  # unlabeled image groups
    sources_dir: str = "pretrain_sources"  # under base.data_root; filled by tools/fetch_pretrain_sources.sh
    exclude_categories: tuple[str, ...] = ("Smileys & Emotion", "People & Body")  # emoji categories never used
    exclude_dataset: str = "datasets/emoji"  # no code point of this dataset's index.csv enters the pool
    pool_px: PositiveInt = 112  # side of the white square every pool image is fitted onto (then cropped)
    steps: PositiveInt = 2200  # optimiser steps (the loss curve and card report them)
    batch_size: PositiveInt = 64  # images per step
    lr: Annotated[float, Field(gt=0)] = 1.0e-3  # AdamW peak learning rate
    weight_decay: Annotated[float, Field(ge=0)] = 0.05  # AdamW decoupled weight decay
    warmup_steps: NonNegInt = 150  # linear warm-up before the cosine decay
    min_lr: Annotated[float, Field(ge=0)] = 1.0e-5  # floor of the cosine schedule
    scale_min: Annotated[float, Field(gt=0, le=1)] = 0.25  # RandomResizedCrop lower area bound (heavy)
    mixup: Fraction = 0.5  # share of batches mixed with their reverse (both networks see the mix)
    w_tokens: Annotated[float, Field(ge=0)] = 1.0  # weight: patch tokens -> teacher map at the patch stride
    w_deep: Annotated[float, Field(ge=0)] = 1.0  # weight: pooled patch tokens -> teacher head map
    w_cls: Annotated[float, Field(ge=0)] = 1.0  # weight: CLS -> teacher pooled head features
    w_logits: Annotated[float, Field(ge=0)] = 1.0  # weight: KL to the teacher's ImageNet logits
    temperature: Annotated[float, Field(gt=0)] = 1.0  # logits KD temperature
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast dtype of both forwards (bf16 steps: 2.4x faster on CPU)
    checkpoint_every: PositiveInt = 50  # steps between atomic resumable states (work folder last.pt)
    log_every: PositiveInt = 10  # steps averaged into one loss-curve row
    name: str = "vit_tiny_distilled"  # weights/<name>.safetensors, .md (card), .provenance.csv, .loss.csv/.png


def variant_train(train: TrainParams, overrides: dict) -> dict:
    """The train keys of one variant: `train` (already tuned, if tune.apply), then the variant's recipe, if it names
    one, then its own keys. Unlike train.recipe (which fills only keys params.yaml leaves out), a variant's recipe
    replaces the train section's values, so `variants.x: {recipe: glsim}` is a paper recipe run."""
    recipe = overrides.get("recipe")
    if not isinstance(recipe, str) or recipe not in RECIPES:
        return {**train.model_dump(), **overrides}
    return pin_paper_weights({**train.model_dump(), **RECIPES[recipe], **overrides})


class Params(_Section):
    base: BaseParams = BaseParams()
    acquire: AcquireParams = AcquireParams()
    faces: FacesParams = FacesParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    train: TrainParams = TrainParams()
    # The models `dvc repro` trains and the report compares (dvc.yaml foreach): name -> the train keys that differ
    # from the train section. An empty mapping trains the train section as written.
    variants: dict[str, dict[str, object]] = Field(default_factory=lambda: {"cnn": {}})
    evaluate: EvaluateParams = EvaluateParams()
    report: ReportParams = ReportParams()
    tune: TuneParams = TuneParams()  # after train: its values are checked against the train section
    pretrain: PretrainParams = PretrainParams()

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict[str, dict], info: ValidationInfo) -> dict[str, dict]:
        """Every variant must give a valid train section; errors name variants.<name>.<key>."""
        if not v:
            raise ValueError("must name at least one model to train, e.g. {cnn: {}}")
        train = info.data.get("train")
        bad_names = [((name,), "a variant name is letters, digits, '_' and '-' (it names folders and DVC stages)")
                     for name in v if not VARIANT_NAME.fullmatch(name)]
        if bad_names:
            raise _keyed_errors(bad_names, v)
        nested: list[InitErrorDetails] = []
        for name, overrides in v.items():
            if train is None:  # the train section is invalid itself: that error is reported on its own
                break
            try:
                TrainParams.model_validate(variant_train(train, overrides))
            except ValidationError as exc:  # re-raised under variants.<name>, with their own kinds and messages
                nested += [InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"],
                                            ctx=e.get("ctx", {})) for e in exc.errors()]
        if nested:
            raise ValidationError.from_exception_data("params", nested)
        return v

    def with_variant(self, name: str) -> Params:
        """These params with the train section of variant `name` (what the train stage trains for it)."""
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant in params.yaml (have {', '.join(self.variants)})")
        train = validate_section(TrainParams, variant_train(self.train, self.variants[name]), "params.yaml",
                                 prefix=f"variants.{name}.")
        return self.model_copy(update={"train": train})

    @field_validator("tune")
    @classmethod
    def _tune_values(cls, v: TuneParams, info: ValidationInfo) -> TuneParams:
        """Every value a trial may get must be valid for the train section as configured (model, img_size, ...)."""
        train = info.data.get("train")
        if train is None:  # the train section is invalid itself: that error is reported on its own
            return v
        errors = []
        for key, spec in v.space.items():
            name, args = tune_space.parse(spec)
            for value in tune_space.probe_values(name, args):
                try:
                    TrainParams.model_validate({**train.model_dump(), key: value})
                except ValidationError as exc:
                    err = exc.errors()[0]
                    where = ".".join(str(p) for p in err["loc"])
                    reason = err["msg"].removeprefix("Value error, ")
                    errors.append((("space", key), f"{value!r} gives an invalid train.{where}: {reason}"))
                    break
        if errors:
            raise _keyed_errors(errors, v.space)
        return v


def validate_section(model: type[BaseModel], data: dict, source: str, prefix: str = ""):
    """Validate one section (e.g. built from command-line flags) with the same messages as params.yaml gets.

    Never str(ValidationError): pydantic echoes the input there, which may hold a secret (a login in a URL)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, source, prefix)) from None


def _format_errors(err: ValidationError, source: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = prefix + ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (misspelt? see the defaults in pipeline/config.py)"
        elif e["type"] != "value_error" and "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
            if isinstance(e["input"], bool):  # yes/no/on/off/true/false are YAML booleans, never numbers or text
                msg += "; YAML reads yes/no/on/off/true/false (unquoted) as a boolean: write the value itself"
            if isinstance(e["input"], str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", e["input"]):
                mantissa, exp = re.split("[eE]", e["input"])
                msg += f"; YAML reads {e['input']} as text: write {mantissa}.0e{exp}"
        lines.append(f"  - {key}: {msg}")
    return f"invalid parameters in {source}:\n" + "\n".join(lines)


def not_a_folder(root: Path, path: str) -> str:
    """Why `path` (relative to root) is no folder: missing, or a file (`--path /etc/hostname`)."""
    return f"{path!r} is a file, not a folder" if (root / path).exists() else f"folder {path!r} does not exist"


def _check_paths(params: Params, root: Path) -> list[str]:
    """Paths that the chosen settings need must exist: checked here, before any stage starts work."""
    errors = []
    acq = params.acquire
    if acq.source == "embedded" and not (root / acq.embedded.path).is_dir():
        errors.append(f"  - acquire.embedded.path: folder {acq.embedded.path!r} does not exist")
    if acq.source == "folder":
        if acq.folder.path is None:
            errors.append("  - acquire.folder.path: required when acquire.source is 'folder'")
        elif not (root / acq.folder.path).is_dir():
            errors.append(f"  - acquire.folder.path: {not_a_folder(root, acq.folder.path)}")
    for name in ("csv", "dafre"):
        section = getattr(acq, name)
        if acq.source == name:
            if section.path is None:
                errors.append(f"  - acquire.{name}.path: required when acquire.source is '{name}'")
            elif not (root / section.path).is_dir():
                errors.append(f"  - acquire.{name}.path: {not_a_folder(root, section.path)}")
    if params.train.weights.startswith("file:"):
        wfile = params.train.weights.removeprefix("file:")
        if not (root / wfile).is_file():
            errors.append(f"  - train.weights: file {wfile!r} does not exist")
    if params.train.weights.startswith("local-dir:"):
        wdir = params.train.weights.removeprefix("local-dir:")
        if not (root / wdir).is_dir():
            errors.append(f"  - train.weights: folder {wdir!r} does not exist")
    return errors


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent floats as YAML 1.2 (and so DVC, through ruamel) does: `1e-3` and
    `1.0e3` are numbers. PyYAML's YAML 1.1 reads them as text: DVC then saw an unchanged 0.001 while the stage refused
    '1e-3' (a forced `dvc repro -s` lost the stage's outputs to that disagreement)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def read_raw(path: str | Path) -> dict:
    """params.yaml as a plain dict (ParamsError if it is missing, not YAML or not a mapping); not validated."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file {str(path)!r} does not exist")
    try:
        raw = yaml.load(path.read_text(), Loader=_ParamsLoader) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Load and validate params.yaml; relative paths in it are resolved against the file's folder.

    Raises ParamsError listing every schema problem (key + reason) without touching any output; paths are checked
    once the schema is valid.
    """
    path = Path(path)
    raw = read_raw(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_errors(exc, str(path))) from None
    path_errors = _check_paths(params, path.resolve().parent)
    if path_errors:
        raise ParamsError(f"invalid parameters in {path}:\n" + "\n".join(path_errors))
    return params


def _set_dotted(d: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def flatten(params: BaseModel, prefix: str = "") -> dict[str, object]:
    """{'train.lr': 0.001, ...}: the form MLflow params and `dvc exp run -S` use."""
    out: dict[str, object] = {}
    for key, value in params.model_dump(mode="json").items():
        _flatten_into(out, f"{prefix}{key}", value)
    return out


def _flatten_into(out: dict, key: str, value) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


def check_declared(params_file: str | Path, dvc_yaml: Path) -> None:
    """ParamsError naming every key that dvc.yaml's stages declare and `params_file` lacks (no dvc.yaml: no check)."""
    if not Path(dvc_yaml).is_file():
        return
    missing = dvcparams.missing_keys(read_raw(params_file), dvc_yaml)
    if missing:
        raise ParamsError(f"invalid parameters in {params_file}:\n" + "\n".join(missing))
