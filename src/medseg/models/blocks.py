"""Building blocks shared by the paper networks (spec "Shared building blocks"), written once.

Conventions: NCHW between blocks, channels-last (B, H, W, C) inside transformer blocks; LayerNorm
eps 1e-6 in blocks; Linear trunc-normal(0.02) init.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- base class, any input size
class SegmentationNet(nn.Module):
    """Base of every segmentation network: accepts any H x W and 1 or 3 channels.

    Subclasses set ``stride_multiple`` (what both sides must be a multiple of), optionally
    ``min_side``, and implement :meth:`forward_features` on the padded 3-channel tensor. The input is
    reflect-padded on the bottom/right and the logits are cropped back (spec §11.1). A 1-channel input
    is repeated to 3 channels (the "gray -> RGB adapter").
    """

    stride_multiple: int = 32
    min_side: int = 32

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, not {in_channels}")
        self.in_channels = in_channels
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {x.shape[1]}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.stride_multiple, self.min_side)
        out = self.forward_features(x)
        return out[..., :h, :w]


def padded_side(side: int, multiple: int, min_side: int = 0) -> int:
    return max(math.ceil(side / multiple) * multiple, math.ceil(min_side / multiple) * multiple)


def pad_to_multiple(x: torch.Tensor, multiple: int, min_side: int = 0, mode: str = "reflect") -> torch.Tensor:
    """Pad the last two dims on the bottom/right to a multiple (reflect where possible, else replicate)."""
    h, w = x.shape[-2:]
    ph, pw = padded_side(h, multiple, min_side) - h, padded_side(w, multiple, min_side) - w
    if ph == 0 and pw == 0:
        return x
    if mode == "reflect" and (ph >= h or pw >= w):
        mode = "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


# --------------------------------------------------------------------------- small layers
class DropPath(nn.Module):
    """Stochastic depth per sample."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """``linspace(0, rate, n)`` as a list (stochastic depth schedule over ``n`` blocks)."""
    return [float(v) for v in torch.linspace(0, rate, n)] if n > 0 else []


def init_transformer_weights(module: nn.Module) -> None:
    """Linear trunc-normal(0.02), bias 0; LayerNorm (1, 0); other layers keep PyTorch defaults."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ConvStem(nn.Sequential):
    """Conv3x3 s2 (in->C/2) . BN . GELU . Conv3x3 s2 (C/2->C) . BN: stride 4."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, dim // 2, 3, 2, 1),
            nn.BatchNorm2d(dim // 2),
            nn.GELU(),
            nn.Conv2d(dim // 2, dim, 3, 2, 1),
            nn.BatchNorm2d(dim),
        )


class ConvMerge(nn.Sequential):
    """Patch merging: Conv3x3 s2 (C_i -> C_{i+1}) . BN."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(nn.Conv2d(dim_in, dim_out, 3, 2, 1), nn.BatchNorm2d(dim_out))


class Mlp(nn.Module):
    """Linear(C -> rC) . GELU . Linear(rC -> C) on channels-last tokens."""

    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PreNormBlock(nn.Module):
    """CPE -> ``x + DropPath(mixer(LN(x)))`` -> ``x + DropPath(ffn(LN(x)))``.

    ``x`` is NCHW at the boundary; the mixer and FFN receive channels-last (B, H, W, C) tensors.
    """

    def __init__(self, dim: int, mixer: nn.Module, ffn: nn.Module, drop_path: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = mixer
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ffn = ffn
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        x = x + self.drop_path(self.ffn(self.norm2(x)))
        return x.permute(0, 3, 1, 2)


class UpBlock(nn.Sequential):
    """Bilinear x2 (align_corners=True) . Conv1x1 (bias) . BN ("patch expanding")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(dim_in, dim_out, 1),
            nn.BatchNorm2d(dim_out),
        )


class SkipFusion(nn.Module):
    """Channel-then-spatial recalibration of ``skip + up`` (TCSAFormer §2.5; DCAU-Net CSFF §1.4).

    The channel branch has no sigmoid, as in the official code.
    """

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        mid = dim // reduction
        self.channel = nn.Sequential(nn.Linear(dim, mid), nn.ReLU(inplace=True), nn.Linear(mid, dim))
        self.spatial = nn.Sequential(
            nn.Conv2d(dim, mid, 7, 1, 3),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, dim, 7, 1, 3),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.channel(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = x * a
        return x * torch.sigmoid(self.spatial(x))


class SegHeadUp4(nn.Sequential):
    """``U x4`` (bilinear, align_corners=True) then Conv1x1 without bias (TCSAFormer, DCAU-Net)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=4, mode="bilinear", align_corners=True),
            nn.Conv2d(dim, num_classes, 1, bias=False),
        )


# --------------------------------------------------------------------------- sparse attention
def topk_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    topk: int,
    scale: float,
    query_chunk: int | None = None,
    return_indices: bool = False,
):
    """Row-top-k sparse soft-max attention.

    ``q`` (..., Nq, d); ``k``, ``v`` (..., Nk, d) are each query's candidate set (shared by the
    queries of a row group). For every query the ``topk`` largest logits are kept, soft-max runs
    over those ``topk`` only, and the ``topk`` value rows are gathered: no masked dense soft-max and
    no (Nq x Nk x d) value expansion. Queries are processed in chunks so the transient logit block
    stays bounded. Gradient flows through the kept logits and the gathered values.
    """
    nk = k.shape[-2]
    topk = max(1, min(int(topk), nk))
    nq = q.shape[-2]
    if query_chunk is None:
        # keep each logit block under ~16M elements per leading index
        lead = max(1, q[..., 0, 0].numel())
        query_chunk = max(1, min(nq, (1 << 24) // max(1, nk * lead)))
    outs, idxs = [], []
    for start in range(0, nq, query_chunk):
        qc = q[..., start : start + query_chunk, :]
        logits = torch.matmul(qc, k.transpose(-2, -1)) * scale
        val, idx = torch.topk(logits, topk, dim=-1, sorted=False)  # order is irrelevant: same soft-max, same gather
        attn = torch.softmax(val, dim=-1)
        gathered = gather_rows(v, idx)  # (..., nqc, topk, d)
        outs.append(torch.einsum("...qk,...qkd->...qd", attn, gathered))
        if return_indices:
            idxs.append(idx)
    out = torch.cat(outs, dim=-2) if len(outs) > 1 else outs[0]
    if return_indices:
        return out, torch.cat(idxs, dim=-2)
    return out


def gather_rows(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``v`` (..., N, d), ``idx`` (..., Q, k) -> (..., Q, k, d) with ``out[..., q, j] = v[..., idx[q, j]]``."""
    lead = v.shape[:-2]
    n, d = v.shape[-2:]
    qn, kk = idx.shape[-2:]
    flat_v = v.reshape(-1, n, d)
    flat_i = idx.reshape(-1, qn * kk)
    out = torch.gather(flat_v, 1, flat_i.unsqueeze(-1).expand(-1, -1, d))
    return out.reshape(*lead, qn, kk, d)


# --------------------------------------------------------------------------- checkpoints
def load_matching_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy tensors whose key and shape match (the official ``load_from`` behaviour).

    Returns ``(loaded_keys, skipped_keys)``.
    """
    own = model.state_dict()
    loaded, skipped = [], []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            own[key] = value
            loaded.append(key)
        else:
            skipped.append(key)
    model.load_state_dict(own)
    return loaded, skipped


__all__ = [
    "SegmentationNet",
    "pad_to_multiple",
    "padded_side",
    "DropPath",
    "LayerNorm2d",
    "drop_path_rates",
    "init_transformer_weights",
    "ConvStem",
    "ConvMerge",
    "Mlp",
    "PreNormBlock",
    "UpBlock",
    "SkipFusion",
    "SegHeadUp4",
    "topk_sparse_attention",
    "gather_rows",
    "load_matching_state_dict",
]
