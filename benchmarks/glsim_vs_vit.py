"""Benchmark: forward throughput of ViT, GLSim and ILA on one backbone, in one run.

GLSim runs the encoder twice (full image + crop), so it should land near half the ViT's images/s; ILA shrinks the
token grid of the last two encoder groups, so it should be faster than the ViT (docs/methods.md#glsim, #ila).
Models are built with random weights (speed does not depend on them). Rounds alternate the models so that load from
other processes on the machine hits all of them alike; the best round of each model is reported.

    python benchmarks/glsim_vs_vit.py                                  # CPU, 2 threads, vit_small_patch16_224
    python benchmarks/glsim_vs_vit.py --model vit_base_patch16_224 --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import build_model  # noqa: E402
from pipeline.models.profile import count_flops, measure_throughput  # noqa: E402

MODELS = (
    ("vit", "vit", {}),
    ("glsim", "glsim", {}),
    ("ila", "ila", {"ila_variant": "ila"}),
    ("ila+", "ila", {"ila_variant": "ila+"}),
    ("ila++", "ila", {"ila_variant": "ila++"}),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_small_patch16_224", help="timm ViT shared by all methods")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; the best is kept")
    ap.add_argument("--iters", type=int, default=3, help="timed forwards per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed forwards per round")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: CUDA is not available on this machine")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    models = {
        name: build_model(method, args.model, 200, "none", args.img_size, **opts).to(device).eval()
        for name, method, opts in MODELS
    }
    x1 = torch.randn(1, 3, args.img_size, args.img_size, device=device)
    flops = {name: count_flops(m, x1) for name, m in models.items()}
    best = dict.fromkeys(models, 0.0)
    for _ in range(args.rounds):
        for name, model in models.items():
            ips, _ = measure_throughput(model, args.img_size, args.batch_size, device, args.warmup, args.iters)
            best[name] = max(best[name], ips)

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"{args.model} at {args.img_size}px, batch {args.batch_size}, forward only, {where}, torch {torch.__version__}"
    )
    print(f"{'method':<8} {'img/s':>9} {'vs vit':>7} {'GFLOPs':>8} {'vs vit':>7}")
    for name in models:
        print(
            f"{name:<8} {best[name]:>9.2f} {best[name] / best['vit']:>7.2f} {flops[name] / 1e9:>8.2f} "
            f"{flops[name] / flops['vit']:>7.3f}"
        )
    ratio = best["glsim"] / best["vit"]
    print(
        f"\nGLSim/ViT throughput ratio: {ratio:.2f} (GLSim runs the encoder twice; FLOP ratio "
        f"{flops['glsim'] / flops['vit']:.3f}). FLOPs: torch FLOP counter, batch 1, multiply-add = 2."
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": args.model,
                    "img_size": args.img_size,
                    "device": where,
                    "batch_size": args.batch_size,
                    "img_per_s": best,
                    "flops": flops,
                    "glsim_vit_ratio": ratio,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
