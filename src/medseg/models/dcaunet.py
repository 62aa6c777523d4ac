"""DCAU-Net (Li, Wan, Lan, arXiv:2603.09530): differential cross attention + channel-spatial fusion (spec §1).

What this implements: the U-shaped skeleton shared with TCSAFormer (§1.1: conv stem, four encoder stages
of 2, 2, 8, 2 DCA blocks at 64, 128, 256, 512 channels, three decoder steps ``U x2`` + Conv1x1 + BN ->
add skip -> CSFF -> 8 / 2 / 2 DCA blocks, ``U x4`` + Conv1x1 head). A DCA block is CPE -> Differential
Cross Attention -> MLP x4 (§1.2). Differential Cross Attention (§1.3): pixel tokens are the queries; the
keys and values come from ``G x G`` adaptive-average-pooled summary tokens of the normalised map; each
head computes two soft-max maps over the summaries and takes their difference
``(A_1 - lambda A_2) V`` with the DIFF-Transformer re-parameterisation
``lambda = exp(l_q1 . l_k1) - exp(l_q2 . l_k2) + lambda_init(l)``, then a per-head RMSNorm scaled by
``1 - lambda_init`` and an output Linear. Because the difference is linear in the maps it is computed as
two fused ``scaled_dot_product_attention`` calls (an ``N x G^2`` problem, linear in the pixel count).
CSFF is :class:`medseg.models.blocks.SkipFusion` (TCSAFormer §2.5) applied to ``skip + up``.

No paper body or official code was readable, so nearly everything beyond the abstract is a [CHOICE]
of the spec (§1.1-§1.6); those choices are the defaults here and all are constructor arguments:
head dim 32 with ``h = C / (2 d)`` differential heads (sub-heads interleaved as in the DIFF reference),
G = 7, no bias on Q/K/V, bias on the output Linear, MLP ratio 4, ``lambda_init`` indexed by the 1-based
block position in forward-execution order over the whole network (encoder stage 1 -> 4, then decoder
H/16 -> H/4), drop-path ``linspace(0, 0.1, 26)`` in the same order. Our further choices:
* When a map is smaller than ``G`` on a side, the grid is clamped to the map (every pixel is its own
  summary token, i.e. full differential self-attention) instead of up-sampling it by adaptive pooling.
* ``small`` config (§11.4): a quarter of the channels (16, 32, 64, 128), one block per encoder and
  decoder stage, the published head counts (1, 2, 4, 8) hence sub-head dim 8; every module kept.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import Mlp, PreNormBlock, drop_path_rates, init_transformer_weights
from medseg.models.registry import ModelCard, register
from medseg.models.tcsaformer import UShapedTransformer

CONFIGS: dict[str, dict[str, Any]] = {
    # §1.6 (our config; no published one): 23,877,312 parameters with 9 classes.
    "full": dict(
        dims=(64, 128, 256, 512),
        depths=(2, 2, 8, 2),
        decoder_depths=(8, 2, 2),
        head_dim=32,
        grid=7,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
    ),
    # §11.4: a quarter of the channels, one block per stage, every module kept.
    "small": dict(
        dims=(16, 32, 64, 128),
        depths=(1, 1, 1, 1),
        decoder_depths=(1, 1, 1),
        head_dim=8,
        grid=7,
        mlp_ratio=4.0,
        drop_path_rate=0.1,
    ),
}


def lambda_init_schedule(layer: int) -> float:
    """DIFF-Transformer ``lambda_init(l) = 0.8 - 0.6 exp(-0.3 (l - 1))`` for the 1-based layer index ``l``."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


class DifferentialCrossAttention(nn.Module):
    """Differential Cross Attention (§1.3): pixel queries over ``G x G`` pooled summary keys/values.

    Input and output are channels-last ``(B, H, W, C)``. ``h = C / (2 head_dim)`` differential heads,
    each with two query/key sub-heads of size ``head_dim`` and a value head of size ``2 head_dim``.
    """

    def __init__(self, dim: int, head_dim: int = 32, grid: int = 7, lambda_init: float = 0.8) -> None:
        super().__init__()
        if dim % (2 * head_dim):
            raise ValueError(f"dim {dim} must be a multiple of 2 * head_dim = {2 * head_dim}")
        self.num_heads = dim // (2 * head_dim)
        self.head_dim = head_dim
        self.grid = grid
        self.lambda_init = float(lambda_init)  # a constant of the layer, not a parameter
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.out_proj = nn.Linear(dim, dim)
        self.lambda_q1 = nn.Parameter(torch.empty(head_dim).normal_(0, 0.1))
        self.lambda_k1 = nn.Parameter(torch.empty(head_dim).normal_(0, 0.1))
        self.lambda_q2 = nn.Parameter(torch.empty(head_dim).normal_(0, 0.1))
        self.lambda_k2 = nn.Parameter(torch.empty(head_dim).normal_(0, 0.1))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)  # per head over its 2d channels, shared weights

    def lambda_full(self) -> torch.Tensor:
        """``lambda = exp(l_q1 . l_k1) - exp(l_q2 . l_k2) + lambda_init`` (a scalar tensor)."""
        lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1).float())
        lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2).float())
        return lambda_1 - lambda_2 + self.lambda_init

    def summary_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Adaptive average pooling of the (normalised) map to ``G x G`` windows: (B, H, W, C) -> (B, M, C)."""
        _, h, w, _ = x.shape
        grid = (min(self.grid, h), min(self.grid, w))
        s = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), grid)
        return s.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        n, nh, d = h * w, self.num_heads, self.head_dim
        s = self.summary_tokens(x)
        m = s.shape[1]
        # (B, h, 2, L, d): sub-heads 2i and 2i+1 form the pair of head i (interleaved, as DIFF does)
        q = self.q_proj(x.reshape(b, n, c)).view(b, n, nh, 2, d).permute(0, 2, 3, 1, 4)
        k = self.k_proj(s).view(b, m, nh, 2, d).permute(0, 2, 3, 1, 4)
        v = self.v_proj(s).view(b, m, nh, 2 * d).transpose(1, 2)  # (B, h, M, 2d)
        # O = (A_1 - lambda A_2) V = SDPA(Q_1, K_1, V) - lambda SDPA(Q_2, K_2, V); scale 1/sqrt(d)
        o1 = F.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v)
        o2 = F.scaled_dot_product_attention(q[:, :, 1], k[:, :, 1], v)
        o = o1 - self.lambda_full().to(o1.dtype) * o2  # (B, h, N, 2d)
        # per-head RMSNorm in float32 (as the DIFF reference does), then the (1 - lambda_init) scale
        o = F.rms_norm(o.float(), self.subln.normalized_shape, self.subln.weight.float(), self.subln.eps).type_as(o)
        o = o * (1 - self.lambda_init)
        return self.out_proj(o.transpose(1, 2).reshape(b, h, w, c))


class DCAUNet(UShapedTransformer):
    """DCAU-Net (§1): U-shaped network of DCA blocks with CSFF on the skip connections."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        dims: Sequence[int] = CONFIGS["full"]["dims"],
        depths: Sequence[int] = CONFIGS["full"]["depths"],
        decoder_depths: Sequence[int] = CONFIGS["full"]["decoder_depths"],
        head_dim: int = 32,
        grid: int = 7,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        # Blocks in forward-execution order: encoder stages 0..3, then decoder steps (H/16, H/8, H/4).
        # Their 0-based position p gives lambda_init(p + 1) and the drop-path rate #p [CHOICE §1.3, §1.6].
        enc_offsets = [sum(depths[:s]) for s in range(4)]
        dec_offsets = [sum(depths) + sum(decoder_depths[:i]) for i in range(3)]
        rates = drop_path_rates(drop_path_rate, sum(depths) + sum(decoder_depths))

        def make_block(stage: int, j: int, decoder: bool) -> nn.Module:
            pos = (dec_offsets[2 - stage] if decoder else enc_offsets[stage]) + j
            dim = dims[stage]
            mixer = DifferentialCrossAttention(dim, head_dim, grid, lambda_init_schedule(pos + 1))
            return PreNormBlock(dim, mixer, Mlp(dim, mlp_ratio), drop_path=rates[pos])

        super().__init__(in_channels, num_classes, dims, depths, decoder_depths, make_block)
        init_transformer_weights(self)  # Linear trunc-normal(0.02), LN (1, 0); lambda vectors keep N(0, 0.1^2)

    def dca_layers(self) -> list[DifferentialCrossAttention]:
        """The DCA modules in forward-execution order."""
        blocks = [blk for stage in list(self.stages) + list(self.stages_de) for blk in stage]
        return [blk.attn for blk in blocks]


@register(
    ModelCard(
        name="dcaunet",
        title="DCAU-Net",
        task="2-D semantic segmentation",
        paper=(
            "Li, Wan, Lan, 'DCAU-Net: Differential Cross Attention and Channel-Spatial Feature Fusion for "
            "Medical Image Segmentation', arXiv:2603.09530 (2026)"
        ),
        notes=(
            "Differential cross attention over window-summary tokens + channel-spatial skip fusion; spec §1. "
            "Built from the abstract and the DIFF Transformer: the configuration is our choice, not published."
        ),
        extra={"params_full_9class": 23_877_312},
    )
)
def build_dcaunet(in_channels: int = 3, num_classes: int = 2, config: str = "small", **overrides: Any) -> DCAUNet:
    """DCAU-Net in config ``full`` (§1.6) or ``small`` (§11.4); ``overrides`` replace config entries."""
    return DCAUNet(in_channels, num_classes, **{**CONFIGS[config], **overrides})


__all__ = ["CONFIGS", "lambda_init_schedule", "DifferentialCrossAttention", "DCAUNet", "build_dcaunet"]
