"""`predict --explain DIR` for GLSim checkpoints: where the model looked, per image.

Two PNGs per image: `<name>.gls.png`, a figure with the model input, the CLS-to-patch cosine similarity that GLSim
ranks patches by (overlaid, with the selected top-k patches and their box), and the crop the second pass saw; and
`<name>.crop.png`, that crop alone at the model's resolution (<name>: the image's stem, numbered -2, -3, ... when
inputs share it; files of a previous run with the same names are replaced). Written atomically (pipeline/io.py), so
an interrupted run leaves complete files or none.

Only GLSim has a selection to show; `predict` refuses --explain for other methods before it predicts anything.

The evaluate stage keeps the same data for a few test images (write_samples), and the report draws them with
draw_selection, so the report shows GLSim's selection without running a model.
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


def save(
    stem: Path,
    image: np.ndarray,
    crop: np.ndarray,
    sim: np.ndarray,
    idx: np.ndarray,
    box: list[int],
    model: GLSimViT,
    title: str,
) -> dict[str, str]:
    """Write `<stem>.gls.png` (figure) and `<stem>.crop.png`; returns their paths by kind."""
    figure, crop_png = stem.with_name(stem.name + ".gls.png"), stem.with_name(stem.name + ".crop.png")
    fig = _figure(image, crop, sim, idx, box, model.patch_px, model.box, title)
    with atomic_path(figure) as tmp:
        fig.savefig(tmp, format="png", dpi=100)  # format given: the temporary name ends in .tmp
    with atomic_path(crop_png) as tmp:
        Image.fromarray(np.round(crop * 255).astype(np.uint8)).save(tmp, format="PNG")
    return {"figure": str(figure), "crop": str(crop_png)}


@torch.inference_mode()
def write_samples(
    path: Path,
    model: torch.nn.Module,
    dataset,
    picks: np.ndarray,
    image_ids: list,
    classes: list[str],
    predicted: np.ndarray,
    confidence: np.ndarray,
    data_config: dict,
    device: torch.device,
) -> None:
    """An .npz of dataset items `picks` as the model saw them: image (N, H, W, 3) uint8, image_id, actual, and the
    caller's predicted class index and confidence for them; for GLSim also crop, similarity (N, gh, gw), selected
    (N, k), box (N, 4: x0 y0 x1 y1), patch_px, box_rule (the only reason to run the model here). Plain arrays only:
    np.load(path, allow_pickle=False) reads it."""
    mean, std = data_config["mean"], data_config["std"]
    arrays: dict[str, np.ndarray] = {"image_id": np.array([str(image_ids[i]) for i in picks], dtype=str)}
    if len(picks):
        x = torch.stack([dataset[int(i)][0] for i in picks]).to(device)
        arrays |= {
            "image": _uint8([to_image(t, mean, std) for t in x]),
            "actual": np.array([classes[dataset.labels[int(i)]] for i in picks], dtype=str),
            "predicted": np.array([classes[int(p)] for p in predicted], dtype=str),
            "confidence": np.asarray(confidence, dtype=np.float32),
        }
        if isinstance(model, GLSimViT):
            out = model.forward_with_crops(x)
            sim, idx = similarity_maps(model, x)
            arrays |= {
                "crop": _uint8([to_image(t, mean, std) for t in out.crops]),
                "similarity": sim.float().cpu().numpy(),
                "selected": idx.cpu().numpy(),
                "box": out.boxes.cpu().numpy().astype(np.int64),
                "patch_px": np.array(model.patch_px),
                "box_rule": np.array(model.box),
            }
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez_compressed(f, **arrays)


def _uint8(images: list[np.ndarray]) -> np.ndarray:
    return np.round(np.stack(images) * 255).astype(np.uint8)


def _figure(
    image: np.ndarray,
    crop: np.ndarray,
    sim: np.ndarray,
    idx: np.ndarray,
    box: list[int],
    patch_px: tuple[int, int],
    rule: str,
    title: str,
) -> Figure:
    h, w = image.shape[:2]
    fig = Figure(figsize=(12.5, 4.8), layout="constrained")  # constrained: titles and colour bar never clipped
    fig.suptitle(title)
    axes = fig.subplots(1, 3)
    # Two-line titles: constrained layout makes room for their height, but not for a title wider than its axes.
    axes[0].set_title(f"model input\n{w}x{h} px, after the evaluation transform")
    heat = draw_selection(axes, image, crop, sim, idx, box, patch_px, rule)
    axes[1].set_title("CLS-patch cosine similarity\nselected patches and their box")
    fig.colorbar(heat, ax=axes[1], shrink=0.8, label="cos(CLS, patch)")
    x0, y0, x1, y1 = box
    axes[2].set_title(f"crop of {x1 - x0}x{y1 - y0} px\nresized to {w}x{h} for the second pass")
    return fig


def draw_selection(
    axes,
    image: np.ndarray,
    crop: np.ndarray,
    sim: np.ndarray,
    idx: np.ndarray,
    box,
    patch_px: tuple[int, int],
    rule: str,
    legend: bool = True,
):
    """Three axes: the model input; the input under the similarity map with the top-k patches and their box; the
    crop. Returns the heat-map image (for a colour bar). Titles are the caller's."""
    h, w = image.shape[:2]
    gw = sim.shape[1]
    x0, y0, x1, y1 = (int(v) for v in box)
    axes[0].imshow(image)
    axes[1].imshow(image)
    # Pixel-centred extent as imshow gives the image itself, so patch cells line up with the pixels they cover.
    heat = axes[1].imshow(
        sim, cmap="inferno", alpha=0.6, interpolation="nearest", extent=(-0.5, w - 0.5, h - 0.5, -0.5)
    )
    rows, cols = idx // gw, idx % gw
    axes[1].scatter(
        (cols + 0.5) * patch_px[1] - 0.5,
        (rows + 0.5) * patch_px[0] - 0.5,
        s=18,
        c="cyan",
        edgecolors="black",
        linewidths=0.5,
        label=f"top-{len(idx)} patches",
    )
    axes[1].add_patch(
        Rectangle(
            (x0 - 0.5, y0 - 0.5),
            x1 - x0,
            y1 - y0,
            fill=False,
            edgecolor="lime",
            linewidth=2,
            label=f"GLS box ({rule} rule)",
        )
    )
    if legend:
        axes[1].legend(loc="lower right", fontsize=8, framealpha=0.8)
    axes[2].imshow(crop)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return heat
