"""MedFormer (Xia, Li, Lan, arXiv:2507.02488): pyramid ViT with Dual Sparse Selection Attention.

Implements SEED_METHODS §3 from the official code (``XiaZunhui/MedFormer``):

* backbone (§3.1, §3.2): conv stem, conv patch merging, pre-norm blocks (CPE, LN, mixer, LN, MLP x3),
  tiny / small / base widths, drop-path ``linspace(0, rate, 14)``;
* DSSA (§3.3) in stages 1-3: region routing on *detached* average-pooled Q/K, per-region gather of the
  ``k1`` routed regions' K/V, token top-``k2`` (``k2 = floor(k1 * a / 8)``) with soft-max over the kept
  logits and gathered values, LePE 5x5 on V; stage 4 (§3.4): full MHSA (fused SDPA, 8 heads) + LePE on X;
* classification head (§3.5): :class:`MedFormerClassifier` / :func:`medformer_classifier`;
* segmentation (§3.6): per-stage LayerNorm2d + UPerNet head without norm layers, registered as
  ``"medformer"``.

Quirks reproduced (see comments): DSSA scale ``C**-0.5`` (full width, not head width); padded keys are not
masked; stage-4 head count is 8 for every variant; LePE on V in DSSA but on X in stage 4; UPerNet has no norm.

Choices [CHOICE]:

* Region size, grid and ``k2`` are computed from the actual map size at run time (``dssa_budget``), with a
  floor of 1 and a ceiling of the candidate count (§11.1); ``k1`` is capped at the number of regions.
* Arbitrary inputs are reflect-padded so both sides are multiples of 32 and at least ``16 * n_win`` (stage-3
  side >= ``n_win``), then the logits are cropped back (``SegmentationNet``).
* Segmentation ``full`` = base backbone + UPerNet E=128, ``n_win`` 7, drop-path 0.0 (the Synapse row of §3.6,
  31,281,225 parameters at 9 classes). The ISIC/CVC row is
  ``build("medformer", config="full", variant="small", channels=64, n_win=8, drop_path_rate=0.2)``
  (13,491,649 parameters at 1 class).
* Segmentation ``small`` (§11.4) = tiny widths (32, 64, 128, 256), one block per stage, UPerNet E=32,
  ``n_win`` 8; every module (DSSA in stages 1-3, MHSA+LePE in stage 4, UPerNet with PPM) is kept.
* Module names follow the official code (``downsample_layers``, ``stages``, ``qkv_linear``, ``lepe``,
  ``psp_modules``, ``lateral_convs``, ...) except the block MLP, which is ``blocks.Mlp`` (``ffn.fc1/fc2``
  instead of ``mlp.0/mlp.3``) because the block is the shared ``blocks.PreNormBlock``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import (
    ConvMerge,
    ConvStem,
    LayerNorm2d,
    Mlp,
    PreNormBlock,
    SegmentationNet,
    drop_path_rates,
    gather_rows,
    init_transformer_weights,
    topk_sparse_attention,
)
from medseg.models.registry import ModelCard, register


# --------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class MedFormerVariant:
    """Backbone widths and depths (§3.1)."""

    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int] = (2, 2, 8, 2)
    mlp_ratio: float = 3.0
    head_dim: int = 32  # DSSA heads = C / 32
    topks: tuple[int, int, int] = (1, 4, 16)  # routed regions k1 in stages 1-3
    full_attn_heads: int = 8  # [QUIRK] stage-4 MHSA uses the module default 8 heads in every variant


VARIANTS: dict[str, MedFormerVariant] = {
    "tiny": MedFormerVariant(dims=(32, 64, 128, 256)),
    "small": MedFormerVariant(dims=(64, 128, 256, 512)),
    "base": MedFormerVariant(dims=(96, 192, 384, 768)),
    # §11.4 small config: tiny widths, one block per stage, every module kept
    "tiny-shallow": MedFormerVariant(dims=(32, 64, 128, 256), depths=(1, 1, 1, 1)),
}

# segmentation configs for the registry: backbone variant, UPerNet channels E, n_win, drop-path rate
SEG_CONFIGS: dict[str, dict] = {
    "full": dict(variant="base", channels=128, n_win=7, drop_path_rate=0.0),
    "small": dict(variant="tiny-shallow", channels=32, n_win=8, drop_path_rate=0.0),
}


# --------------------------------------------------------------------------- DSSA
@dataclass(frozen=True)
class DSSABudget:
    """Region and token budgets of one DSSA call, computed from the actual map size (§3.3)."""

    region_size: tuple[int, int]  # (r_h, r_w) = (H // n_win, W // n_win), at least 1
    grid: tuple[int, int]  # regions per column / row: ceil(H / r_h), ceil(W / r_w)
    k1: int  # routed regions per query region
    k2: int  # attended tokens per query: floor(k1 * a / 8), in [1, k1 * a]

    @property
    def area(self) -> int:
        return self.region_size[0] * self.region_size[1]

    @property
    def regions(self) -> int:
        return self.grid[0] * self.grid[1]


def dssa_budget(h: int, w: int, n_win: int, topk: int) -> DSSABudget:
    """Region size, region grid, ``k1`` and ``k2`` for an ``h x w`` map (§3.3, §11.1)."""
    rh, rw = max(1, h // n_win), max(1, w // n_win)
    gh, gw = -(-h // rh), -(-w // rw)
    k1 = max(1, min(int(topk), gh * gw))
    candidates = k1 * rh * rw
    k2 = max(1, min(candidates // 8, candidates))
    return DSSABudget((rh, rw), (gh, gw), k1, k2)


def _to_regions(x: torch.Tensor, heads: int, rh: int, rw: int) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of the region size -> (B, heads, R, a, C / heads), regions row-major."""
    b, c, h, w = x.shape
    gh, gw = h // rh, w // rw
    x = x.view(b, heads, c // heads, gh, rh, gw, rw)
    return x.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, heads, gh * gw, rh * rw, c // heads)


def _from_regions(x: torch.Tensor, grid: tuple[int, int], rh: int, rw: int) -> torch.Tensor:
    """Inverse of :func:`_to_regions`: (B, heads, R, a, d) -> (B, heads * d, H, W)."""
    b, heads, _, _, d = x.shape
    gh, gw = grid
    x = x.view(b, heads, gh, gw, rh, rw, d)
    return x.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, heads * d, gh * rh, gw * rw)


def route_regions(q: torch.Tensor, k: torch.Tensor, budget: DSSABudget) -> tuple[torch.Tensor, torch.Tensor]:
    """Region-level selection (§3.3 step 2): indices (B, R, k1) of each query region's top-k1 key regions.

    Routing runs on detached Q/K (no gradient through this path), average-pooled per region with ceil mode
    and padding excluded from the average; affinities use all channels, no scale, shared by the heads.
    Also returns the region affinities (B, R, R).
    """
    q_r = F.avg_pool2d(q.detach(), budget.region_size, ceil_mode=True, count_include_pad=False)
    k_r = F.avg_pool2d(k.detach(), budget.region_size, ceil_mode=True, count_include_pad=False)
    scores = q_r.flatten(2).transpose(1, 2) @ k_r.flatten(2)  # (B, R, R)
    return torch.topk(scores, budget.k1, dim=-1).indices, scores


def dual_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    region_idx: torch.Tensor,
    budget: DSSABudget,
    heads: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level sparse attention inside the routed regions (§3.3 steps 3-6).

    ``q, k, v``: (B, C, H, W); ``region_idx``: (B, R, k1). Returns the output (B, C, H, W) and the
    attended-token indices (B, heads, R, a, k2) into each query region's ``k1 * a`` candidates.
    """
    _, _, h, w = q.shape
    rh, rw = budget.region_size
    ph, pw = (-h) % rh, (-w) % rw
    if ph or pw:  # zero padding at bottom/right; [QUIRK] padded keys are not masked
        q, k, v = (F.pad(t, (0, pw, 0, ph)) for t in (q, k, v))
    q_reg, k_reg, v_reg = (_to_regions(t, heads, rh, rw) for t in (q, k, v))  # (B, h, R, a, d)
    b, _, r, a, d = q_reg.shape
    # gather the k1 routed regions' keys/values per query region (no per-query expansion)
    idx = region_idx.unsqueeze(1).expand(-1, heads, -1, -1)  # (B, h, R, k1)
    k_g = gather_rows(k_reg.flatten(-2), idx).view(b, heads, r, budget.k1 * a, d)
    v_g = gather_rows(v_reg.flatten(-2), idx).view(b, heads, r, budget.k1 * a, d)
    # row top-k2 over the a x k1*a logits, soft-max over the k2 kept, gathered values
    out, token_idx = topk_sparse_attention(q_reg, k_g, v_g, budget.k2, scale, return_indices=True)
    out = _from_regions(out, budget.grid, rh, rw)[:, :, :h, :w]
    return out, token_idx


@dataclass
class DSSAInfo:
    """What one DSSA call selected (recorded when ``DSSA.record_info`` is True)."""

    budget: DSSABudget
    region_idx: torch.Tensor  # (B, R, k1)
    region_scores: torch.Tensor  # (B, R, R), computed without gradient
    token_idx: torch.Tensor  # (B, heads, R, a, k2), indices into the k1 * a candidates


class DSSA(nn.Module):
    """Dual Sparse Selection Attention on channels-last (B, H, W, C) tokens (§3.3)."""

    def __init__(self, dim: int, num_heads: int, n_win: int = 7, topk: int = 4, side_dwconv: int = 5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads, self.n_win, self.topk = dim, num_heads, n_win, topk
        self.scale = dim**-0.5  # [QUIRK] full width C, not the head width (official code, reproduced)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, 1)
        self.output_linear = nn.Conv2d(dim, dim, 1)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, 1, side_dwconv // 2, groups=dim)
        self.record_info = False
        self.last_info: DSSAInfo | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)
        _, _, h, w = x.shape
        budget = dssa_budget(h, w, self.n_win, self.topk)
        q, k, v = self.qkv_linear(x).chunk(3, dim=1)
        region_idx, scores = route_regions(q, k, budget)
        out, token_idx = dual_sparse_attention(q, k, v, region_idx, budget, self.num_heads, self.scale)
        out = out + self.lepe(v)  # LePE on the un-padded V
        out = self.output_linear(out)
        if self.record_info:
            self.last_info = DSSAInfo(budget, region_idx, scores, token_idx)
        return out.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"


class AttentionLePE(nn.Module):
    """Stage-4 full multi-head self-attention (fused SDPA) + LePE on the block input X (§3.4)."""

    def __init__(self, dim: int, num_heads: int = 8, side_dwconv: int = 5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.lepe = nn.Conv2d(dim, dim, side_dwconv, 1, side_dwconv // 2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale d**-0.5
        out = out.transpose(1, 2).reshape(b, h, w, c)
        out = out + self.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # LePE on X, not on V
        return self.proj(out)


# --------------------------------------------------------------------------- backbone
class MedFormerBackbone(nn.Module):
    """Four-stage pyramid (§3.1): returns the stage outputs at strides 4, 8, 16, 32 (NCHW)."""

    def __init__(self, variant: MedFormerVariant, n_win: int = 7, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        dims = variant.dims
        self.dims, self.n_win = dims, n_win
        self.downsample_layers = nn.ModuleList(
            [ConvStem(3, dims[0])] + [ConvMerge(dims[i], dims[i + 1]) for i in range(3)]
        )
        rates = iter(drop_path_rates(drop_path_rate, sum(variant.depths)))
        self.stages = nn.ModuleList()
        for i, (dim, depth) in enumerate(zip(dims, variant.depths)):
            blocks = []
            for _ in range(depth):
                if i < 3:
                    mixer: nn.Module = DSSA(dim, dim // variant.head_dim, n_win, variant.topks[i])
                else:
                    mixer = AttentionLePE(dim, variant.full_attn_heads)
                blocks.append(PreNormBlock(dim, mixer, Mlp(dim, variant.mlp_ratio), next(rates)))
            self.stages.append(nn.Sequential(*blocks))
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            features.append(x)
        return features

    def dssa_modules(self) -> list[DSSA]:
        """The DSSA modules in block order (for inspection: ``record_info``, ``last_info``)."""
        return [m for m in self.modules() if isinstance(m, DSSA)]


# --------------------------------------------------------------------------- classification
class MedFormerClassifier(nn.Module):
    """Backbone -> BN(C4) -> global average pool -> Linear (§3.5). 1-channel input is repeated to 3."""

    def __init__(
        self, variant: str = "tiny", num_classes: int = 1000, n_win: int = 7, drop_path_rate: float = 0.1
    ) -> None:
        super().__init__()
        self.backbone = MedFormerBackbone(VARIANTS[variant], n_win, drop_path_rate)
        c4 = self.backbone.dims[-1]
        self.norm = nn.BatchNorm2d(c4)
        self.head = nn.Linear(c4, num_classes)
        init_transformer_weights(self.head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = self.norm(self.backbone(x)[-1])
        return self.head(x.flatten(2).mean(-1))


def medformer_classifier(variant: str = "tiny", num_classes: int = 1000, **kwargs) -> MedFormerClassifier:
    """MedFormer-T/S/B classification model (``variant`` in tiny, small, base)."""
    return MedFormerClassifier(variant, num_classes, **kwargs)


# --------------------------------------------------------------------------- UPerNet
class ConvReLU(nn.Module):
    """mmcv ``ConvModule`` without norm as configured by MedFormer: conv with bias, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """UPerNet decode head of §3.6: PPM on f4, FPN top-down, fusion, Dropout2d, Conv1x1. No norm layers."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        channels: int,
        num_classes: int,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvReLU(in_channels[-1], channels, 1)) for s in pool_scales
        )
        self.bottleneck = ConvReLU(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvReLU(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvReLU(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvReLU(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], size: tuple[int, int] | torch.Size) -> torch.Tensor:
        top = feats[-1]
        psp = [top] + [_resize(m(top), top.shape[-2:]) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat(psp, dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[-2:]) for o in outs[1:]]
        x = self.fpn_bottleneck(torch.cat(outs, dim=1))
        return _resize(self.conv_seg(self.dropout(x)), size)


# --------------------------------------------------------------------------- segmentation
class MedFormerSeg(SegmentationNet):
    """MedFormer backbone + per-stage LayerNorm2d + UPerNet (§3.6), any input size, 1 or 3 channels."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        variant: str = "base",
        channels: int = 128,
        n_win: int = 7,
        drop_path_rate: float = 0.0,
        pool_scales: tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__(in_channels, num_classes)
        self.stride_multiple = 32
        self.min_side = 16 * n_win  # stage-3 side >= n_win
        self.backbone = MedFormerBackbone(VARIANTS[variant], n_win, drop_path_rate)
        dims = self.backbone.dims
        self.extra_norms = nn.ModuleList(LayerNorm2d(d, eps=1e-6) for d in dims)
        self.decode_head = UPerHead(dims, channels, num_classes, pool_scales, dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = [norm(f) for norm, f in zip(self.extra_norms, self.backbone(x))]
        return self.decode_head(feats, x.shape[-2:])


@register(
    ModelCard(
        name="medformer",
        title="MedFormer (DSSA backbone + UPerNet)",
        task="2-D semantic segmentation",
        paper="Xia, Li, Lan, 'MedFormer: Hierarchical Medical Vision Transformer with Content-Aware Dual "
        "Sparse Selection Attention', arXiv:2507.02488 (2025)",
        notes="full: base + UPerNet E=128, n_win 7 (Synapse configuration); small: tiny widths, one block "
        "per stage, UPerNet E=32, n_win 8. Inputs are padded to multiples of 32 and at least 16*n_win.",
    )
)
def build_medformer(in_channels: int = 3, num_classes: int = 2, config: str = "small", **overrides) -> MedFormerSeg:
    return MedFormerSeg(in_channels, num_classes, **{**SEG_CONFIGS[config], **overrides})


__all__ = [
    "VARIANTS",
    "SEG_CONFIGS",
    "MedFormerVariant",
    "DSSABudget",
    "DSSAInfo",
    "DSSA",
    "AttentionLePE",
    "MedFormerBackbone",
    "MedFormerClassifier",
    "MedFormerSeg",
    "UPerHead",
    "dssa_budget",
    "route_regions",
    "dual_sparse_attention",
    "medformer_classifier",
    "build_medformer",
]
