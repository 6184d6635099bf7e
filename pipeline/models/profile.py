"""`python -m pipeline profile`: parameters, FLOPs, token counts and measured speed/memory of one model.

    python -m pipeline profile --model vit_base_patch16_224 --method ila --variant ila+ --img-size 224 \
        --num-classes 200 --json

prints one JSON object with params_total, params_trainable, flops, macs, tokens, selection_flops,
selection_flops_paper, img_per_s, peak_mem_mb. FLOPs are counted, not derived from formulas:
torch.utils.flop_counter.FlopCounterMode around one forward at batch 1 (eval mode, no gradients). It counts matmuls,
convolutions and attention, one multiply-add = 2 FLOPs; elementwise ops (norms, activations, softmax, the crop's
bilinear sampling) are not counted. `macs` = flops / 2 is the unit of the papers' tables: their "FLOPs" are
multiply-accumulates from torchprofile. `selection_flops_paper` is GLSim's selection by the paper's own formula,
(D + 2(D + 1) + 1) * N (0.45 M for ViT-B/16 at 224, paper Table 1). `--device meta` counts parameters, FLOPs and
tokens without running anything (no speed or memory).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from pipeline.methods import ILA_VARIANTS, METHOD_NAMES

# torch is imported inside the functions: `python -m pipeline` registers this parser on every call, and a params error
# must not wait for a 3 s torch import.
if TYPE_CHECKING:
    import torch
    from torch import nn

FLOP_NOTE = (
    "torch.utils.flop_counter, forward at batch 1; matmul/conv/attention only; multiply-add = 2 FLOPs; "
    "macs = flops / 2 (the papers' 'FLOPs')"
)


def macs(flops: int | float) -> int | float:
    """Multiply-accumulates of a FLOP count from torch's counter, where every counted op is multiply-adds."""
    return flops // 2 if isinstance(flops, int) else flops / 2


def count_params(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@contextmanager
def explicit_attention(model: nn.Module | None) -> Iterator[None]:
    """Run timm attention unfused while counting: the fused F.scaled_dot_product_attention has a CPU kernel that
    torch's FLOP counter does not count (ViT-B/224 would lose its 1.4 GFLOPs of q@k and attn@v); the unfused path is
    the same math as two counted matmuls, so CPU, CUDA and meta counts agree."""
    fused = [m for m in (model.modules() if model is not None else ()) if getattr(m, "fused_attn", None) is True]
    for m in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in fused:
            m.fused_attn = True


def count_flops(fn, *args: Any) -> int:
    """FLOPs of fn(*args) (a module or a function/bound method) as torch's FLOP counter sees them."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    with (
        explicit_attention(owner if isinstance(owner, nn.Module) else None),
        FlopCounterMode(display=False) as counter,
        torch.no_grad(),
    ):
        fn(*args)
    return int(counter.get_total_flops())


def encoder(model: nn.Module) -> nn.Module | None:
    """The timm VisionTransformer inside a model (itself, or .vit of GLSim/ILA); None for CNNs."""
    inner = getattr(model, "vit", model)
    return inner if hasattr(inner, "blocks") and hasattr(inner, "patch_embed") else None


def encoder_tokens(model: nn.Module, x: torch.Tensor) -> tuple[list[int] | None, int]:
    """Tokens entering each of the encoder's three groups of blocks (ILA's groups, docs/methods.md#ila) during the first
    encoder pass, and the number of encoder passes per forward (2 for GLSim). (None, 0) for CNNs."""
    import torch

    from pipeline.models.ila import group_starts

    vit = encoder(model)
    if vit is None:
        return None, 0
    starts = group_starts(len(vit.blocks))
    seen: dict[int, list[int]] = {i: [] for i in starts}
    hooks = [
        vit.blocks[i].register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].shape[1])) for i in starts
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [seen[i][0] for i in starts], len(seen[0])


def selection_flops_paper(model: nn.Module) -> int | None:
    """GLSim's selection cost by the paper's formula (glsim.paper_selection_flops) for this model's D and N."""
    if not hasattr(model, "select"):
        return None
    from pipeline.models.glsim import paper_selection_flops

    return paper_selection_flops(model.vit.embed_dim, model.grid[0] * model.grid[1])


def selection_flops(model: nn.Module, x: torch.Tensor) -> int | None:
    """FLOPs of GLSim's selection alone (similarity + top-k + box), on real final-layer features of x."""
    if not hasattr(model, "select"):
        return None
    import torch

    with torch.no_grad():
        feats = model.vit.forward_features(x)
    return count_flops(model.select, feats)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_throughput(
    model: nn.Module, img_size: int, batch_size: int, device: torch.device, warmup: int = 2, iters: int = 5
) -> tuple[float, float]:
    """(images/s, peak memory MB) of forward passes at batch_size after warm-up.

    Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the process's peak RSS during the
    passes (an upper bound on the activations; 0 when an earlier step already reached a higher peak).
    """
    import torch

    with torch.inference_mode():
        return _throughput(model, img_size, batch_size, device, warmup, iters)


def _throughput(
    model: nn.Module, img_size: int, batch_size: int, device: torch.device, warmup: int, iters: int
) -> tuple[float, float]:
    import torch

    from pipeline.runtime import synchronize, time_calls

    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    cuda = device.type == "cuda"
    synchronize(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _rss_mb()
    time_calls(lambda: model(x), warmup, device)
    seconds = time_calls(lambda: model(x), iters, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _rss_mb() - rss0
    return batch_size * iters / seconds, peak


def profile(
    method: str,
    model_name: str,
    img_size: int,
    num_classes: int,
    *,
    variant: str | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    warmup: int = 2,
    iters: int = 5,
    weights: str = "none",
    **options: Any,
) -> dict[str, Any]:
    """Build (method, model_name) like training does and profile it; see the module docstring for the fields.

    options: build_model keyword options (patch_size, backbone_cnn, glsim_top_k, glsim_box, dataset). variant: the ILA
    variant (ila | ila+ | ila++). device "meta" counts without running (img_per_s and peak_mem_mb are None).
    """
    import torch

    from pipeline.models.factory import build_model

    if variant is not None:
        if method != "ila":
            raise ValueError(f"--variant applies to --method ila, not {method!r}")
        options["ila_variant"] = variant
    dev = torch.device(device)
    with torch.device("meta") if dev.type == "meta" else nullcontext():
        model = build_model(method, model_name, num_classes, weights, img_size, **options)
    model = model.to(dev).eval()
    total, trainable = count_params(model)
    result: dict[str, Any] = {
        "model": model_name,
        "method": method,
        "variant": getattr(model, "variant", None),
        "img_size": img_size,
        "num_classes": num_classes,
        "device": str(dev),
        "params_total": total,
        "params_trainable": trainable,
    }
    img_per_s = peak_mb = None
    if dev.type != "meta":  # measured first, so the peak-RSS delta is not hidden by the later single-image passes
        img_per_s, peak_mb = measure_throughput(model, img_size, batch_size, dev, warmup, iters)
    result |= _counts(model, img_size, dev)
    result |= {
        "img_per_s": None if img_per_s is None else round(img_per_s, 2),
        "peak_mem_mb": None if peak_mb is None else round(peak_mb, 1),
        "batch_size": batch_size,
    }
    return result


def _counts(model: nn.Module, img_size: int, device: torch.device) -> dict[str, Any]:
    """FLOPs, MACs, tokens and encoder passes of one image (any device, meta included)."""
    import torch

    x = torch.randn(1, 3, img_size, img_size, device=device)
    tokens, passes = encoder_tokens(model, x)
    flops = count_flops(model, x)
    return {
        "flops": flops,
        "macs": macs(flops),
        "flops_counter": FLOP_NOTE,
        "tokens": tokens,
        "encoder_passes": passes,
        "selection_flops": selection_flops(model, x),
        "selection_flops_paper": selection_flops_paper(model),
    }


def add_profile_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `profile` on the pipeline CLI's subparsers; the handler is args.fn(args) -> exit code."""
    p = sub.add_parser(
        "profile",
        help="parameters, FLOPs, tokens, throughput and peak memory of one model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="timm model name, e.g. vit_base_patch16_224")
    p.add_argument("--method", required=True, choices=METHOD_NAMES)
    p.add_argument("--variant", choices=ILA_VARIANTS, help="ILA variant (method ila; default ila)")
    p.add_argument("--img-size", type=int, required=True)
    p.add_argument("--num-classes", type=int, required=True)
    p.add_argument("--weights", default="none", help="as train.weights (default none: random, same cost)")
    p.add_argument("--patch-size", type=int, help="as train.patch_size")
    p.add_argument("--backbone-cnn", help="as train.backbone_cnn (hybrid ViT over this CNN's features)")
    p.add_argument("--top-k", type=int, dest="glsim_top_k", help="as train.glsim_top_k")
    p.add_argument(
        "--box", choices=("paper", "corrected"), default="paper", dest="glsim_box", help="as train.glsim_box"
    )
    p.add_argument("--dataset", help="registry name of the data (glsim's default top-k doubles for dogs)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | meta (count only, no measurement)")
    p.add_argument("--batch-size", type=int, default=8, help="images per timed forward (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed forwards first (default 2)")
    p.add_argument("--iters", type=int, default=5, help="timed forwards (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    options = {"patch_size": args.patch_size, "backbone_cnn": args.backbone_cnn}
    if args.method == "glsim":
        options |= {"glsim_top_k": args.glsim_top_k, "glsim_box": args.glsim_box, "dataset": args.dataset}
    result = profile(
        args.method,
        args.model,
        args.img_size,
        args.num_classes,
        variant=args.variant,
        device=device,
        batch_size=args.batch_size,
        warmup=args.warmup,
        iters=args.iters,
        weights=args.weights,
        **options,
    )
    if args.json:
        print(json.dumps(result))
    else:
        width = max(map(len, result))
        print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m pipeline.models.profile ...`), same flags as `python -m pipeline profile`."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.models.profile")
    add_profile_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["profile", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.fn(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
