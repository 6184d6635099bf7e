"""GLSim: global-local similarity crop selection on a timm ViT (docs/methods.md#glsim).

    feats  = encoder(x)                         last layer, after the final norm (A.2; G.1: the vanilla/checkpoint path)
    sim    = cos(CLS, patch_i)                  (B, N), no gradient (A.1 step 3)
    box    = rows/cols of the top-k patches     paper rule by default (A.3, G.2), `box="corrected"` for (max + 1) * P
    crops  = bilinear resize of x[box] to x's size (align_corners=True, as upsample_bilinear; A.3, G.3)
    feats' = encoder(crops)                     same weights, same CLS token (A.1 step 4)
    logits = head(norm(block([CLS, CLS']))[:, 0])   one random-init ViT block + LayerNorm, zero-init head (A.1 5-7)

Training uses one cross-entropy on the logits (A.1 step 8), so `forward` returns logits only; `forward_with_crops`
also returns the crops and boxes for visualisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pipeline.models.blocks import output_dropout_only

BOX_RULES = ("paper", "corrected")
INITS = ("timm", "paper")


@dataclass
class GLSimOutput:
    logits: torch.Tensor  # (B, C)
    crops: torch.Tensor  # (B, 3, H, W): the crops fed to the second pass, in the input's normalisation
    boxes: torch.Tensor  # (B, 4) long: x0, y0, x1, y1 in input pixels (end exclusive)


TOP_K = 8  # the GLSim repo's `dynamic_top` argparse default (A.2)
DOUBLE_TOP_K = ("dogs",)  # registry names for which both repos double it (Stanford Dogs)


def default_top_k(dataset: str | None = None) -> int:
    """The GLSim repo's rule (build_args.py): 8 at every image size, doubled for Stanford Dogs (16).

    The ILA repo's GLSim re-implementation (fgir_vit build_args.py) also doubles it from img_size 448 up (16 at 448,
    32 for Dogs at 448); set train.glsim_top_k to follow that one. Which rule the GLSim paper's 448 runs used is not
    stated (docs/methods.md#glsim); this follows the paper's own code.
    """
    return 2 * TOP_K if dataset in DOUBLE_TOP_K else TOP_K


def paper_selection_flops(dim: int, n_patches: int) -> int:
    """GLS selection cost as the GLSim paper counts it (Table 1; tools/calc_flops.py): one cosine similarity per patch,
    (D numerator + 2 (D + 1) denominator + 1 division) * N. ViT-B/16: 452,172 = 0.45 MFLOPs at 224, 1.8 M at 448."""
    return (dim + 2 * (dim + 1) + 1) * n_patches


def gls_similarity(feats: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity of the CLS token (index 0) with every patch token: (B, 1 + N, D) -> (B, N).

    Written as normalise-then-matmul so that the N*D multiply-adds show up in torch's FLOP counter (a bmm); the
    normalisation adds about 2*N*D more elementwise FLOPs (the paper counts (3D + 3) * N in total, A.2).
    """
    g = F.normalize(feats[:, :1], dim=-1)
    patches = F.normalize(feats[:, num_prefix_tokens:], dim=-1)
    return (patches @ g.transpose(1, 2)).squeeze(-1)


def boxes_from_indices(
    idx: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int], img_hw: tuple[int, int], rule: str = "paper"
) -> torch.Tensor:
    """Pixel box (x0, y0, x1, y1) covering the rows and columns of the selected patches, batched.

    idx: (B, k) flat indices on the (gh, gw) grid. rule "paper" ends the box at the *start* of the last selected
    row/column (max_index * P), at least one patch tall/wide, as the reference code does (A.3 quirk, G.2); "corrected"
    ends it at (max_index + 1) * P so the last selected patches are inside the box.
    """
    if rule not in BOX_RULES:
        raise ValueError(f"train.glsim_box: unknown rule {rule!r}, expected one of {BOX_RULES}")
    gw = grid[1]
    (ph, pw), (h, w) = patch, img_hw
    rows, cols = idx // gw, idx % gw
    r0, r1 = rows.amin(1), rows.amax(1)
    c0, c1 = cols.amin(1), cols.amax(1)
    y0, x0 = r0 * ph, c0 * pw
    if rule == "paper":
        y1 = torch.clamp(torch.maximum(r1 * ph, y0 + ph), max=h)
        x1 = torch.clamp(torch.maximum(c1 * pw, x0 + pw), max=w)
    else:
        y1 = torch.clamp((r1 + 1) * ph, max=h)
        x1 = torch.clamp((c1 + 1) * pw, max=w)
    return torch.stack([x0, y0, x1, y1], dim=1)


def select_boxes(
    feats: torch.Tensor,
    top_k: int,
    grid: tuple[int, int],
    patch: tuple[int, int],
    img_hw: tuple[int, int],
    rule: str = "paper",
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """The whole GLS selection: similarity, top-k patches, their box; (B, 1 + N, D) tokens -> (B, 4) boxes."""
    sim = gls_similarity(feats, num_prefix_tokens)
    idx = sim.topk(top_k, dim=1).indices
    return boxes_from_indices(idx, grid, patch, img_hw, rule)


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """images[i, :, y0:y1, x0:x1] resized bilinearly (align_corners=True) to out_hw, for the whole batch at once.

    One grid_sample instead of a per-sample slice + interpolate loop: output pixel j samples input pixel
    start + j * (size - 1) / (out - 1), exactly what interpolate(align_corners=True) does on the slice.
    """
    _, _, h, w = images.shape
    oh, ow = out_hw
    b = boxes.to(images.dtype)
    x0, y0, x1, y1 = b.unbind(1)
    ty = torch.linspace(0, 1, oh, device=images.device, dtype=images.dtype)
    tx = torch.linspace(0, 1, ow, device=images.device, dtype=images.dtype)
    ys = y0[:, None] + ty[None] * (y1 - y0 - 1)[:, None]  # (B, oh) input rows
    xs = x0[:, None] + tx[None] * (x1 - x0 - 1)[:, None]  # (B, ow) input columns
    gy = ys * (2 / max(h - 1, 1)) - 1  # align_corners=True: pixel 0 -> -1, pixel size-1 -> +1
    gx = xs * (2 / max(w - 1, 1)) - 1
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)  # (B, oh, ow, [x, y])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _aggregator(vit: VisionTransformer, init: str, drop_path: float, proj_drop: float) -> nn.Sequential:
    """A.1 step 6: one encoder-type block (the encoder's width, heads, MLP ratio and LayerNorm eps) and a LayerNorm."""
    dim = vit.embed_dim
    first = vit.blocks[0]
    eps = getattr(first.norm1, "eps", 1e-6)  # the encoder's LayerNorm eps (train.layer_norm_eps)
    block = Block(
        dim,
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / dim,
        qkv_bias=True,
        proj_drop=proj_drop,
        drop_path=drop_path,
        norm_layer=partial(LayerNorm, eps=eps),
    )
    output_dropout_only([block])
    aggregator = nn.Sequential(block, LayerNorm(dim, eps=eps))
    for m in aggregator.modules():
        if isinstance(m, nn.Linear):
            if init == "paper":  # the authors' init_weights
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)
            else:  # the ViT's own init convention for linear layers
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
    return aggregator


class GLSimViT(nn.Module):
    """Two passes of one timm ViT (full crop + GLS crop), an aggregator over the two CLS tokens, a zero-init head."""

    def __init__(
        self,
        vit: VisionTransformer,
        num_classes: int,
        top_k: int | None = None,
        box: str = "paper",
        *,
        drop_path: float = 0.0,
        proj_drop: float = 0.0,
        init: str = "timm",
        dataset: str | None = None,
    ) -> None:
        """drop_path / proj_drop: the aggregator block's stochastic depth and hidden dropout (the authors build it with
        the encoder's sd and hidden_dropout_prob). init "paper": the authors' init_weights, Xavier-uniform weights and
        N(0, 1e-6) biases for every Linear of the aggregator; "timm": the ViT's trunc-normal(0.02) and zero biases.
        dataset: registry name for the default top-k (default_top_k)."""
        super().__init__()
        if not isinstance(vit, VisionTransformer) or vit.cls_token is None:
            raise ValueError(
                "train.model: glsim needs a timm VisionTransformer with a CLS token (e.g. vit_base_patch16_224)"
            )
        if box not in BOX_RULES:
            raise ValueError(f"train.glsim_box: unknown rule {box!r}, expected one of {BOX_RULES}")
        vit.reset_classifier(0)  # the head sits after the aggregator
        self.vit = vit
        self.pretrained_cfg = vit.pretrained_cfg  # mean/std for the data pipeline (timm.data.resolve_data_config)
        self.grid: tuple[int, int] = tuple(vit.patch_embed.grid_size)
        self.img_hw: tuple[int, int] = tuple(vit.patch_embed.img_size)
        self.patch_px = (self.img_hw[0] // self.grid[0], self.img_hw[1] // self.grid[1])  # "patch_equivalent" (A.3)
        n_patches = self.grid[0] * self.grid[1]
        if top_k is None:
            top_k = min(default_top_k(dataset), n_patches)
        elif top_k > n_patches:
            raise ValueError(f"train.glsim_top_k: {top_k} exceeds the {n_patches} patches at img_size {self.img_hw[0]}")
        self.top_k, self.box = top_k, box
        if init not in INITS:
            raise ValueError(f"train.init: unknown init {init!r}, expected one of {INITS}")
        self.aggregator = _aggregator(vit, init, drop_path, proj_drop)
        self.head = nn.Linear(vit.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # A.1 step 7: zero-initialised head
        nn.init.zeros_(self.head.bias)

    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.no_grad()
    def select(self, feats: torch.Tensor) -> torch.Tensor:
        """GLS selection on final-layer tokens: similarity, top-k, box. No gradient (A.1 step 3)."""
        return select_boxes(
            feats, self.top_k, self.grid, self.patch_px, self.img_hw, self.box, self.vit.num_prefix_tokens
        )

    def forward_with_crops(self, x: torch.Tensor) -> GLSimOutput:
        if tuple(x.shape[-2:]) != self.img_hw:
            raise ValueError(f"glsim was built for {self.img_hw} inputs, got {tuple(x.shape[-2:])}")
        feats = self.vit.forward_features(x)
        boxes = self.select(feats)
        with torch.no_grad():  # the crop is data, not a function to differentiate (as in the reference)
            crops = crop_and_resize(x, boxes, self.img_hw)
        crop_feats = self.vit.forward_features(crops)
        tokens = torch.cat([feats[:, :1], crop_feats[:, :1]], dim=1)  # (B, 2, D): global and crop CLS
        logits = self.head(self.aggregator(tokens)[:, 0])
        return GLSimOutput(logits, crops, boxes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_crops(x).logits


def build(
    vit: VisionTransformer,
    num_classes: int,
    *,
    glsim_top_k: int | None = None,
    glsim_box: str = "paper",
    drop_path_rate: float = 0.0,
    proj_drop_rate: float = 0.0,
    init: str = "timm",
    dataset: str | None = None,
    **_: object,
) -> GLSimViT:
    """The registry's builder (pipeline/methods.py): GLSim over the headless ViT."""
    return GLSimViT(
        vit,
        num_classes,
        top_k=glsim_top_k,
        box=glsim_box,
        drop_path=drop_path_rate,
        proj_drop=proj_drop_rate,
        init=init,
        dataset=dataset,
    )
