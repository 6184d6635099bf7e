"""`python -m pipeline gpu-check`: one command that proves the GPU path and prints its figures (`--json`: one line).

Parts (each one a key of the summary):
- `train_step`: training-step img/s of ViT-B/16 at 224 px in bf16 (the engine's own train_step) and its MFU against
  the GPU's dense bf16 peak, with channels_last, torch.compile off and on, and compiled as CUDA graphs;
- `glsim_vs_vit`, `ila_vs_frozen_vit`: GLSim / ViT and ILA / frozen-ViT (linear probe) throughput ratios, and ILA's
  step eager / compiled / as CUDA graphs (compile runs on CUDA only);
- `loader`: img/s of the training DataLoader reading JPEGs from tar shards at 224 px with GLSim's medaugs, with one
  and with N worker processes, against what the model consumes (workers needed to keep up);
- `engine_e2e`: the real `train()` for vit, glsim and ila (ViT-B/16 at 224, bf16, the recipes' augmentation, every
  core a loader worker, no decode cache, JPEGs in tar shards) over 2+ epochs: steady-epoch img/s, its ratio to the
  same engine step alone on a resident batch, and the first epoch's time against a steady one; each method again
  with `train.decode: device` (`<method>_decode_device`: the workers read bytes, the GPU decodes and crops);
- `sweep`: a 4-trial Ray Tune sweep with `gpu: 0.25` per trial (all four on one GPU at once), logged to MLflow;
- `evaluate`, `predict`: the evaluate stage and `predict` on CUDA, on the best trial's checkpoint.
Without CUDA every part runs in a reduced form (a tiny ViT at 96 px, few images and steps: about a minute on 2 cores,
so the test suite runs it), `cpu_reduced` is true and `needs_gpu` lists the parts whose figures mean something only
on a GPU. The whole check takes at most about 5 minutes on one H100/H200 (`--skip-compile` saves the compiles).
`--json-out FILE` rewrites FILE after every part, so a check stopped by a time limit still leaves its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

# torch/timm/ray are imported inside the parts: building the CLI parser must stay light.

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in this order (first match wins).
PEAK_BF16_TFLOPS = (
    ("H200", 989.4),
    ("GH200", 989.4),
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("A10G", 125.0),
    ("A10", 125.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("RTX 6000 Ada", 364.2),
)
VIT_B = "vit_base_patch16_224"
ALL_PARTS = ("train_step", "glsim_vs_vit", "ila_vs_frozen_vit", "loader", "engine_e2e", "sweep", "evaluate")
OPT_IN_PARTS = ("engine_e2e_compile", "train_step_autotune")  # extras run only when --parts names them
H100_VIT_B_IMG_PER_S = 2500  # the ViT-B/16 bf16 training consumption on an H100, for the loader's target


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU check, or its reduced CPU form."""

    model: str
    img_size: int
    batch_size: int
    steps: int
    rounds: int
    loader_images: int
    loader_workers: int
    loader_img_size: int  # the loader always prepares 224 px crops (the papers' size), even for the tiny model
    loader_batch: int
    trial_cpu: float
    trial_gpu: float
    warmup: int  # untimed steps first (compilation, cuDNN/cuBLAS autotuning, allocator)
    e2e_train: int = 8192  # engine_e2e: train JPEGs (issue 20: at least 8k)
    e2e_val: int = 1024  # validation JPEGs (validated every epoch, not timed)
    e2e_epochs: int = 3  # epoch 1 pays the start-up, 2.. are steady
    e2e_classes: int = 100
    e2e_workers: int = os.cpu_count() or 1  # all cores as loader workers
    e2e_decode_device: tuple[str, ...] = ("vit", "glsim", "ila")  # engine_e2e again with train.decode: device


GPU = Sizes(VIT_B, 224, 128, 10, 3, 3072, min(16, os.cpu_count() or 1), 224, 64, 2.0, 0.25, 3)
# The reduced CPU form: what it shrinks, the rest as on the GPU.
CPU = replace(
    GPU,
    model="test_vit",
    img_size=96,
    batch_size=4,
    steps=2,
    rounds=1,
    loader_images=48,
    loader_workers=1,
    loader_batch=8,
    trial_cpu=0.5,
    trial_gpu=0.0,
    warmup=1,
    e2e_train=24,
    e2e_val=8,
    e2e_epochs=2,
    e2e_classes=4,
    e2e_workers=1,
    e2e_decode_device=("ila",),
)


def peak_tflops(device_name: str) -> float | None:
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


# ------------------------------------------------------------------------------------------------ training step


def _step_fn(
    method: str,
    sizes: Sizes,
    device,
    channels_last: bool = False,
    compile_: bool = False,
    train: bool = True,
    num_classes: int = 200,
    fused: bool = False,
    sdpa: str | None = None,
    compile_mode: str | None = None,
):
    """A closure running one engine train_step (or one forward) of `method` on a fixed synthetic batch; `fused`: the
    fused optimiser kernel (CUDA), `sdpa`: force one attention backend (FLASH_ATTENTION, CUDNN_ATTENTION, ...),
    `compile_mode`: torch.compile's mode (None: its default; "reduce-overhead" replays CUDA graphs)."""
    import torch
    from timm.optim import create_optimizer_v2
    from torch import nn

    from pipeline.models import build_model
    from pipeline.runtime import autocast
    from pipeline.training.engine import train_step

    torch.manual_seed(0)
    model = build_model(method, sizes.model, num_classes, "none", sizes.img_size).to(device)
    x = torch.randn(sizes.batch_size, 3, sizes.img_size, sizes.img_size, device=device)
    y = torch.randint(0, num_classes, (sizes.batch_size,), device=device)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model, mode=compile_mode) if compile_ else model
    precision = "bf16"
    if not train:
        model.eval()

        def forward():
            with torch.no_grad(), autocast(device, precision):
                net(x)

        return forward, model, x
    model.train()
    kernel = {"fused": True} if fused else {"foreach": True}
    opt = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=0.0, **kernel)  # the papers' optimiser
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    backend = _sdpa_context(sdpa)

    def step():
        with backend():
            train_step(net, x, y, opt, loss_fn, device, precision, grad_clip=1.0)

    return step, model, x


def _sdpa_context(name: str | None):
    """A factory of the context that forces torch's SDPA backend `name` (None: torch's own choice)."""
    import contextlib

    if name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return lambda: sdpa_kernel(getattr(SDPBackend, name))


def _img_per_s(step, sizes: Sizes, device, batch_size: int | None = None) -> float:
    from pipeline.runtime import time_calls

    time_calls(step, sizes.warmup, device)
    times = [time_calls(step, sizes.steps, device) for _ in range(sizes.rounds)]
    return sizes.steps * (batch_size or sizes.batch_size) / statistics.median(times)


def train_flops_per_image(model, x) -> int:
    """Forward + backward FLOPs of one image, counted by torch's FLOP counter (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x[:1]).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def check_train_step(sizes: Sizes, device, peak: float | None, compile_: bool, autotune: bool = False) -> dict:
    import torch

    out: dict = {
        "model": sizes.model,
        "img_size": sizes.img_size,
        "batch_size": sizes.batch_size,
        "precision": "bf16",
        "optimizer": "sgd (GLSim recipe)",
        "peak_bf16_tflops": peak,
    }
    step, model, x = _step_fn("vit", sizes, device)
    flops = train_flops_per_image(model, x)
    out["train_gflops_per_image"] = round(flops / 1e9, 2)
    runs = {}
    for name, kw in _step_configs(device, compile_, autotune).items():
        t0 = time.perf_counter()
        step, model, x = _step_fn("vit", sizes, device, **kw)
        try:
            ips = _img_per_s(step, sizes, device)
        except Exception as exc:  # noqa: BLE001 - a forced attention backend this GPU lacks, a compile mode that fails
            runs[name] = {"unavailable": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        runs[name] = {
            "img_per_s": round(ips, 1),
            "seconds": round(time.perf_counter() - t0, 1),
            "mfu": round(ips * flops / (peak * 1e12), 4) if peak else None,
        }
        del step, model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not compile_:
        runs["compile"] = {
            "skipped": "--skip-compile" if device.type == "cuda" else "CPU form: compiling takes ~1 min on 2 cores"
        }
    out["runs"] = runs
    best = max((k for k in runs if "img_per_s" in runs[k]), key=lambda k: runs[k]["img_per_s"])
    out |= {"best": best, "best_img_per_s": runs[best]["img_per_s"], "best_mfu": runs[best]["mfu"]}
    return out


def _step_configs(device, compile_: bool, autotune: bool = False) -> dict[str, dict]:
    """The train-step variants measured: memory format, the fused optimiser and the attention backends (CUDA), and
    torch.compile with the fused optimiser: its default mode, and on CUDA "reduce-overhead" (the step replayed as CUDA
    graphs: no per-kernel launch cost) and "max-autotune-no-cudagraphs" (Triton GEMM and fusion autotuning)."""
    configs: dict[str, dict] = {"eager": {}, "channels_last": {"channels_last": True}}
    if device.type == "cuda":
        configs |= {"eager_fused": {"fused": True}}
        configs |= {
            f"sdpa_{b.split('_')[0].lower()}": {"fused": True, "sdpa": b}
            for b in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION")
        }
    if compile_:
        configs["compile"] = {"compile_": True, "fused": device.type == "cuda"}
    if compile_ and device.type == "cuda":
        configs["compile_cudagraphs"] = {"compile_": True, "fused": True, "compile_mode": "reduce-overhead"}
    if compile_ and autotune:  # minutes of autotuning: only when asked for (--parts ...,train_step_autotune)
        configs["compile_autotune"] = {"compile_": True, "fused": True, "compile_mode": "max-autotune-no-cudagraphs"}
    return configs


def check_ratio(a: str, b: str, sizes: Sizes, device) -> dict:
    """Training-step and forward img/s of method `a` against method `b` on the same backbone and batch."""
    import torch

    out = {"model": sizes.model, "img_size": sizes.img_size, "batch_size": sizes.batch_size}
    for mode, train in (("train", True), ("forward", False)):
        ips = {}
        for method in (a, b):
            fn, model, x = _step_fn(method, sizes, device, train=train)
            ips[method] = _img_per_s(fn, sizes, device)
            del fn, model, x
            if device.type == "cuda":
                torch.cuda.empty_cache()
        out |= {
            f"{mode}_{a}_img_per_s": round(ips[a], 1),
            f"{mode}_{b}_img_per_s": round(ips[b], 1),
            f"{mode}_ratio": round(ips[a] / ips[b], 3),
        }
    return out


def check_compiled_steps(method: str, sizes: Sizes, device) -> dict:
    """Training-step img/s of `method` eager, compiled, and compiled as CUDA graphs (issue 20: a frozen backbone's
    step is short, so launch overhead is a larger share of it)."""
    import torch

    modes = {
        "eager": {},
        "compile": {"compile_": True},
        "compile_cudagraphs": {"compile_": True, "compile_mode": "reduce-overhead"},
    }
    out = {}
    for name, kw in modes.items():
        fn, model, x = _step_fn(method, sizes, device, fused=device.type == "cuda", **kw)
        try:
            out[f"train_{method}_{name}_img_per_s"] = round(_img_per_s(fn, sizes, device), 1)
        except Exception as exc:  # noqa: BLE001 - a compile mode that fails is a figure too
            out[f"train_{method}_{name}_img_per_s"] = f"unavailable: {type(exc).__name__}: {exc}"[:300]
        del fn, model, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------------- loader


def time_loader(
    df,
    image_root: Path,
    img_size: int,
    workers: int,
    batch_size: int = 64,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict:
    """img/s of the engine's training DataLoader (ManifestDataset + GLSim medaugs, EpochSampler, no decode cache)
    over one pass of `df` (or `max_batches` batches), after the workers have started and sent their first batch."""
    import torch

    from pipeline.config import TrainParams
    from pipeline.data.dataset import ManifestDataset
    from pipeline.data.transforms import batch_augment, train_transform
    from pipeline.training.engine import make_loader

    cfg = TrainParams(recipe="glsim", method="vit", model=VIT_B, img_size=img_size)  # medaugs, resize 1.34
    dcfg = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"}
    ds = ManifestDataset(
        df, image_root, train_transform(cfg, dcfg, seed), cache=False, seed=seed, device_params=batch_augment(cfg, dcfg)
    )
    loader = make_loader(ds, batch_size, True, seed, workers, torch.device("cpu"))
    loader.sampler.set_epoch(1)
    it = iter(loader)
    t_start = time.perf_counter()
    next(it)  # worker start-up and the first batch are not throughput
    first = time.perf_counter() - t_start
    n, t0 = 0, time.perf_counter()
    for i, (x, *_) in enumerate(it):
        n += len(x)
        if max_batches is not None and i + 1 >= max_batches:
            break
    seconds = time.perf_counter() - t0
    del it, loader
    ips = n / seconds if seconds > 0 else 0.0
    return {
        "workers": workers,
        "images": n,
        "seconds": round(seconds, 2),
        "img_per_s": round(ips, 1),
        "img_per_s_per_worker": round(ips / max(workers, 1), 1),
        "first_batch_s": round(first, 2),
    }


def check_loader(sizes: Sizes, tmp: Path, model_img_per_s: float | None) -> dict:
    from pipeline.data.synthetic import write_jpeg_shards

    t0 = time.perf_counter()
    df = write_jpeg_shards(tmp / "shards", sizes.loader_images, processes=os.cpu_count() or 1)
    made = time.perf_counter() - t0
    one = time_loader(
        df, tmp / "shards", sizes.loader_img_size, 1, sizes.loader_batch, max_batches=6 if sizes is GPU else None
    )
    many = (
        time_loader(df, tmp / "shards", sizes.loader_img_size, sizes.loader_workers, sizes.loader_batch)
        if sizes.loader_workers > 1
        else one
    )
    per_worker = one["img_per_s"]
    out = {
        "img_size": sizes.loader_img_size,
        "augment": "med (GLSim medaugs; CPU half: uint8)",
        "format": "JPEG 256x320 in tar shards",
        "images": sizes.loader_images,
        "write_seconds": round(made, 1),
        "one_worker": one,
        "n_workers": many,
        "cpu_count": os.cpu_count(),
        "workers_for_2500_img_per_s": math.ceil(H100_VIT_B_IMG_PER_S / per_worker) if per_worker else None,
    }
    if model_img_per_s:
        out |= {
            "model_img_per_s": model_img_per_s,
            "workers_for_model": math.ceil(model_img_per_s / per_worker) if per_worker else None,
            "keeps_up": many["img_per_s"] >= model_img_per_s,
        }
    return out


# ------------------------------------------------------------------------------------------ engine end to end

E2E_RECIPES = {"vit": "glsim", "glsim": "glsim", "ila": "ila"}  # method -> recipe (vit: the paper's ViT baseline)


def _e2e_project(sizes: Sizes, tmp: Path, device: str):
    """A split manifest over synthetic JPEGs in tar shards (train + val) and the Params of one e2e run."""
    import polars as pl

    from pipeline.data import manifest
    from pipeline.data.synthetic import write_jpeg_shards

    n = sizes.e2e_train + sizes.e2e_val
    df = write_jpeg_shards(tmp / "e2e", n, classes=sizes.e2e_classes, processes=os.cpu_count() or 1)
    ids = [f"{i:07d}" for i in range(n)]
    df = df.with_columns(
        pl.Series("image_id", ids),
        pl.format("c{}", pl.col("class_id")).alias("class_name"),
        pl.lit("synthetic").alias("source"),
        pl.Series("group", ids),
        pl.Series("md5", ids),
        pl.lit(320, pl.Int64).alias("width"),
        pl.lit(256, pl.Int64).alias("height"),
        pl.Series("split", ["train"] * sizes.e2e_train + ["val"] * sizes.e2e_val),
    )
    manifest.write(df, tmp / "e2e_split")
    return tmp / "e2e_split" / manifest.MANIFEST, tmp / "e2e"


def _e2e_params(method: str, sizes: Sizes, device: str, compile_: bool = False, decode: str = "cpu"):
    from pipeline.config import Params

    emoji = Path(__file__).resolve().parents[1] / "datasets" / "emoji"
    return Params.model_validate(
        {
            "base": {
                "device": device,
                "threads": os.cpu_count() if device == "cuda" else 1,
                "mlflow_dir": "mlflow",
                "experiment": "e2e",
            },
            "acquire": {"source": "embedded", "embedded": {"path": str(emoji)}},
            "train": {
                "recipe": E2E_RECIPES[method],
                "method": method,
                "model": sizes.model,
                "weights": "none",
                "backbone_cnn": None,
                "img_size": sizes.img_size,
                "batch_size": sizes.batch_size,
                "epochs": sizes.e2e_epochs,
                "precision": "bf16",
                "num_workers": sizes.e2e_workers,
                "decode_cache": False,
                "resume": False,
                "compile": compile_,
                "warmup_steps": 10,
                "decode": decode,
            },
            "variants": {"x": {}},
        }
    )


def engine_step_alone(params, num_classes: int, device) -> float:
    """img/s of the engine's own step (model, optimiser, loss, precision, memory format as train() builds them)
    on one resident batch: what the GPU can do when the input pipeline costs nothing."""
    import torch
    from torch import nn

    from pipeline.data.registry import source_dataset
    from pipeline.models import build_model, model_options
    from pipeline.runtime import time_calls
    from pipeline.training.engine import make_optimizer, train_step, use_channels_last

    cfg = params.train
    model = build_model(
        cfg.method,
        cfg.model,
        num_classes,
        cfg.weights,
        cfg.img_size,
        **model_options(cfg, source_dataset(params.acquire)),
    ).to(device)
    fmt = torch.channels_last if use_channels_last(cfg.method, cfg.backbone_cnn) else torch.contiguous_format
    model = model.to(memory_format=fmt).train(not getattr(model, "frozen_backbone", False))
    optimizer, scheduler = make_optimizer(model, cfg, 1000, device)
    net = torch.compile(model) if cfg.compile else model
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, num_classes, (cfg.batch_size,), device=device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def step():
        train_step(net, x, y, optimizer, loss_fn, device, cfg.precision, cfg.grad_clip)

    time_calls(step, 3, device)
    steps = 10 if device.type == "cuda" else 2
    seconds = sorted(time_calls(step, steps, device) for _ in range(3))[1]
    return steps * cfg.batch_size / seconds


def _e2e_one(
    method: str,
    sizes: Sizes,
    tmp: Path,
    split: Path,
    images: Path,
    device,
    compile_: bool,
    decode: str = "cpu",
    step_ips: float | None = None,
) -> dict:
    """One train() run; `step_ips`: the step alone already measured for this method (the decode path differs only
    in its input pipeline)."""
    import torch

    from pipeline.training.engine import TrainOutputs, train

    params = _e2e_params(method, sizes, device.type, compile_, decode)
    root = tmp / f"run-{method}{'-compile' if compile_ else ''}-{decode}"
    out = TrainOutputs(root / "model", root / "metrics.json", root / "history.csv")
    epochs: list[dict] = []
    t0 = time.perf_counter()
    train(params, split, images, out, root, on_timing=epochs.append, tags={"variant": "x"})
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.empty_cache()
    step_ips = step_ips or engine_step_alone(params, sizes.e2e_classes, device)
    steady = epochs[1:]
    steady_ips = sum(e["images"] for e in steady) / sum(e["train_seconds"] for e in steady)
    steady_s = statistics.mean(e["train_seconds"] for e in steady)
    return {
        "recipe": params.train.recipe,
        "augment": params.train.augment,
        "batch_size": params.train.batch_size,
        "compile": compile_,
        "decode": decode,
        "epoch_seconds": [round(e["train_seconds"], 2) for e in epochs],
        "steady_img_per_s": round(steady_ips, 1),
        "step_alone_img_per_s": round(step_ips, 1),
        "engine_over_step": round(steady_ips / step_ips, 3),
        "first_epoch_over_steady": round(epochs[0]["train_seconds"] / steady_s, 3),
        "wall_seconds": round(wall, 1),
    }


def check_engine_e2e(
    sizes: Sizes, tmp: Path, device, methods=("vit", "glsim", "ila"), compile_methods: tuple[str, ...] = ()
) -> dict:
    """train() end to end per method (plus compiled runs for `compile_methods`), each against its step alone."""
    t0 = time.perf_counter()
    split, images = _e2e_project(sizes, tmp, device.type)
    out: dict = {
        "model": sizes.model,
        "img_size": sizes.img_size,
        "precision": "bf16",
        "train_images": sizes.e2e_train,
        "val_images": sizes.e2e_val,
        "epochs": sizes.e2e_epochs,
        "workers": sizes.e2e_workers,
        "decode_cache": False,
        "format": "JPEG 256x320 in tar shards",
        "write_seconds": round(time.perf_counter() - t0, 1),
    }
    for method in methods:
        out[method] = _e2e_one(method, sizes, tmp, split, images, device, False)
    for method in sizes.e2e_decode_device:  # the same runs with decode and crop on the device (train.decode)
        step = out.get(method, {}).get("step_alone_img_per_s")
        out[f"{method}_decode_device"] = _e2e_one(method, sizes, tmp, split, images, device, False, "device", step)
    for method in compile_methods:
        out[f"{method}_compile"] = _e2e_one(method, sizes, tmp, split, images, device, True)
    return out


# -------------------------------------------------------------------------------------------- sweep, eval, predict


def _emoji_project(root: Path, device: str, sizes: Sizes, n_classes: int = 6):
    """A tiny project on the embedded emoji set (first classes, held-out artist split), as a Params + its paths."""
    import polars as pl

    from pipeline.config import Params
    from pipeline.data import manifest
    from pipeline.data.acquire import acquire
    from pipeline.data.clean import clean
    from pipeline.data.split import split

    emoji = Path(__file__).resolve().parents[1] / "datasets" / "emoji"
    if not (emoji / "index.csv").is_file():
        raise FileNotFoundError(f"the embedded dataset {emoji} is missing (run gpu-check from a project checkout)")
    params = Params.model_validate(
        {
            "base": {"device": device, "threads": 1, "mlflow_dir": "mlflow", "experiment": "gpu-check"},
            "acquire": {"source": "embedded", "embedded": {"path": str(emoji)}},
            "train": {"img_size": 32, "epochs": 1, "batch_size": 16, "warmup_epochs": 0},
            "tune": {
                "space": {"lr": ["grid", 5e-4, 1e-3, 2e-3, 4e-3]},
                "num_samples": 1,
                "epochs": 1,
                "scheduler": "fifo",
                "max_failures": 0,
                "results_dir": str(root / "ray"),
                "resources": {"cpu": sizes.trial_cpu, "gpu": sizes.trial_gpu},
            },
            "variants": {"cnn": {}},
        }
    )
    raw = acquire(params.acquire, root, root / "data/raw")
    keep = sorted(raw["class_name"].unique().to_list())[:n_classes]
    manifest.write(raw.filter(pl.col("class_name").is_in(keep)), root / "data/raw")  # clean re-numbers the ids
    clean(params.clean, root / "data/raw", root / "data/clean")
    df, _ = split(manifest.read(root / "data/clean"), params.split, params.base.seed)
    manifest.write(df, root / "data/split/manifest.parquet")
    return params, root / "data/split/manifest.parquet", root / "data/clean"


def check_sweep(sizes: Sizes, tmp: Path) -> tuple[dict, dict]:
    """(the sweep's figures, what evaluate/predict need: params, split, images, best trial's model folder)."""
    from pipeline import tracking
    from pipeline.tuning.sweep import run_sweep

    root = tmp / "project"
    root.mkdir()
    params, split_file, images = _emoji_project(root, "auto", sizes)
    t0 = time.perf_counter()
    summary = run_sweep(params, split_file, images, root, root / "best_params.yaml", root / "metrics/tune.json")
    seconds = time.perf_counter() - t0
    store = tracking.Store.of(params.base, root)
    runs = store.runs(store.experiment_id(params.base.experiment), "tags.stage = 'tune'")
    trials = [r for r in runs if r.data.tags.get("tune_role") != "parent"]
    out = {
        "trials": summary["trials"],
        "completed": summary["completed"],
        "failed": summary["failed"],
        "gpu_per_trial": sizes.trial_gpu,
        "cpu_per_trial": sizes.trial_cpu,
        "seconds": round(seconds, 1),
        "max_concurrent": _max_overlap([(r.info.start_time, r.info.end_time) for r in trials]),
        "gpu_ids": sorted({r.data.tags.get("tune_gpu_ids", "none") for r in trials}),
        "trial_devices": sorted({r.data.tags.get("device", "?") for r in trials}),
        "mlflow_runs": len(runs),
        "mlflow_trial_runs_finished": sum(r.info.status == "FINISHED" for r in trials),
        "mlflow_uri_kind": tracking.tracking_uri(params.base, root).split(":", 1)[0],
    }
    best = max(trials, key=lambda r: r.data.metrics.get("val_top1", -1.0))
    model_dir = (
        root
        / params.tune.results_dir
        / best.data.tags["tune_sweep"]
        / "trials"
        / best.data.tags["tune_trial_id"]
        / "model"
    )
    return out, {"params": params, "split": split_file, "images": images, "model_dir": model_dir, "root": root}


def _max_overlap(windows: list[tuple[int, int | None]]) -> int:
    events = sorted([(s, 1) for s, _ in windows] + [(e, -1) for _, e in windows if e is not None])
    now = most = 0
    for _, d in events:
        now += d
        most = max(most, now)
    return most


def check_evaluate_predict(ctx: dict, tmp: Path) -> tuple[dict, dict]:
    import polars as pl

    from pipeline.data import manifest
    from pipeline.inference.predict import Predictor
    from pipeline.models import load_checkpoint
    from pipeline.runtime import resolve_device
    from pipeline.training.evaluate import EvalOutputs, evaluate, forward_throughput

    params = ctx["params"]
    device = resolve_device(params.base.device)
    out = EvalOutputs.in_folder(tmp / "eval/metrics.json", tmp / "eval")
    t0 = time.perf_counter()
    metrics = evaluate(params, ctx["split"], ctx["images"], ctx["model_dir"], out, ctx["root"])
    seconds = time.perf_counter() - t0
    test = manifest.read(ctx["split"]).filter(pl.col("split") == "test")
    model, ckpt = load_checkpoint(ctx["model_dir"] / "model.pt", device)
    img_per_s = forward_throughput(model, ckpt["model_spec"]["img_size"], params.evaluate.batch_size, device)
    ev = {
        "device": str(device),
        "test_top1": round(metrics["test_top1"], 4),
        "test_images": metrics["test_images"],
        "test_img_per_s": round(img_per_s, 1),
        "seconds": round(seconds, 1),
    }

    predictor = Predictor(model, ckpt, device, params.clean)
    paths = [ctx["images"] / p for p in test["path"]]
    t0 = time.perf_counter()
    results = [r for i in range(0, len(paths), 32) for r in predictor.predict(paths[i : i + 32], 1)]
    seconds = time.perf_counter() - t0
    by_id = dict(pl.read_csv(out.predictions).select("image_id", "predicted").iter_rows())
    agree = sum(r["top_k"][0]["class_name"] == by_id[i] for r, i in zip(results, test["image_id"]))
    pr = {
        "device": str(next(model.parameters()).device),
        "images": len(results),
        "seconds": round(seconds, 2),
        "img_per_s": round(len(results) / seconds, 1),
        "agrees_with_evaluate": round(agree / len(results), 4),
    }
    return ev, pr


# ---------------------------------------------------------------------------------------------------- the check


# The parts whose CPU figures say nothing about a GPU (listed as needs_gpu in a CPU run's summary).
NEEDS_GPU = (
    "train_step",
    "glsim_vs_vit",
    "ila_vs_frozen_vit",
    "loader.keeps_up",
    "engine_e2e",
    "sweep",
    "evaluate",
    "predict",
)


def run(
    skip_compile: bool = False,
    force_cpu: bool = False,
    peak: float | None = None,
    parts: tuple[str, ...] | None = None,
    json_out: Path | None = None,
) -> dict:
    t_all = time.perf_counter()
    device, peak, summary = _setup(force_cpu, peak)
    cuda = device.type == "cuda"

    def part(key: str, fn):
        t0 = time.perf_counter()
        try:
            summary[key] = fn()
        except Exception as exc:  # noqa: BLE001 - one broken part must not hide the others' figures
            summary[key] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"gpu-check: {key} done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        # a time limit may stop the check later: what is measured stays
        _write_summary(json_out, summary | {"seconds": round(time.perf_counter() - t_all, 1), "partial": True})

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp_name:
        _run_parts(set(parts or ALL_PARTS), part, summary, Path(tmp_name), device, peak, cuda and not skip_compile)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    _write_summary(json_out, summary)
    return summary


def _setup(force_cpu: bool, peak: float | None):
    """The device (CUDA unless forced off), its peak TFLOP/s and the summary's header; TF32 on CUDA, 2 CPU threads."""
    import torch

    cuda = torch.cuda.is_available() and not force_cpu
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else None
    peak = peak or (peak_tflops(name) if name else None)
    if not cuda:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    summary = {
        "device": str(device),
        "gpu": name,
        "cpu_reduced": not cuda,
        "torch": torch.__version__,
        "needs_gpu": [] if cuda else list(NEEDS_GPU),
    }
    return device, peak, summary


def _run_parts(wanted: set, part, summary: dict, tmp: Path, device, peak: float | None, compile_: bool) -> None:
    """Each wanted part in order, through `part` (which records its figures or its error in the summary)."""
    sizes = GPU if device.type == "cuda" else CPU
    if "engine_e2e" in wanted:  # first: the figures issue 20 is about, before any compile can run long
        compiled = ("vit",) if compile_ and "engine_e2e_compile" in wanted else ()
        part("engine_e2e", lambda: check_engine_e2e(sizes, tmp, device, compile_methods=compiled))
    if "train_step" in wanted:
        autotune = "train_step_autotune" in wanted
        part("train_step", lambda: check_train_step(sizes, device, peak, compile_, autotune))
    if "glsim_vs_vit" in wanted:
        part("glsim_vs_vit", lambda: check_ratio("glsim", "vit", sizes, device) | {"paper_ratio": 0.75})
    if "ila_vs_frozen_vit" in wanted:
        compiled = (lambda: check_compiled_steps("ila", sizes, device)) if compile_ else dict
        part("ila_vs_frozen_vit", lambda: check_ratio("ila", "linear", sizes, device) | compiled())
    if "loader" in wanted:
        consumption = (summary.get("train_step") or {}).get("best_img_per_s")
        part("loader", lambda: check_loader(sizes, tmp, consumption))
    if "sweep" in wanted or "evaluate" in wanted:
        ctx: dict = {}

        def sweep():
            figures, found = check_sweep(sizes, tmp)
            ctx.update(found)
            return figures

        part("sweep", sweep)
        if ctx and "evaluate" in wanted:
            pair: dict = {}
            part("evaluate", lambda: pair.setdefault("x", check_evaluate_predict(ctx, tmp))[0])
            summary["predict"] = pair["x"][1] if "x" in pair else {"error": "evaluate failed"}


def _write_summary(path: Path | None, summary: dict) -> None:
    if path is not None:
        from pipeline.io import write_json

        write_json(path, summary)


def add_gpu_check_parser(sub) -> None:
    p = sub.add_parser(
        "gpu-check",
        help="GPU readiness: train-step img/s + MFU, ratios, loader, sweep, eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (progress on stderr)")
    p.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile runs (~1-2 min)")
    p.add_argument("--cpu", action="store_true", help="the reduced CPU form even where CUDA is available")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak for MFU (default: from its name)")
    p.add_argument(
        "--parts",
        help="comma-separated subset: " + ",".join(ALL_PARTS) + " (evaluate includes "
        "predict and needs the sweep; engine_e2e_compile adds a compiled vit to engine_e2e; train_step_autotune adds "
        "torch.compile's max-autotune mode to train_step, minutes of autotuning)",
    )
    p.add_argument("--json-out", type=Path, help="also write the summary to this file, after every part")
    p.set_defaults(fn=_main)


def _main(args: argparse.Namespace) -> int:
    parts = tuple(s.strip() for s in args.parts.split(",")) if args.parts else None
    unknown = [p for p in parts or () if p not in ALL_PARTS + OPT_IN_PARTS]
    if unknown:
        known = ", ".join(ALL_PARTS + OPT_IN_PARTS)
        print(f"gpu-check: --parts: no part named {', '.join(map(repr, unknown))} (parts: {known})", file=sys.stderr)
        return 2
    # Everything the parts print (Ray's trial logs, the stages' progress) goes to stderr, at the file-descriptor
    # level (Ray's log threads and child processes write there too): stdout carries the summary only.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        summary = run(args.skip_compile, args.cpu, args.peak_tflops, parts, args.json_out)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if args.json:
        print(json.dumps(summary))
    else:
        print(json.dumps(summary, indent=2))
    failed = [k for k, v in summary.items() if isinstance(v, dict) and "error" in v]
    if failed:
        print(f"gpu-check: failed parts: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
