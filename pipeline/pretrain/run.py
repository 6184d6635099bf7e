"""The pretrain command: pool (cached) -> distillation (resumable) -> exported weights, card and provenance."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Params
from pipeline.io import write_text

log = logging.getLogger(__name__)


def cached_pool(params: Params, root: Path, work_dir: Path, sources_dir: Path, max_per_source: int | None = None):
    """The pool, rebuilt only when its settings change (rendering ~9.8k drawings takes ~2 min on 2 cores)."""
    from pipeline.pretrain.pool import build_pool, load_pool, save_pool

    cfg = params.pretrain
    key = {
        "sources": list(cfg.sources),
        "sources_dir": str(sources_dir.resolve()),
        "px": cfg.pool_px,
        "exclude_categories": list(cfg.exclude_categories),
        "exclude_dataset": cfg.exclude_dataset,
        "max_per_source": max_per_source,
    }
    pool_file, key_file = work_dir / "pool.npz", work_dir / "pool.json"
    if pool_file.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return load_pool(pool_file)
    pool = build_pool(
        sources_dir, cfg.sources, cfg.pool_px, cfg.exclude_categories, root / cfg.exclude_dataset, max_per_source
    )
    save_pool(pool_file, pool)
    write_text(key_file, json.dumps(key, sort_keys=True))
    return pool


def device_name(device) -> str:
    """What the card records: the GPU's name on CUDA, else the device type."""
    import torch

    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return str(device)


def _setup_device(params: Params, device: str | None, threads: int | None):
    """The device (the flag over base.device), seeded, with TF32 and cuDNN autotuning on CUDA."""
    import torch

    from pipeline.runtime import resolve_device, seed_everything

    dev = resolve_device(device or params.base.device)
    seed_everything(params.base.seed, threads or params.base.threads, dev)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 parts (loss, LN)
        torch.backends.cudnn.benchmark = True  # fixed shapes: the teacher's convolutions pick their fastest kernels
    return dev


def run_pretrain(
    params: Params,
    root: Path,
    out_dir: Path,
    work_dir: Path,
    *,
    sources_dir: Path | None = None,
    steps: int | None = None,
    threads: int | None = None,
    max_per_source: int | None = None,
    batch_size: int | None = None,
    resume: bool = True,
    pool_file: Path | None = None,
    device: str | None = None,
    max_seconds: float | None = None,
    export_each_checkpoint: bool = False,
) -> dict:
    """Distil and export into out_dir/<pretrain.name>.*; returns the summary written beside the weights.

    pool_file: a pack_pool file instead of the sources (for a machine without them); device overrides base.device;
    max_seconds sizes the step budget from the measured speed; export_each_checkpoint exports interim weights
    whenever the state is written, so a run killed at a time limit still leaves its last state's weights.
    """
    from pipeline.pretrain.distill import DistillPaths, distill, export
    from pipeline.pretrain.pool import unpack_pool

    cfg = params.pretrain
    overrides = {k: v for k, v in (("steps", steps), ("batch_size", batch_size)) if v is not None}
    cfg = cfg.model_copy(update=overrides)
    dev = _setup_device(params, device, threads)
    if pool_file is not None:
        pool = unpack_pool(pool_file)
    else:
        sources_dir = sources_dir or root / params.base.data_root / cfg.sources_dir
        pool = cached_pool(params, root, work_dir, sources_dir, max_per_source)
    log.info("pretrain: %d pool images, %d steps of %d on %s", len(pool.images), cfg.steps, cfg.batch_size, dev)
    paths = DistillPaths(work_dir=work_dir, weights=out_dir / f"{cfg.name}.safetensors")
    rows, name = pool.provenance_rows(), device_name(dev)
    extra = {"max_seconds": max_seconds, "pool_file": pool_file.name if pool_file else None}

    def interim(result: dict) -> None:
        export(result, cfg, rows, paths, seed=params.base.seed, device=name, extra=extra, plot=False)
        print(f"pretrain: step {result['steps']}, {result['seconds']:.0f} s, exported {paths.weights}", flush=True)

    result = distill(
        cfg,
        pool.images,
        paths,
        seed=params.base.seed,
        device=dev,
        resume=resume,
        max_seconds=max_seconds,
        on_checkpoint=interim if export_each_checkpoint else None,
    )
    return export(result, cfg, rows, paths, seed=params.base.seed, device=name, extra=extra)


def add_arguments(p) -> None:
    """Flags shared by `python -m pipeline pretrain` and stages/pretrain.py."""
    p.add_argument("--out", default="weights", help="folder for <name>.safetensors, .md, .provenance.csv, .loss.*")
    p.add_argument("--work", default=None, help="resumable state + pool cache (default: <data_root>/pretrain)")
    p.add_argument("--sources", default=None, help="unpacked sources (default: <data_root>/<pretrain.sources_dir>)")
    p.add_argument("--pool", default=None, help="train on this pool pack (written by --pack) instead of the sources")
    p.add_argument("--pack", default=None, help="only build the pool from the sources and write it to this file")
    p.add_argument("--pack-quality", type=int, default=100, help="WebP quality of --pack (100: lossless; 85: ~16 MiB)")
    p.add_argument("--steps", type=int, default=None, help="override pretrain.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override pretrain.batch_size (smoke runs)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="size the step budget so that training ends within this many seconds (measured speed)",
    )
    p.add_argument("--device", default=None, help="override base.device (cpu, cuda, cuda:1, auto)")
    p.add_argument("--threads", type=int, default=None, help="override base.threads (torch intra-op threads)")
    p.add_argument("--max-per-source", type=int, default=None, help="first N files/emoji per source (smoke runs)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing state in the work folder")
    p.add_argument(
        "--export-each-checkpoint",
        action="store_true",
        help="export weights and card at every checkpoint too (a run killed at a time limit keeps them)",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="export the work folder's last state as it is (e.g. of a run still going), no training",
    )


def _pack(args, params: Params, root: Path, work: Path) -> None:
    from pipeline.pretrain.pool import pack_pool

    if not 1 <= args.pack_quality <= 100:
        raise ValueError(f"--pack-quality: 1..100, got {args.pack_quality}")
    sources = Path(args.sources) if args.sources else root / params.base.data_root / params.pretrain.sources_dir
    pool = cached_pool(params, root, work, sources, args.max_per_source)
    size = pack_pool(Path(args.pack), pool, args.pack_quality)
    print(f"pretrain: packed {len(pool.images)} images into {args.pack} ({size / 2**20:.1f} MiB)")


def main(args, params: Params, root: Path) -> dict | None:
    for flag in ("steps", "threads", "max_per_source", "max_seconds", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')}: must be positive, got {value}")
    work = Path(args.work) if args.work else root / params.base.data_root / "pretrain"
    if args.pack:
        return _pack(args, params, root, work)
    if args.export_only:
        import torch

        state = work / "last.pt"
        if not state.is_file():
            raise FileNotFoundError(f"--export-only: no distillation state {state}")
        args.steps = int(torch.load(state, map_location="cpu", weights_only=True)["step"])
    summary = run_pretrain(
        params,
        root,
        Path(args.out),
        work,
        sources_dir=Path(args.sources) if args.sources else None,
        steps=args.steps,
        threads=args.threads,
        max_per_source=args.max_per_source,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        pool_file=Path(args.pool) if args.pool else None,
        device=args.device,
        max_seconds=args.max_seconds,
        export_each_checkpoint=args.export_each_checkpoint,
    )
    print(
        f"pretrain: {summary['steps']} steps in {summary['seconds'] / 60:.1f} min, final loss "
        f"{summary['final_loss'].get('loss')} -> {Path(args.out) / summary['weights']} "
        f"(sha256 {summary['sha256'][:12]})"
    )
    return summary
