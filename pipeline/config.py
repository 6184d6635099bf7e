"""Typed, frozen parameters loaded from params.yaml.

One section per stage plus `base`, as in DVC's example-get-started. The check_params stage (and `python -m pipeline
check-params`) loads and validates the whole file before any work, so a typo anywhere fails fast with one message
naming the key and the reason. `base` and the data stages' sections live one floor down, in
pipeline/data_config.py (re-exported here); this module adds training, evaluation, the report, sweeps, pretraining and
the paper recipes.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails

from pipeline import dvcparams
from pipeline import search_space as tune_space
from pipeline.data_config import (  # noqa: F401  (re-exported: the whole params model is importable from here)
    AcquireParams,
    BaseParams,
    CleanParams,
    CsvSource,
    DafreSource,
    DanbooruSource,
    DataParams,
    EmbeddedSource,
    FacesParams,
    FolderSource,
    Fraction,
    NonNegInt,
    ParamsError,
    PositiveInt,
    SplitParams,
    SplitRatios,
    _keyed_errors,
    _Section,
    check_source_paths,
    flatten,
    load_data_params,
    not_a_folder,
    read_params_file,
    read_raw,
    validate_section,
)
from pipeline.methods import ILA_VARIANTS, METHOD_NAMES

# Paper training recipes for `train.recipe` (docs/defaults.md#paper-recipes: each value's source in the authors'
# code). Precision is left to the user (the papers use fp16 AMP, which needs CUDA), and so are method and img_size
# (224 or 448 in the papers). The model is the papers' original Google ImageNet-21k ViT-B/16 (timm's `orig_in21k`
# tag; the bare name would resolve to timm's default augreg2_in21k_ft_in1k weights).
PAPER_MODEL = "vit_base_patch16_224.orig_in21k"
# Architectures whose original Google ImageNet-21k weights timm tags `orig_in21k` (timm.list_pretrained
# ("*.orig_in21k") of the pinned timm): under a recipe their bare name gets the tag.
ORIG_IN21K = frozenset(
    {
        "vit_base_patch16_224",
        "vit_base_patch32_224",
        "vit_base_r50_s16_224",
        "vit_large_patch16_224",
        "vit_large_patch32_224",
        "vit_huge_patch14_224",
    }
)
_PAPER_TRAINER = dict(
    model=PAPER_MODEL,
    weights="hub",  # or file:ViT-B_16.npz, the original Google release
    optimizer="sgd",  # timm "sgd": SGD with Nesterov momentum 0.9
    weight_decay=0.0,
    batch_size=8,
    epochs=50,
    warmup_steps=500,
    min_lr=1.0e-5,
    grad_clip=1.0,
    resize_ratio=1.34,
    hflip=0.5,
    layer_norm_eps=1.0e-12,  # the authors' ViT (timm's: 1e-6)
    init="paper",  # Xavier-uniform weights, N(0, 1e-6) biases for the new layers
    drop_path_rule="constant",
)  # the authors' DropPath(sd) has one rate in every block
RECIPES: dict[str, dict] = {
    # GLSim README command: lr 0.01, medaugs = flip + TrivialAugmentWide + random erasing 0.3 + LS 0.1 + SD 0.1.
    # With stochastic depth on, the authors' blocks use DropPath *instead of* their hidden dropout: no dropout.
    "glsim": {
        **_PAPER_TRAINER,
        "lr": 0.01,
        "augment": "med",
        "label_smoothing": 0.1,
        "drop_path_rate": 0.1,
        "proj_drop_rate": 0.0,
    },
    # ILA README commands: frozen backbone, lr 0.1, weakaugs = flip only (no label smoothing, no stochastic depth),
    # so the blocks keep hidden_dropout_prob 0.1, also in the frozen backbone while training
    "ila": {
        **_PAPER_TRAINER,
        "lr": 0.1,
        "augment": "weak",
        "label_smoothing": 0.0,
        "drop_path_rate": 0.0,
        "proj_drop_rate": 0.1,
    },
}


class TrainParams(_Section):
    # cnn/vit: full fine-tune; linear: frozen backbone + head; glsim/ila: pipeline/models/glsim.py, ila.py
    method: Literal[METHOD_NAMES] = "cnn"
    model: str = "tf_efficientnet_lite0"  # any timm model name
    patch_size: PositiveInt | None = None  # ViT patch size (timm resamples pretrained embeddings); null: from the name
    backbone_cnn: str | None = None  # hybrid ViT: this timm CNN's stage at stride patch_size is the patch embedding
    weights: str = "package:efficientnet_lite0"  # none|hub|hf-hub:ID|local-dir:DIR|file:PATH|package:... (weights.py)
    img_size: PositiveInt = 96  # training/eval resolution (square)
    glsim_top_k: PositiveInt | None = None  # glsim: patches selected by similarity; null: 8, 16 for dogs (GLSim repo)
    glsim_box: Literal["paper", "corrected"] = "paper"  # glsim crop end: paper max_index*P (as published) or (max+1)*P
    ila_variant: Literal[ILA_VARIANTS] = "ila"  # ila: 2 down-sampling ILAs; +: plain ILAs; ++: adapters
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
    decode_cache: bool = True  # keep decoded images in memory for sets up to 20k images (off: decode every epoch)
    resume: bool = True  # continue a killed run from checkpoint_dir/<run key>/last.pt (same params + data only)
    checkpoint_dir: str = "checkpoints"  # per-epoch resumable state, outside DVC outputs; removed when a run ends
    recipe: Literal["glsim", "ila"] | None = None  # paper preset (RECIPES); keys written in params.yaml win over it
    augment: Literal["rrc", "weak", "med"] = "rrc"  # rrc: crop+jitter above; weak/med: GLSim weakaugs/medaugs
    resize_ratio: Annotated[float, Field(ge=1.0)] = 1.34  # weak/med: resize to img_size*ratio, random/centre crop
    decode: Literal["cpu", "device"] = "cpu"  # training images decoded by the workers, or on the device (weak/med:
    # the workers only read bytes and draw parameters; nvJPEG on CUDA; README "Input pipeline")
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

    @field_validator("decode")
    @classmethod
    def _decode(cls, v: str, info: ValidationInfo) -> str:
        if v == "device" and info.data.get("augment") not in ("weak", "med"):
            raise ValueError(
                f"decode 'device' runs the weak/med recipes' crop on the device; train.augment is "
                f"{info.data.get('augment')!r} (use decode 'cpu', or augment weak or med)"
            )
        return v

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        hub_id = r"hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?"  # ORG/NAME[@REVISION], as timm's hf-hub: names
        if not re.fullmatch(rf"none|hub|{hub_id}|local-dir:.+|file:.+|package:efficientnet_lite0", v):
            raise ValueError(
                "must be none, hub, hf-hub:ORG/NAME, local-dir:PATH, file:PATH or "
                f"package:efficientnet_lite0, got {v!r}"
            )
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


class TuneResources(_Section):
    cpu: Annotated[float, Field(gt=0)] = 1.0  # CPUs reserved per trial; its torch threads: this, rounded down (min 1)
    gpu: Annotated[float, Field(ge=0)] = 0.0  # GPUs per trial (0.5: two trials share one); 0: trials train on the CPU


def _default_space() -> dict[str, list]:
    return {"lr": ["loguniform", 3.0e-4, 3.0e-3], "label_smoothing": ["choice", 0.0, 0.1]}


class TuneParams(_Section):
    apply: bool = False  # train stage: train with best_params.yaml's values for the searched keys
    space: dict[str, object] = Field(default_factory=_default_space)  # train key: [distribution, args]; search_space.py
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


class Params(DataParams):
    """The whole params file: the data stages' sections (DataParams, first, in that order) and the training side's."""

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
        bad_names = [
            ((name,), "a variant name is letters, digits, '_' and '-' (it names folders and DVC stages)")
            for name in v
            if not VARIANT_NAME.fullmatch(name)
        ]
        if bad_names:
            raise _keyed_errors(bad_names, v)
        nested: list[InitErrorDetails] = []
        for name, overrides in v.items():
            if train is None:  # the train section is invalid itself: that error is reported on its own
                break
            try:
                TrainParams.model_validate(variant_train(train, overrides))
            except ValidationError as exc:  # re-raised under variants.<name>, with their own kinds and messages
                nested += [
                    InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"], ctx=e.get("ctx", {}))
                    for e in exc.errors()
                ]
        if nested:
            raise ValidationError.from_exception_data("params", nested)
        return v

    def with_variant(self, name: str) -> Params:
        """These params with the train section of variant `name` (what the train stage trains for it)."""
        if name not in self.variants:
            raise ParamsError(f"variants.{name}: no such variant in params.yaml (have {', '.join(self.variants)})")
        train = validate_section(
            TrainParams, variant_train(self.train, self.variants[name]), "params.yaml", prefix=f"variants.{name}."
        )
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


def _check_paths(params: Params, root: Path) -> list[str]:
    """Paths that the chosen settings need must exist: checked here, before any stage starts work."""
    errors = check_source_paths(params.acquire, root)
    if params.train.weights.startswith("file:"):
        wfile = params.train.weights.removeprefix("file:")
        if not (root / wfile).is_file():
            errors.append(f"  - train.weights: file {wfile!r} does not exist")
    if params.train.weights.startswith("local-dir:"):
        wdir = params.train.weights.removeprefix("local-dir:")
        if not (root / wdir).is_dir():
            errors.append(f"  - train.weights: folder {wdir!r} does not exist")
    return errors


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Load and validate params.yaml; relative paths in it are resolved against the file's folder.

    Raises ParamsError listing every schema problem (key + reason) without touching any output; paths are checked
    once the schema is valid.
    """
    path = Path(path)
    raw = read_params_file(path, overrides)
    params = validate_section(Params, raw, str(path))
    path_errors = _check_paths(params, path.resolve().parent)
    if path_errors:
        raise ParamsError(f"invalid parameters in {path}:\n" + "\n".join(path_errors))
    return params


def check_declared(params_file: str | Path, dvc_yaml: Path) -> None:
    """ParamsError naming every key that dvc.yaml's stages declare and `params_file` lacks (no dvc.yaml: no check)."""
    if not Path(dvc_yaml).is_file():
        return
    missing = dvcparams.missing_keys(read_raw(params_file), dvc_yaml)
    if missing:
        raise ParamsError(f"invalid parameters in {params_file}:\n" + "\n".join(missing))
