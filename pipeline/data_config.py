"""The ground floor of the params: the shared validation machinery, `base` and the data stages' sections.

The data stages (acquire, faces, clean, split) import only this module, so DVC sees that editing a training recipe
or default (pipeline/config.py) cannot change their outputs (pipeline/stage_deps.py derives each stage's code deps
from its imports). pipeline/config.py builds the whole params.yaml model on top of it and re-exports every name.
"""

from __future__ import annotations

import functools
import re
import typing
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

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
    seed: NonNegInt = 42  # the data split, the sweep and the report's picks; each training run gets one of `seeds`
    seeds: tuple[NonNegInt, ...] = (42, 43, 44)  # every variant trains and evaluates once per seed (mean ± std)
    portable_cpu: bool = False  # true: oneDNN/MKL on AVX2, the same bits on other x86 CPUs, steps 0.7-0.9x as fast
    data_root: str = "data"  # folder (relative to the project) that holds the stages' data outputs
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto picks CUDA when available
    threads: PositiveInt = 2  # torch intra-op threads on CPU
    mlflow_dir: str = "mlflow"  # SQLite store + artifacts, relative to the project, unless MLFLOW_TRACKING_URI
    experiment: str = "anime-fgvc"  # MLflow experiment name

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must list one or more different seeds, e.g. [42, 43, 44], got {list(v)}")
        return v

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
    # Images of one group never straddle splits (split.strategy: group): image (each its own), subfolder (the folder
    # under the class: <class>/<group>/<image>), pattern:<regex> (its first capture group, or the whole match, in
    # the path below <path>; images it does not match are their own group)
    group: str = "image"

    @field_validator("group")
    @classmethod
    def _group_rule(cls, v: str) -> str:
        if v in ("image", "subfolder"):
            return v
        if not v.startswith("pattern:"):
            raise ValueError(f"{v!r}: expected image, subfolder or pattern:<regex>")
        try:
            re.compile(v.removeprefix("pattern:"))
        except re.error as exc:
            raise ValueError(f"{v!r}: not a valid regular expression ({exc})") from None
        return v


class CsvSource(_Section):
    path: str | None = None  # image root that the CSVs' `dir` column is relative to
    labels: str | None = None  # folder of train/val/test.csv (`class_id,dir`, no header); default <path>/labels
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
            _ = parts.port  # raises on a malformed port
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc})") from None
        if parts.username or parts.password:  # checked first: the URL holds a secret, so it is never echoed
            raise ValueError(
                "must not contain a login; use DANBOORU_LOGIN/DANBOORU_API_KEY or acquire.danbooru.credentials_file"
            )
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
    def _sum_to_one(self) -> SplitRatios:
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
    # group: test/val_groups below; ratio: a seeded draw of groups fills the ratios; ratio_per_class: the same in
    # each class, train first (a class keeps train images), groups joined by near-duplicates drawn as one
    group_assign: Literal["listed", "ratio", "ratio_per_class"] = "listed"
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


def _keyed_errors(errors: list[tuple[tuple, str]], value) -> ValidationError:
    """A ValidationError whose locations go below the field (e.g. tune.space.lr), so messages name the exact key."""
    return ValidationError.from_exception_data(
        "params",
        [InitErrorDetails(type=PydanticCustomError("value_error", msg), loc=loc, input=value) for loc, msg in errors],
    )


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


def check_source_paths(acq: AcquireParams, root: Path) -> list[str]:
    """The folders the chosen acquire source needs must exist: checked before any stage starts work."""
    errors = []
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
    return errors


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading exponent floats as YAML 1.2 (and so DVC, through ruamel) does: `1e-3` and
    `1.0e3` are numbers. PyYAML's YAML 1.1 reads them as text: DVC then saw an unchanged 0.001 while the stage refused
    '1e-3' (a forced `dvc repro -s` lost the stage's outputs to that disagreement)."""


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


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


def read_params_file(path: Path, overrides: dict | None = None) -> dict:
    """params.yaml as a mapping of sections, with dotted overrides applied."""
    raw = read_raw(path)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return raw


# The training side's sections (pipeline/config.py Params; a test keeps the two lists together): the data stages leave
# them to the check_params stage, which DVC runs before any other and which validates the whole file.
TRAINING_SECTIONS = ("train", "variants", "evaluate", "report", "tune", "pretrain")


class DataParams(_Section):
    """The sections the data stages read; any other top-level key but TRAINING_SECTIONS is an error (misspelt)."""

    base: BaseParams = BaseParams()
    acquire: AcquireParams = AcquireParams()
    faces: FacesParams = FacesParams()
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()


def load_data_params(path: str | Path = "params.yaml") -> DataParams:
    """base + the data stages' sections of params.yaml, validated with the same messages as load_params gives."""
    path = Path(path)
    raw = {k: v for k, v in read_params_file(path).items() if k not in TRAINING_SECTIONS}
    data = validate_section(DataParams, raw, str(path))
    errors = check_source_paths(data.acquire, path.resolve().parent)
    if errors:
        raise ParamsError(f"invalid parameters in {path}:\n" + "\n".join(errors))
    return data


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
