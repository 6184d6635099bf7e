"""ILA: down-sampling inter-layer adapters on a frozen timm ViT (docs/methods.md#ila).

A frozen ViT's 12 blocks form 3 groups of 4; a down-sampling ILA after blocks 3 and 7 shrinks the token grid with an
unpadded 3x3 depthwise conv (14x14 -> 12x12 -> 10x10 at 224, so the groups see 197, 145 and 101 tokens, C.2).
Variants (C.4, mapped to code flags by the reference's parameter-count arithmetic):

    ila    2 down-sampling ILAs                                         +40,496 trainable (ViT-B, r = 8)
    ila+   2 down-sampling ILAs + a plain ILA after every other block   +173,856
    ila++  2 down-sampling ILAs + 2 bottleneck adapters per block       +354,032

Trainable: the head, the CLS token, the ILAs and the adapters (their BatchNorms included); everything else is frozen.
The ViT's blocks are wrapped in place, so timm's forward, forward_head and get_classifier still apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from pipeline.methods import ILA_VARIANTS

VARIANTS = ILA_VARIANTS  # ila, ila+, ila++ (the method registry, pipeline/methods.py)
INITS = ("timm", "paper")
BOTTLENECK = 8  # r: adapter_dim of the reference code (C.2, C.3)
DROP = 0.1  # hidden_dropout_prob of the reference, applied to the ILA and adapter branches (C.2, C.3)


def _square_grid(n_patches: int) -> int:
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"ILA needs a square token grid, got {n_patches} patch tokens")
    return side


class ILAdapter(nn.Module):
    """One inter-layer adapter on (B, 1 + H*W, D) tokens, CLS first (C.2).

    SDS branch: Linear D->r, BN, GELU; patch tokens -> 3x3 depthwise conv (unpadded when down-sampling), BN, GELU,
    1x1 conv; the CLS token -> its own 1x1 conv; BN, GELU, Linear r->D. Output: residual + Dropout(SDS).
    The residual (RSDS) of a down-sampling ILA is a bias-free 3x3 depthwise conv over all D channels whose weights start
    near one (N(1, 0.001)), so each output token starts as roughly the sum of its 9 neighbours; the CLS token passes
    through unchanged. A plain ILA pads its conv (grid unchanged) and its residual is the identity.
    """

    def __init__(self, dim: int, downsample: bool, bottleneck: int = BOTTLENECK, drop: float = DROP) -> None:
        super().__init__()
        self.downsample = downsample
        pad = 0 if downsample else 1
        self.down = nn.Linear(dim, bottleneck)
        self.norm1 = nn.BatchNorm1d(bottleneck)
        self.dwconv = nn.Conv2d(bottleneck, bottleneck, 3, padding=pad, groups=bottleneck)
        self.norm2 = nn.BatchNorm2d(bottleneck)
        self.pwconv = nn.Conv2d(bottleneck, bottleneck, 1)
        self.cls_conv = nn.Conv2d(bottleneck, bottleneck, 1)
        self.norm3 = nn.BatchNorm1d(bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(drop)
        self.rsds = nn.Conv2d(dim, dim, 3, groups=dim, bias=False) if downsample else None
        for lin in (self.down, self.up):  # C.2: both Linear layers Xavier-uniform, biases zero
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.rsds is not None:
            nn.init.normal_(self.rsds.weight, mean=1.0, std=0.001)  # "near-one" init (C.2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, n, d = z.shape
        side = _square_grid(n - 1)
        h = F.gelu(self.norm1(self.down(z).transpose(1, 2)))  # (B, r, N): channels first for BatchNorm1d
        cls, patches = h[:, :, :1], h[:, :, 1:].reshape(b, -1, side, side)
        patches = self.pwconv(F.gelu(self.norm2(self.dwconv(patches)))).flatten(2)  # (B, r, N'), N' < N - 1
        cls = self.cls_conv(cls.unsqueeze(-1)).flatten(2)  # a 1x1 conv on the CLS token alone: (B, r, 1)
        sds = self.drop(self.up(F.gelu(self.norm3(torch.cat([cls, patches], dim=2))).transpose(1, 2)))
        if self.rsds is None:
            return z + sds
        grid = z[:, 1:].transpose(1, 2).reshape(b, d, side, side)
        return torch.cat([z[:, :1], self.rsds(grid).flatten(2).transpose(1, 2)], dim=1) + sds


class BottleneckAdapter(nn.Module):
    """Linear D->r, GELU, Linear r->D (Xavier weights, zero biases), scale 1 (C.3)."""

    def __init__(self, dim: int, bottleneck: int = BOTTLENECK, drop: float = DROP) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(drop)
        for lin in (self.down, self.up):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.up(F.gelu(self.down(x))))


class AdaptedBlock(nn.Module):
    """A timm ViT Block with adapters parallel to attention and MLP, both fed the block's normed input (C.3):
    x = x + attn(LN1 x) + A_attn(LN1 x);  x = x + mlp(LN2 x) + A_mlp(LN2 x)."""

    def __init__(self, block: Block, dim: int) -> None:
        super().__init__()
        self.block = block
        self.adapter_attn = BottleneckAdapter(dim)
        self.adapter_mlp = BottleneckAdapter(dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        b = self.block
        h = b.norm1(x)
        x = x + b.drop_path1(b.ls1(b.attn(h, attn_mask=attn_mask, is_causal=is_causal))) + self.adapter_attn(h)
        h = b.norm2(x)
        return x + b.drop_path2(b.ls2(b.mlp(h))) + self.adapter_mlp(h)


class BlockWithILA(nn.Module):
    """A block followed by an ILA (between blocks: an "inter-layer" adapter)."""

    def __init__(self, block: nn.Module, ila: ILAdapter) -> None:
        super().__init__()
        self.block = block
        self.ila = ila

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("ILA changes the token count between blocks; an attention mask cannot follow it")
        return self.ila(self.block(x, is_causal=is_causal))


def downsample_locations(depth: int) -> tuple[int, int]:
    """After blocks 3 and 7 of 12 (C.1): the last blocks of the first two of three equal encoder groups."""
    if depth < 3:
        raise ValueError(f"train.model: ILA needs at least 3 transformer blocks, got {depth}")
    return depth // 3 - 1, 2 * depth // 3 - 1


def group_starts(depth: int) -> tuple[int, int, int]:
    """First block of each of the three encoder groups (where C.2's token counts are measured)."""
    a, b = downsample_locations(depth)
    return 0, a + 1, b + 1


def _param_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


class ILAViT(nn.Module):
    """A frozen timm VisionTransformer with ILAs (and, for ila++, parallel adapters); forward returns logits."""

    def __init__(self, vit: VisionTransformer, variant: str = "ila", init: str = "timm") -> None:
        """init "paper": the new layers as the authors' code leaves them (paper_init); "timm": as built here (Xavier
        Linear weights with zero biases in the adapters, PyTorch's default convs, timm's head)."""
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"train.ila_variant: unknown variant {variant!r}, expected one of {VARIANTS}")
        if init not in INITS:
            raise ValueError(f"train.init: unknown init {init!r}, expected one of {INITS}")
        if not isinstance(vit, VisionTransformer) or vit.cls_token is None or vit.num_prefix_tokens != 1:
            raise ValueError(
                "train.model: ila needs a timm VisionTransformer with exactly one CLS token and no "
                "register tokens (e.g. vit_base_patch16_224)"
            )
        if not all(isinstance(b, Block) for b in vit.blocks):
            raise ValueError("train.model: ila needs timm's standard ViT Block in every layer")
        depth, dim = len(vit.blocks), vit.embed_dim
        grid = min(vit.patch_embed.grid_size)
        if grid < 5:  # two unpadded 3x3 convs remove 4 from each side
            raise ValueError(
                f"train.img_size: {vit.patch_embed.img_size[0]} gives a {grid}x{grid} token grid; the "
                f"two down-sampling ILAs need at least 5x5 (img_size >= 5 x patch size)"
            )
        self.variant = variant
        self.vit = vit
        self.pretrained_cfg = vit.pretrained_cfg  # mean/std for the data pipeline (timm.data.resolve_data_config)
        ds = set(downsample_locations(depth))
        for i in range(depth):
            block: nn.Module = vit.blocks[i]
            if variant == "ila++":
                block = AdaptedBlock(block, dim)
            if i in ds:
                block = BlockWithILA(block, ILAdapter(dim, downsample=True))
            elif variant == "ila+":
                block = BlockWithILA(block, ILAdapter(dim, downsample=False))
            vit.blocks[i] = block
        if init == "paper":
            self.paper_init()
        self._freeze()

    @torch.no_grad()
    def paper_init(self) -> None:
        """The authors' init of what ILA adds: ILAdapter.init_weights gives the 3x3 depthwise, 1x1 and CLS convs
        Xavier-uniform weights (their biases keep PyTorch's default); then ViT.init_weights gives every Linear, the
        adapters' and the head's, Xavier-uniform weights and N(0, 1e-6) biases. RSDS keeps its near-one init."""
        adapters = [m for m in self.modules() if isinstance(m, (ILAdapter, BottleneckAdapter))]
        for conv in (c for a in adapters if isinstance(a, ILAdapter) for c in (a.dwconv, a.pwconv, a.cls_conv)):
            nn.init.xavier_uniform_(conv.weight)
        head = self.vit.get_classifier()
        linears = [lin for a in adapters for lin in (a.down, a.up)] + ([head] if isinstance(head, nn.Linear) else [])
        for lin in linears:
            nn.init.xavier_uniform_(lin.weight)
            nn.init.normal_(lin.bias, std=1e-6)

    def _freeze(self) -> None:
        """C.1: train the head, the CLS token, the ILAs and the adapters only."""
        keep = _param_ids(self.vit.get_classifier()) | {id(self.vit.cls_token)}
        for m in self.modules():
            if isinstance(m, (ILAdapter, BottleneckAdapter)):
                keep |= _param_ids(m)
        for p in self.parameters():
            p.requires_grad = id(p) in keep

    def train(self, mode: bool = True) -> ILAViT:
        """BatchNorms of the frozen backbone (a hybrid's CNN) keep their statistics: they stay in eval mode."""
        super().train(mode)
        for m in self.vit.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
                m.eval()
        return self

    def get_classifier(self) -> nn.Module:
        return self.vit.get_classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def build(
    vit: VisionTransformer, num_classes: int, *, ila_variant: str = "ila", init: str = "timm", **_: object
) -> ILAViT:
    """The registry's builder (pipeline/methods.py): the ViT (already with num_classes outputs) with ILAs."""
    return ILAViT(vit, ila_variant, init=init)
