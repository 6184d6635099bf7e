"""The pretrain command: pool (cached) -> distillation (resumable) -> exported weights, card and provenance."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import Params
from pipeline.io import write_text

log = logging.getLogger(__name__)


def cached_pool(params: Params, root: Path, work_dir: Path, sources_dir: Path,
                max_per_source: int | None = None):
    """The pool, rebuilt only when its settings change (rendering ~9.8k drawings takes ~2 min on 2 cores)."""
    from pipeline.pretrain.pool import build_pool, load_pool, save_pool

    cfg = params.pretrain
    key = {"sources": list(cfg.sources), "sources_dir": str(sources_dir.resolve()), "px": cfg.pool_px,
           "exclude_categories": list(cfg.exclude_categories), "exclude_dataset": cfg.exclude_dataset,
           "max_per_source": max_per_source}
    pool_file, key_file = work_dir / "pool.npz", work_dir / "pool.json"
    if pool_file.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return load_pool(pool_file)
    pool = build_pool(sources_dir, cfg.sources, cfg.pool_px, cfg.exclude_categories, root / cfg.exclude_dataset,
                      max_per_source)
    save_pool(pool_file, pool)
    write_text(key_file, json.dumps(key, sort_keys=True))
    return pool


def run_pretrain(params: Params, root: Path, out_dir: Path, work_dir: Path, *, sources_dir: Path | None = None,
                 steps: int | None = None, threads: int | None = None, max_per_source: int | None = None,
                 resume: bool = True) -> dict:
    """Distil and export into out_dir/<pretrain.name>.*; returns the summary written beside the weights."""
    from pipeline.pretrain.distill import DistillPaths, distill, export
    from pipeline.training.engine import resolve_device, seed_everything

    cfg = params.pretrain
    if steps is not None:
        cfg = cfg.model_copy(update={"steps": steps})
    device = resolve_device(params.base.device)
    seed_everything(params.base.seed, threads or params.base.threads, device)
    sources_dir = sources_dir or root / params.base.data_root / cfg.sources_dir
    pool = cached_pool(params, root, work_dir, sources_dir, max_per_source)
    log.info("pretrain: %d pool images, %d steps of %d on %s", len(pool.images), cfg.steps, cfg.batch_size, device)
    paths = DistillPaths(work_dir=work_dir, weights=out_dir / f"{cfg.name}.safetensors")
    result = distill(cfg, pool.images, paths, seed=params.base.seed, device=device, resume=resume)
    return export(result, cfg, pool.provenance_rows(), paths, seed=params.base.seed, device=str(device))


def add_arguments(p) -> None:
    """Flags shared by `python -m pipeline pretrain` and stages/pretrain.py."""
    p.add_argument("--out", default="weights", help="folder for <name>.safetensors, .md, .provenance.csv, .loss.*")
    p.add_argument("--work", default=None, help="resumable state + pool cache (default: <data_root>/pretrain)")
    p.add_argument("--sources", default=None, help="unpacked sources (default: <data_root>/<pretrain.sources_dir>)")
    p.add_argument("--steps", type=int, default=None, help="override pretrain.steps")
    p.add_argument("--threads", type=int, default=None, help="override base.threads (torch intra-op threads)")
    p.add_argument("--max-per-source", type=int, default=None, help="first N files/emoji per source (smoke runs)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing state in the work folder")
    p.add_argument("--export-only", action="store_true",
                   help="export the work folder's last state as it is (e.g. of a run still going), no training")


def main(args, params: Params, root: Path) -> dict:
    for flag in ("steps", "threads", "max_per_source"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be at least 1, got {value}")
    work = Path(args.work) if args.work else root / params.base.data_root / "pretrain"
    if args.export_only:
        import torch

        state = work / "last.pt"
        if not state.is_file():
            raise FileNotFoundError(f"--export-only: no distillation state {state}")
        args.steps = int(torch.load(state, map_location="cpu", weights_only=True)["step"])
    summary = run_pretrain(params, root, Path(args.out), work, sources_dir=Path(args.sources) if args.sources else None,
                           steps=args.steps, threads=args.threads, max_per_source=args.max_per_source,
                           resume=not args.no_resume)
    print(f"pretrain: {summary['steps']} steps in {summary['seconds'] / 60:.1f} min, final loss "
          f"{summary['final_loss'].get('loss')} -> {Path(args.out) / summary['weights']} "
          f"(sha256 {summary['sha256'][:12]})")
    return summary
