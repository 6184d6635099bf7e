"""`python -m pipeline bench`: training-step throughput of our engine against a plain reference loop.

Both sides train the same timm architecture on the same synthetic batch, with the same threads and precision, in
one process. Ours is `engine.train_step` with the model, optimiser, loss and memory format (channels_last for CNNs)
the engine uses; the reference is the textbook loop (timm.create_model, torch.optim.AdamW, zero_grad/backward/step).
Rounds alternate between the two, each side first in every other round, so that machine noise (other processes,
turbo clocks, warm caches) hits both alike; the median per round is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from pipeline import methods

# torch and timm are imported inside run(): building the CLI parser must stay light (no 3 s torch import).


def run(
    model_name: str,
    method: str,
    img_size: int,
    batch_size: int,
    num_classes: int = 100,
    steps: int = 5,
    rounds: int = 3,
    warmup: int = 2,
    precision: str = "fp32",
    device: str = "auto",
    threads: int = 2,
    optimizer: str = "adamw",
) -> dict:
    import torch
    from torch import nn

    from pipeline.runtime import resolve_device, time_calls

    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev)
    y = torch.randint(0, num_classes, (batch_size,), device=dev)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    ours_step = _ours(model_name, method, img_size, num_classes, optimizer, precision, x, y, loss_fn, dev)
    ref_step = _reference(model_name, method, img_size, num_classes, precision, x, y, loss_fn, dev)
    for step in (ours_step, ref_step):
        time_calls(step, warmup, dev)
    ours_s, ref_s = [], []
    for r in range(rounds):
        # ABBA order: whichever side runs second in a round inherits the first's warm caches and allocator state,
        # so each side goes first in every other round.
        pair = ((ours_step, ours_s), (ref_step, ref_s))
        for step, times in pair if r % 2 == 0 else pair[::-1]:
            times.append(time_calls(step, steps, dev))
    ours_ips = steps * batch_size / statistics.median(ours_s)
    ref_ips = steps * batch_size / statistics.median(ref_s)
    if methods.get(method).compared_with_vit:
        note = "reference is the plain timm ViT of the same backbone (GLSim runs the encoder twice)"
    else:
        note = "same architecture"
    return {
        "model": model_name,
        "method": method,
        "img_size": img_size,
        "batch_size": batch_size,
        "precision": precision,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "steps": steps,
        "rounds": rounds,
        "ours_img_per_s": round(ours_ips, 2),
        "reference_img_per_s": round(ref_ips, 2),
        "ratio": round(ours_ips / ref_ips, 3),
        "note": note,
    }


def _ours(
    model_name: str, method: str, img_size: int, num_classes: int, optimizer: str, precision: str, x, y, loss_fn, dev
):
    """One step of our engine: build_model, the engine's memory format, timm's optimizer, engine.train_step."""
    import torch
    from timm.optim import create_optimizer_v2

    from pipeline.models import build_model
    from pipeline.training.engine import train_step, use_channels_last

    ours = build_model(method, model_name, num_classes, "none", img_size).to(dev).train()
    ours_x = x
    if use_channels_last(method):  # as the engine trains it
        ours = ours.to(memory_format=torch.channels_last)
        ours_x = x.contiguous(memory_format=torch.channels_last)
    ours_opt = create_optimizer_v2(
        [p for p in ours.parameters() if p.requires_grad], opt=optimizer, lr=1e-4, weight_decay=0.05, foreach=True
    )

    def ours_step():
        train_step(ours, ours_x, y, ours_opt, loss_fn, dev, precision)

    return ours_step


def _reference(model_name: str, method: str, img_size: int, num_classes: int, precision: str, x, y, loss_fn, dev):
    """One step of the textbook loop on the same timm architecture."""
    import timm
    import torch

    from pipeline.runtime import autocast

    kwargs = {"img_size": img_size} if method == "vit" or methods.get(method).needs_vit else {}
    ref = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs).to(dev).train()
    if method == "linear":
        for p in ref.parameters():
            p.requires_grad = False
        for p in ref.get_classifier().parameters():
            p.requires_grad = True
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)

    def ref_step():
        ref_opt.zero_grad()
        with autocast(dev, precision):
            loss = loss_fn(ref(x), y)
        loss.backward()
        ref_opt.step()

    return ref_step


def add_bench_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="training-step img/s: our engine vs a plain reference loop; `bench loader`: "
        "one worker's img/s per recipe vs decode + resize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "what",
        nargs="?",
        default="step",
        choices=["step", "loader"],
        help="step (default): the training step; loader: the data loader's CPU work per worker",
    )
    p.add_argument("--images", type=int, default=96, help="loader: synthetic JPEGs per pass")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name")
    p.add_argument("--method", default="cnn", help="cnn | vit | linear | glsim | ila")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=_main)


def _main(args: argparse.Namespace) -> int:
    if args.what == "loader":
        return _main_loader(args)
    r = run(
        args.model,
        args.method,
        args.img_size,
        args.batch_size,
        args.num_classes,
        args.steps,
        args.rounds,
        precision=args.precision,
        device=args.device,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(r))
    else:
        print(
            f"{r['method']}/{r['model']} {r['img_size']}px batch {r['batch_size']} {r['precision']} on "
            f"{r['device']} ({r['threads']} threads): ours {r['ours_img_per_s']} img/s, reference "
            f"{r['reference_img_per_s']} img/s, ratio {r['ratio']}",
            file=sys.stdout,
        )
    return 0


def _main_loader(args: argparse.Namespace) -> int:
    from pipeline.training import loader_bench

    size = args.img_size if args.img_size != 96 else 224  # the loader's default is the papers' 224
    r = loader_bench.run(images=args.images, img_size=size, rounds=args.rounds)
    if args.json:
        print(json.dumps(r))
        return 0
    print(
        f"one worker, {r['images']} JPEGs (256x320, tar shards) -> {r['img_size']} px, median of {r['rounds']} rounds:"
    )
    for name, ips in r["img_per_s_per_worker"].items():
        ratio = r["ratio"].get(name)
        print(f"  {name:<20} {ips:8.1f} img/s" + (f"   ratio {ratio:.3f} (to its decode + resize)" if ratio else ""))
    return 0
