"""What `predict` reads: image files and folders, and a checkpoint given as a path or an MLflow `runs:/` URI.

Everything here fails with PredictError (a ValueError: the CLI prints it and exits 2) whose message starts with the
path or URI at fault and says why, and it fails before any prediction is printed or any explanation written.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline.config import BaseParams, CleanParams

RUNS_SCHEME = "runs:/"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")  # any other scheme (models:/, s3://, http://) is refused


class PredictError(ValueError):
    """Bad input to predict: the message names the path (or URI) and the reason."""


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted); duplicates dropped, first kept.

    Inside folders only image suffixes count and hidden entries (.git, .ipynb_checkpoints, atomic-write leftovers)
    are skipped; a file named explicitly is taken whatever its suffix, and read_checked() decides if it is an image.
    """
    from pipeline.data.acquire import IMAGE_EXTENSIONS  # the suffixes the folder source imports

    files: list[Path] = []
    seen: set[Path] = set()
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                f
                for f in path.rglob("*")
                if f.suffix.lower() in IMAGE_EXTENSIONS
                and f.is_file()
                and not any(part.startswith(".") for part in f.relative_to(path).parts)
            )
            if not found:
                raise PredictError(
                    f"{path}: folder holds no images (searched recursively for {', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
        elif path.is_file():
            found = [path]
        elif path.exists():
            raise PredictError(f"{path}: neither a file nor a folder")
        else:
            raise PredictError(f"{path}: no such file or folder")
        for f in found:
            if f.resolve() not in seen:
                seen.add(f.resolve())
                files.append(f)
    return files


def read_checked(path: Path, clean: CleanParams) -> bytes:
    """The file's bytes, once they decode fully as an image under clean's guards (size limit, truncation)."""
    from pipeline.data.clean import Rejected, decode

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PredictError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        decode(data, clean)
    except Rejected as r:  # reasons: empty_file, not_an_image, corrupt, too_many_pixels, unsupported_mode
        raise PredictError(f"{path}: {r.reason.replace('_', ' ')} ({r.detail})") from None
    return data


def resolve_checkpoint(spec: str, base: BaseParams, root: Path, download_dir: Path) -> Path:
    """A local checkpoint file for `--model`: a path as is, or `runs:/<run_id>/<artifact path>` downloaded from
    the project's MLflow store (pipeline/tracking.py: base.mlflow_dir under `root`, or MLFLOW_TRACKING_URI)."""
    if spec.startswith(RUNS_SCHEME):
        return _download(spec, base, root, download_dir)
    if _URI.match(spec):
        raise PredictError(
            f"--model {spec}: unsupported URI; give a checkpoint path or {RUNS_SCHEME}<run_id>/"
            f"<artifact path> (the train stage logs {RUNS_SCHEME}<run_id>/model.pt)"
        )
    path = Path(spec)
    if path.is_dir():
        return _model_in_folder(path, base)
    if not path.is_file():
        raise PredictError(f"--model {spec}: checkpoint file does not exist")
    return path


def _model_in_folder(folder: Path, base: BaseParams) -> Path:
    """A train output folder: its model.pt, or for a variant's folder (one seed<N>/ per seed) the model of the first
    of base.seeds that is there (said on stderr: the other seeds are the same model trained again)."""
    if (folder / "model.pt").is_file():
        return folder / "model.pt"
    seeds = [folder / f"seed{s}" / "model.pt" for s in base.seeds]
    found = [p for p in seeds if p.is_file()] or sorted(folder.glob("seed*/model.pt"))
    if not found:
        raise PredictError(f"--model {folder}: is a folder with neither model.pt nor seed<N>/model.pt in it")
    print(f"predict: {folder} holds one model per seed; using {found[0]}", file=sys.stderr)
    return found[0]


def _download(uri: str, base: BaseParams, root: Path, dest: Path) -> Path:
    run_id, _, artifact = uri.removeprefix(RUNS_SCHEME).strip("/").partition("/")
    if not run_id or not artifact:
        raise PredictError(
            f"--model {uri}: expected {RUNS_SCHEME}<run_id>/<artifact path>, e.g. {RUNS_SCHEME}<run_id>/model.pt"
        )
    from pipeline import tracking

    db = tracking.local_db(base, root)
    if db is not None and not db.is_file():
        # Checked here: MLflow would silently create an empty store and then report a missing run.
        raise PredictError(
            f"--model {uri}: no MLflow store at {db} (base.mlflow_dir in the params file, or set MLFLOW_TRACKING_URI)"
        )
    store = tracking.tracking_uri(base, root)
    try:
        local = tracking.download_artifact(uri, store, dest)
    except tracking.ArtifactError as exc:
        raise PredictError(f"--model {uri}: cannot download it from the MLflow store {store} ({exc})") from None
    if not local.is_file():
        raise PredictError(f"--model {uri}: {artifact!r} is a folder of artifacts, not a checkpoint file")
    return local


def load_model(path: Path, label: str, device):
    """load_checkpoint with every failure (not a checkpoint, truncated, unknown architecture) named by `label`."""
    from pipeline.models import load_checkpoint

    try:
        return load_checkpoint(path, device)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... on foreign files
        raise PredictError(f"--model {label}: cannot load the checkpoint ({type(exc).__name__}: {exc})") from None
