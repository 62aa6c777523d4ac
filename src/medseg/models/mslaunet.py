"""MSLAU-Net (Lan et al., arXiv:2505.18823): hybrid CNN-transformer with multi-scale linear attention.

Implements SEED_METHODS §4 from the official code (``Monsoon49/MSLAU-Net``):

* encoder (§4.1): conv patch embeddings (k = s = 4, 2, 2, 2) + channel LayerNorm (eps 1e-5); stages 1-2 of
  LFE blocks (§4.2, UniFormer-style conv blocks), stages 3-4 of GFE blocks (§4.3) whose mixer is MSLA;
* MSLA (§4.4): four depthwise branches (kernels 3/5/7/9 on C/4 channel groups, residual + ReLU inside the
  branch), ONE linear-attention module shared by the four branches (keys soft-maxed over channels, queries over
  tokens, context e x e, never N x N), learnable branch weights (init 1), fusion Conv1x1;
* decoder (§4.5): top-down multi-level aggregation at H/4 + MLA head + Conv3x3, resize to the input size.

``layout`` switch of MSLA (§4.4):

* ``"spatial"`` (default): the paper's reading, proper transposes between tokens (N, C) and maps (C, H, W) and
  the usual head concatenation.
* ``"official"``: the released code bit for bit - the (N, C) token memory is re-interpreted as a (C, H, W) map
  (step 1), the (h, N, e) linear-attention output is re-interpreted as (N, D) (step 4, head merge) and the
  (C, H, W) output map as (N, C) tokens (step 6). Parameters are identical in both layouts.

Choices [CHOICE]: the true (H, W) are used instead of ``sqrt(N)`` (identical for square maps); the MLA head
upsamples by 2 on both axes (the official code resizes to a square); logits are resized to the actual
(padded) input size; inputs are reflect-padded to multiples of 32 and cropped back. The encoder's unused
BatchNorm2d + Linear(C4 -> 1) classification head of the official code is kept (``unused_cls_head``, for
checkpoint key parity and the published parameter count; it gets no gradient). ``small`` (§11.4) = a quarter
of the channels (16, 32, 64, 128), one block per stage, decoder width 16, LA head width kept at e = 16
(heads = C / 64: 1 and 2).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import (
    DropPath,
    LayerNorm2d,
    Mlp,
    PreNormBlock,
    SegmentationNet,
    drop_path_rates,
    init_transformer_weights,
)
from medseg.models.registry import ModelCard, register

Layout = Literal["spatial", "official"]

CONFIGS: dict[str, dict] = {
    "full": dict(dims=(64, 128, 256, 512), depths=(4, 8, 11, 5), head_dim=64),
    "small": dict(dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), head_dim=64),
}


# --------------------------------------------------------------------------- MSLA
class LinearAttention(nn.Module):
    """Kernelised linear attention of MSLA (§4.4 step 4) on tokens (B, N, D); cost O(N e^2), no N x N.

    ``K~ = softmax over the e channels of each key``, ``Q~ = softmax over the N tokens of each query channel``
    (the reverse of the usual "efficient attention" axes, as in the code), ``Ctx = K~^T V`` (e x e),
    ``U = Q~ Ctx``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, layout: Layout = "spatial") -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, e)
        key = k.softmax(dim=-1)  # over channels, per token
        query = q.softmax(dim=-2)  # over tokens, per channel
        context = key.transpose(-2, -1) @ v  # (B, h, e, e)
        out = query @ context  # (B, h, N, e)
        if layout == "official":
            # [QUIRK] heads merged by re-reading the contiguous (h, N, e) memory as (N, D), not by transposing
            out = out.reshape(b, n, d)
        else:
            out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj(out)


class DepthwiseResidual(nn.Module):
    """``ReLU(x + DWConv_k(x))``: one multi-scale branch of MSLA (§4.4 step 3)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.depthwise(x))


class MSLA(nn.Module):
    """Multi-scale linear attention on channels-last tokens (B, H, W, C) (§4.4)."""

    kernels = (3, 5, 7, 9)

    def __init__(self, dim: int, num_heads: int, layout: Layout = "spatial") -> None:
        super().__init__()
        if dim % 4:
            raise ValueError(f"MSLA needs a width divisible by 4, not {dim}")
        if layout not in ("spatial", "official"):
            raise ValueError(f"layout must be 'spatial' or 'official', not {layout!r}")
        self.dim, self.num_heads, self.layout = dim, num_heads, layout
        branch = dim // 4
        self.dw_conv_3x3 = DepthwiseResidual(branch, 3)
        self.dw_conv_5x5 = DepthwiseResidual(branch, 5)
        self.dw_conv_7x7 = DepthwiseResidual(branch, 7)
        self.dw_conv_9x9 = DepthwiseResidual(branch, 9)
        self.linear_attention = LinearAttention(branch, num_heads)  # ONE module shared by the four branches
        self.final_conv = nn.Conv2d(dim, dim, 1)
        self.scale_weights = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n = h * w
        if self.layout == "official":
            # [QUIRK] step 1: the row-major (N, C) token memory is read as a (C, H, W) map (no transpose)
            z = x.reshape(b, c, h, w)
        else:
            z = x.permute(0, 3, 1, 2)
        branches = (self.dw_conv_3x3, self.dw_conv_5x5, self.dw_conv_7x7, self.dw_conv_9x9)
        ys = [conv(zg) for conv, zg in zip(branches, z.chunk(4, dim=1))]
        # the shared LA runs once on the four branches stacked along the batch: (4B, N, D), proper transpose
        tokens = torch.cat(ys, dim=0).flatten(2).transpose(1, 2)
        att = self.linear_attention(tokens, self.layout)  # (4B, N, D)
        att = att.view(4, b, n, c // 4) * self.scale_weights.view(4, 1, 1, 1)
        # concatenate [A_1; ...; A_4] along channels; kept channels-last in memory like the official code's
        # maps (the fusion conv then takes the same kernel path, so "official" matches it bit for bit)
        att = att.permute(1, 2, 0, 3).reshape(b, h, w, c).permute(0, 3, 1, 2)
        out = self.final_conv(att)
        if self.layout == "official":
            # [QUIRK] step 6: the (C, H, W) output memory is read back as (N, C) tokens
            return out.reshape(b, h, w, c)
        return out.permute(0, 2, 3, 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, layout={self.layout!r}"


# --------------------------------------------------------------------------- encoder blocks
class PatchEmbed(nn.Module):
    """Conv k = s (bias) -> LayerNorm over channels (eps 1e-5), NCHW in and out."""

    def __init__(self, cin: int, cout: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, patch)
        self.norm = LayerNorm2d(cout, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class CMlp(nn.Module):
    """Conv1x1 (C -> 4C) . GELU . Conv1x1 (4C -> C)."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LFE(nn.Module):
    """Local feature extraction block (§4.2), NCHW."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.BatchNorm2d(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.attn = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv2 = nn.Conv2d(dim, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = CMlp(dim, mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x + self.drop_path(self.conv2(self.attn(self.conv1(self.norm1(x)))))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def gfe_block(
    dim: int, num_heads: int, layout: Layout = "spatial", mlp_ratio: float = 4.0, drop_path: float = 0.0
) -> PreNormBlock:
    """Global feature extraction block (§4.3): CPE, LN, MSLA, LN, MLP x4 (LN eps 1e-6)."""
    return PreNormBlock(dim, MSLA(dim, num_heads, layout), Mlp(dim, mlp_ratio), drop_path)


class MSLAEncoder(nn.Module):
    """Four-stage hybrid encoder (§4.1): returns f1..f4 at strides 4, 8, 16, 32 (NCHW)."""

    def __init__(
        self,
        dims: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (4, 8, 11, 5),
        head_dim: int = 64,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        layout: Layout = "spatial",
        unused_cls_head: bool = True,
    ) -> None:
        super().__init__()
        ins = (3,) + tuple(dims[:-1])
        for i, (cin, cout, patch) in enumerate(zip(ins, dims, (4, 2, 2, 2)), start=1):
            self.add_module(f"patch_embed{i}", PatchEmbed(cin, cout, patch))
        rates = iter(drop_path_rates(drop_path_rate, sum(depths)))
        self.blocks1 = nn.ModuleList(LFE(dims[0], mlp_ratio, next(rates)) for _ in range(depths[0]))
        self.blocks2 = nn.ModuleList(LFE(dims[1], mlp_ratio, next(rates)) for _ in range(depths[1]))
        self.blocks3 = nn.ModuleList(
            gfe_block(dims[2], max(1, dims[2] // head_dim), layout, mlp_ratio, next(rates)) for _ in range(depths[2])
        )
        self.blocks4 = nn.ModuleList(
            gfe_block(dims[3], max(1, dims[3] // head_dim), layout, mlp_ratio, next(rates)) for _ in range(depths[3])
        )
        if unused_cls_head:
            # [QUIRK, harmless] owned by the official encoder, never used by the segmentation forward
            self.norm = nn.BatchNorm2d(dims[3])
            self.head = nn.Linear(dims[3], 1)
        init_transformer_weights(self)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for i in range(1, 5):
            x = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"blocks{i}"):
                x = blk(x)
            features.append(x)
        return features


# --------------------------------------------------------------------------- decoder
def _cbr(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    """Conv k x k (no bias) . BN . ReLU."""
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def _up2() -> nn.Module:
    return nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)


class ConvMLA(nn.Module):
    """Top-down multi-level aggregation at H/4 (§4.5): P_i, cumulative sums S_i, M_i = CBR3(S_i)."""

    def __init__(self, dims: tuple[int, ...], mla_channels: int) -> None:
        super().__init__()
        if dims[0] != mla_channels:
            raise ValueError("the stage-1 width must equal the decoder width (S_1 = f_1)")
        self.mla_p4 = nn.Sequential(*_cbr(dims[1], mla_channels, 1), _up2())
        self.mla_p3 = nn.Sequential(*_cbr(dims[2], dims[1], 1), _up2(), *_cbr(dims[1], mla_channels, 1), _up2())
        self.mla_p2 = nn.Sequential(
            *_cbr(dims[3], dims[2], 1), _up2(),
            *_cbr(dims[2], dims[1], 1), _up2(),
            *_cbr(dims[1], mla_channels, 1), _up2(),
        )
        self.mla_p2_3x3, self.mla_p3_3x3, self.mla_p4_3x3, self.mla_p5_3x3 = (
            nn.Sequential(*_cbr(mla_channels, mla_channels, 3)) for _ in range(4)
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        f1, f2, f3, f4 = features
        s2 = f1 + self.mla_p4(f2)
        s3 = s2 + self.mla_p3(f3)
        s4 = s3 + self.mla_p2(f4)
        return [self.mla_p5_3x3(f1), self.mla_p4_3x3(s2), self.mla_p3_3x3(s3), self.mla_p2_3x3(s4)]


class MLAHead(nn.Module):
    """``G_i = U2 CBR3(M_i)``, concatenated (4 x mla_channels at H/2)."""

    def __init__(self, mla_channels: int) -> None:
        super().__init__()
        self.head2, self.head3, self.head4, self.head5 = (
            nn.Sequential(*_cbr(mla_channels, mla_channels, 3)) for _ in range(4)
        )

    def forward(self, mla: list[torch.Tensor]) -> torch.Tensor:
        heads = (self.head2, self.head3, self.head4, self.head5)
        # [CHOICE] scale factor 2 on both axes (the official code resizes to a square of twice the width)
        outs = [F.interpolate(h(m), scale_factor=2, mode="bilinear", align_corners=True) for h, m in zip(heads, mla)]
        return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------- network
class MSLAUNet(SegmentationNet):
    """MSLAU-Net for any input size and 1 or 3 channels (§4)."""

    stride_multiple = 32
    min_side = 32

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        dims: tuple[int, ...] = (64, 128, 256, 512),
        depths: tuple[int, ...] = (4, 8, 11, 5),
        head_dim: int = 64,
        mla_channels: int | None = None,
        drop_path_rate: float = 0.0,
        layout: Layout = "spatial",
        unused_cls_head: bool = True,
    ) -> None:
        super().__init__(in_channels, num_classes)
        mla_channels = mla_channels or dims[0]
        self.encoder = MSLAEncoder(dims, depths, head_dim, 4.0, drop_path_rate, layout, unused_cls_head)
        self.conv_mla = ConvMLA(dims, mla_channels)
        self.mlahead = MLAHead(mla_channels)
        self.seg = nn.Conv2d(4 * mla_channels, num_classes, 3, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.seg(self.mlahead(self.conv_mla(self.encoder(x))))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=True)

    def msla_modules(self) -> list[MSLA]:
        return [m for m in self.modules() if isinstance(m, MSLA)]


@register(
    ModelCard(
        name="mslaunet",
        title="MSLAU-Net (multi-scale linear attention U-Net)",
        task="2-D semantic segmentation",
        paper="Lan, Li, Liu, Zhou, Zhang, Huang, Zhang, 'MSLAU-Net: A Hybrid CNN-Transformer Network for "
        "Medical Image Segmentation', arXiv:2505.18823 (2025)",
        notes="full: as published (21.9 M parameters at 9 classes); small: a quarter of the channels, one "
        "block per stage. MSLA layout 'spatial' (paper reading, default) or 'official' (released code).",
    )
)
def build_mslaunet(in_channels: int = 3, num_classes: int = 2, config: str = "small", **overrides) -> MSLAUNet:
    return MSLAUNet(in_channels, num_classes, **{**CONFIGS[config], **overrides})


__all__ = [
    "CONFIGS",
    "LinearAttention",
    "DepthwiseResidual",
    "MSLA",
    "PatchEmbed",
    "CMlp",
    "LFE",
    "gfe_block",
    "MSLAEncoder",
    "ConvMLA",
    "MLAHead",
    "MSLAUNet",
    "build_mslaunet",
]
