"""`predict --explain DIR` for GLSim checkpoints: where the model looked, per image.

Two PNGs per image: `<name>.gls.png`, a figure with the model input, the CLS-to-patch cosine similarity that GLSim
ranks patches by (overlaid, with the selected top-k patches and their box), and the crop the second pass saw; and
`<name>.crop.png`, that crop alone at the model's resolution (<name>: the image's stem, numbered -2, -3, ... when
inputs share it; files of a previous run with the same names are replaced). Written atomically (pipeline/io.py), so
an interrupted run leaves complete files or none.

Only GLSim has a selection to show; `predict` refuses --explain for other methods before it predicts anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure  # object-oriented: no pyplot, no global backend switch
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline.io import atomic_path
from pipeline.models.glsim import GLSimViT, gls_similarity


@torch.inference_mode()
def similarity_maps(model: GLSimViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, gh, gw) cosine similarity of CLS with each patch on the first pass, and the (B, k) selected indices.

    The same final-layer tokens and top-k rule that GLSimViT.select uses, recomputed here because the forward pass
    returns only logits, crops and boxes (an extra encoder pass, paid only with --explain).
    """
    feats = model.vit.forward_features(x)
    sim = gls_similarity(feats, model.vit.num_prefix_tokens)
    idx = sim.topk(model.top_k, dim=1).indices
    return sim.reshape(len(x), *model.grid), idx


def to_image(t: torch.Tensor, mean: list[float], std: list[float]) -> np.ndarray:
    """A normalised (3, H, W) model input back to an (H, W, 3) float image in 0..1."""
    arr = t.float().cpu().numpy().transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)
    return np.clip(arr, 0.0, 1.0)


def save(stem: Path, image: np.ndarray, crop: np.ndarray, sim: np.ndarray, idx: np.ndarray,
         box: list[int], model: GLSimViT, title: str) -> dict[str, str]:
    """Write `<stem>.gls.png` (figure) and `<stem>.crop.png`; returns their paths by kind."""
    figure, crop_png = stem.with_name(stem.name + ".gls.png"), stem.with_name(stem.name + ".crop.png")
    fig = _figure(image, crop, sim, idx, box, model.patch_px, model.box, title)
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # format given: the temporary name ends in .tmp
    with atomic_path(crop_png) as tmp:
        Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(tmp, format="PNG")
    return {"figure": str(figure), "crop": str(crop_png)}


def _figure(image: np.ndarray, crop: np.ndarray, sim: np.ndarray, idx: np.ndarray, box: list[int],
            patch_px: tuple[int, int], rule: str, title: str) -> Figure:
    h, w = image.shape[:2]
    gw = sim.shape[1]
    x0, y0, x1, y1 = box
    fig = Figure(figsize=(12.5, 4.8), layout="constrained")  # constrained: titles and colour bar never clipped
    fig.suptitle(title)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image)
    # Two-line titles: constrained layout makes room for their height, but not for a title wider than its axes.
    axes[0].set_title(f"model input\n{w}x{h} px, after the evaluation transform")
    axes[1].imshow(image)
    # Pixel-centred extent as imshow gives the image itself, so patch cells line up with the pixels they cover.
    heat = axes[1].imshow(sim, cmap="inferno", alpha=0.6, interpolation="nearest",
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    rows, cols = idx // gw, idx % gw
    axes[1].scatter((cols + 0.5) * patch_px[1] - 0.5, (rows + 0.5) * patch_px[0] - 0.5, s=18, c="cyan",
                    edgecolors="black", linewidths=0.5, label=f"top-{len(idx)} patches")
    axes[1].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=2,
                                label=f"GLS box ({rule} rule)"))
    axes[1].set_title("CLS-patch cosine similarity\nselected patches and their box")
    axes[1].legend(loc="lower right", fontsize=8, framealpha=0.8)
    fig.colorbar(heat, ax=axes[1], shrink=0.8, label="cos(CLS, patch)")
    axes[2].imshow(crop)
    axes[2].set_title(f"crop of {x1 - x0}x{y1 - y0} px\nresized to {w}x{h} for the second pass")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig
