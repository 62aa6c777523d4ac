"""DMAF-Net (Lan, Li, Xia, Zhang, arXiv:2506.11691): segmentation from incomplete multi-sequence MRI.

Implements SEED_METHODS §5 in 2-D. The official repository holds no code, so the skeleton follows the
base code bases the authors name (RFNet / mmFormer / PASSION) and everything the paper's figures do not
fix is a [choice] kept configurable (§5.12).

* one encoder per sequence (§5.3): pre-norm convs (InstanceNorm without affine, LeakyReLU 0.2, 3x3 conv
  with reflect padding), five levels, channels ``base * 2**l``;
* a Dynamic Modality-Aware Fusion module per level (§5.4): each sequence's map pooled to a ``P x P``
  token grid, projected, plus positional and sequence embeddings; masked multi-head attention layers
  across the tokens of all sequences with a key-padding mask that removes absent sequences (their tokens
  are zeroed after every layer); a shared 1x1 map head gives one logit map per sequence, upsampled to the
  level's size; the **adaptive mask** is a softmax over the *present* sequences only, so an absent
  sequence gets a weight of exactly 0 and the weights of the present ones sum to one at every pixel;
  the fused map is ``sum_m Att^m * e^m``; ``omega^m`` (the mean of ``Att^m``) is the sequence's
  contribution weight;
* a shared (unimodal) decoder used for every sequence and a fusion decoder on the fused maps with deep
  supervision (§5.3);
* the relation head of the distillation (§5.5): a shared projection ``W_c`` (initialised to the identity)
  and a masked graph attention whose mask is the 8-neighbourhood of the deepest token grid;
* the distillation losses as pure functions (§5.5, §5.6): covariance consistency, masked attention
  alignment and prototype alignment. They are zero when the student's features equal the teacher's
  (covariance, prototypes: spec §11.7 item 10).

Why 2-D on short-axis slices: MyoPS studies have 2-6 short-axis slices of 12-23 mm thickness against
0.73-0.76 mm pixels, so there is almost no through-plane context to learn from and a 3-D operator would
mostly see padding; each slice is a full 2-D image of the heart, and training on slices multiplies the
83 training samples rather than leaving 20 volumes. The 3-D operators of §5 become 2-D ones and the
token grid ``P^3 = 5^3`` becomes ``8 x 8`` (§5.2).

Absent sequences are removed twice over: their input channels and every level of their features are
replaced by zeros (``torch.where``, so even NaN values cannot leak), and the adaptive mask gives them
weight 0. The fused output therefore does not depend on the values given for an absent sequence.

``small`` (§11.4): base width 8 (channels 8..128) and one MMHA layer per fusion module; ``full``: base
16 (RFNet's width, channels 16..256) and four MMHA layers. Input channels are the sequences (``M``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import init_transformer_weights, pad_to_multiple
from medseg.models.registry import ModelCard, register

CONFIGS: dict[str, dict] = {
    "full": dict(base=16, levels=5, tokens=8, mmha_layers=4, relation_heads=8),
    "small": dict(base=8, levels=5, tokens=8, mmha_layers=1, relation_heads=4),
}


# --------------------------------------------------------------------------- encoder / decoder pieces
class PreNormConv(nn.Sequential):
    """InstanceNorm (no affine) . LeakyReLU(0.2) . Conv k x k (reflect padding, bias): the base's unit."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.InstanceNorm2d(cin, affine=False),
            nn.LeakyReLU(0.2, inplace=False),
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, padding_mode="reflect" if kernel > 1 else "zeros"),
        )


class ResidualPair(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(PreNormConv(dim, dim), PreNormConv(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SequenceEncoder(nn.Module):
    """One sequence's encoder: level 1 plain conv + residual pair; levels 2.. stride-2 pre-norm conv + pair."""

    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, dims[0], 3, padding=1, padding_mode="reflect")
        self.downs = nn.ModuleList([PreNormConv(dims[i - 1], dims[i], stride=2) for i in range(1, len(dims))])
        self.blocks = nn.ModuleList([ResidualPair(d) for d in dims])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.blocks[0](self.stem(x))
        feats = [x]
        for down, block in zip(self.downs, self.blocks[1:]):
            x = block(down(x))
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """U-shaped decoder over five levels (§5.3): up x2, pre-norm conv, concat skip, pre-norm conv, 1x1.

    Used as the shared unimodal decoder (one weight set for every sequence) and, with deep supervision
    heads on the states of levels 5..2, as the fusion decoder.
    """

    def __init__(self, dims: tuple[int, ...], num_classes: int, deep_supervision: bool = False) -> None:
        super().__init__()
        n = len(dims)
        self.ups = nn.ModuleList([PreNormConv(dims[l + 1], dims[l]) for l in range(n - 1)])
        self.merges = nn.ModuleList([PreNormConv(2 * dims[l], dims[l]) for l in range(n - 1)])
        self.points = nn.ModuleList([PreNormConv(dims[l], dims[l], kernel=1) for l in range(n - 1)])
        self.head = nn.Conv2d(dims[0], num_classes, 1)
        self.ds_heads = nn.ModuleList([nn.Conv2d(dims[l], num_classes, 1) for l in range(1, n)]) if deep_supervision else None

    def forward(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits at level 1 and the deep-supervision logits (deepest first; empty without heads)."""
        x = skips[-1]
        ds: list[torch.Tensor] = []
        if self.ds_heads is not None:
            ds.append(self.ds_heads[-1](x))
        for l in range(len(skips) - 2, -1, -1):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.ups[l](x)
            x = self.points[l](self.merges[l](torch.cat([x, skips[l]], dim=1)))
            if self.ds_heads is not None and l > 0:
                ds.append(self.ds_heads[l - 1](x))
        return self.head(x), ds


# --------------------------------------------------------------------------- DMAF
class MaskedAttentionLayer(nn.Module):
    """Pre-LayerNorm transformer layer whose attention ignores the tokens of absent sequences (key padding)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, t: torch.Tensor, key_present: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        qkv = self.qkv(self.norm1(t)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_present[:, None, None, :])
        t = t + self.proj(out.transpose(1, 2).reshape(b, n, c))
        return t + self.ffn(self.norm2(t))


class DMAF(nn.Module):
    """Dynamic Modality-Aware Fusion of one level (§5.4); returns the fused map and ``Att`` (B, M, H, W)."""

    def __init__(self, dim: int, modalities: int, tokens: int = 8, layers: int = 4, heads: int | None = None) -> None:
        super().__init__()
        heads = heads or max(1, min(8, dim // 8))
        if dim % heads:
            raise ValueError(f"{dim} channels are not divisible by {heads} heads")
        self.tokens = tokens
        self.project = nn.Linear(dim, dim)
        self.pos = nn.Parameter(torch.zeros(1, tokens * tokens, dim))
        self.modality = nn.Parameter(torch.zeros(modalities, dim))
        self.layers = nn.ModuleList([MaskedAttentionLayer(dim, heads) for _ in range(layers)])
        self.map_head = nn.Linear(dim, 1)  # the shared Conv1x1(C -> 1) on restored token maps
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.modality, std=0.02)

    def attention_logits(self, feats: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Per-sequence logit maps on the token grid, (B, M, P, P)."""
        b, m, p = feats[0].shape[0], len(feats), self.tokens
        tok = [self.project(F.adaptive_avg_pool2d(e, p).flatten(2).transpose(1, 2)) + self.pos + self.modality[i] for i, e in enumerate(feats)]
        t = torch.cat(tok, dim=1)  # (B, M * P^2, C)
        key_present = present.repeat_interleave(p * p, dim=1)
        for layer in self.layers:
            t = torch.where(key_present[..., None], layer(t, key_present), torch.zeros((), dtype=t.dtype, device=t.device))
        return self.map_head(t).reshape(b, m, p, p)

    def forward(self, feats: list[torch.Tensor], present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = feats[0].shape[-2:]
        logits = F.interpolate(self.attention_logits(feats, present), size=(h, w), mode="bilinear", align_corners=False)
        att = adaptive_mask_softmax(logits, present)
        fused = sum(att[:, i : i + 1] * e for i, e in enumerate(feats))
        return fused, att


def adaptive_mask_softmax(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """``Att^m = delta_m exp(a^m) / sum_j delta_j exp(a^j)`` over dim 1: absent sequences get exactly 0."""
    masked = logits.masked_fill(~present[:, :, None, None], float("-inf"))
    return masked.softmax(dim=1)


# --------------------------------------------------------------------------- relation head and losses
class RelationHead(nn.Module):
    """The distillation's learnable parts (§5.5): shared projection ``W_c`` and the masked graph attention."""

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            heads = 1
        self.heads = heads
        self.project = nn.Linear(dim, dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        init_transformer_weights(self)
        with torch.no_grad():  # W_c starts as the identity: identical features give zero covariance loss
            self.project.weight.copy_(torch.eye(dim))

    def graph_attention(self, student: torch.Tensor, teacher: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``G = MHA(Q = student W_q, K = teacher W_k, V = teacher W_v)`` restricted to grid neighbours."""
        b, r, c = student.shape
        d = c // self.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(b, r, self.heads, d).transpose(1, 2)

        mask = grid_adjacency(*grid, device=student.device)
        out = F.scaled_dot_product_attention(split(self.q(student)), split(self.k(teacher)), split(self.v(teacher)), attn_mask=mask)
        return self.out(out.transpose(1, 2).reshape(b, r, c))


def as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major token order."""
    return x.flatten(2).transpose(1, 2)


def grid_adjacency(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (H*W, H*W): each grid cell and its 8 neighbours (the 2-D form of the 26-neighbourhood)."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    i, j = i.flatten(), j.flatten()
    return ((i[:, None] - i[None, :]).abs() <= 1) & ((j[:, None] - j[None, :]).abs() <= 1)


def token_covariance(z: torch.Tensor) -> torch.Tensor:
    """Per-sample channel covariance (B, C, C) of L2-normalised tokens (B, R, C)."""
    z = F.normalize(z.float(), dim=-1)
    zc = z - z.mean(dim=1, keepdim=True)
    return zc.transpose(1, 2) @ zc / max(1, z.shape[1] - 1)


def covariance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Covariance consistency (§5.5): ``||Sigma(student) - Sigma(sg teacher)||_F^2 / C^2`` per sample, (B,)."""
    c = student.shape[-1]
    diff = token_covariance(student) - token_covariance(teacher.detach())
    return diff.square().sum(dim=(1, 2)) / (c * c)


def attention_alignment_loss(graph: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Masked attention alignment (§5.5): mean over tokens of ``1 - cos(G, sg teacher)``, per sample (B,)."""
    return (1.0 - F.cosine_similarity(graph.float(), teacher.detach().float(), dim=-1)).mean(dim=1)


def soft_class_masks(target: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """Each class's share of every cell of a ``size`` grid (average-pooled one-hot labels), (B, K, h, w)."""
    onehot = F.one_hot(target.long(), num_classes).permute(0, 3, 1, 2).float()
    return F.adaptive_avg_pool2d(onehot, size)


def class_prototypes(features: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling: prototypes (B, K, C) and each class's mass (B, K) on the grid."""
    feats = features.float().flatten(2)  # (B, C, R)
    weights = masks.flatten(2)  # (B, K, R)
    mass = weights.sum(dim=-1)
    protos = weights @ feats.transpose(1, 2) / (mass[..., None] + 1e-5)
    return protos, mass


def prototype_loss(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Prototype alignment (§5.6): mean over the classes present of ``1 - cos(p_student, sg p_teacher)``, (B,)."""
    ps, mass = class_prototypes(student, masks)
    pt, _ = class_prototypes(teacher.detach(), masks)
    present = (mass > 0).float()
    gap = 1.0 - F.cosine_similarity(ps, pt, dim=-1)
    return (gap * present).sum(dim=1) / present.sum(dim=1).clamp_min(1.0)


# --------------------------------------------------------------------------- the network
@dataclass
class FusionOutput:
    """What one fusion pass produces: logits at the input size, deep-supervision logits, per-level pieces."""

    logits: torch.Tensor
    deep: list[torch.Tensor]
    fused: list[torch.Tensor]
    attention: list[torch.Tensor]

    @property
    def weights(self) -> torch.Tensor:
        """``omega^m_L``: each sequence's mean fusion weight at the deepest level, (B, M)."""
        return self.attention[-1].mean(dim=(2, 3))


class DMAFNet(nn.Module):
    """DMAF-Net for ``in_channels`` sequences (any subset of which may be absent) and ``num_classes`` classes.

    ``forward(x, present)`` takes ``x`` (B, M, H, W) and ``present`` (B, M) or (M,) booleans (default: all
    present) and returns the fused logits (B, K, H, W) for any H x W (reflect padding to a multiple of
    16, cropped back). Training uses :meth:`encode`, :meth:`fuse` and :meth:`unimodal` directly.
    """

    min_side = 32

    def __init__(self, in_channels: int = 3, num_classes: int = 6, base: int = 16, levels: int = 5, tokens: int = 8,
                 mmha_layers: int = 4, relation_heads: int = 8) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError("DMAF-Net needs at least one sequence")
        self.in_channels = self.modalities = in_channels
        self.num_classes = num_classes
        self.dims = tuple(base * 2**l for l in range(levels))
        self.stride_multiple = 2 ** (levels - 1)
        self.encoders = nn.ModuleList([SequenceEncoder(self.dims) for _ in range(in_channels)])
        self.fusions = nn.ModuleList([DMAF(d, in_channels, tokens, mmha_layers) for d in self.dims])
        self.shared_decoder = Decoder(self.dims, num_classes)
        self.fusion_decoder = Decoder(self.dims, num_classes, deep_supervision=True)
        self.relation = RelationHead(self.dims[-1], relation_heads)
        for fusion in self.fusions:
            init_transformer_weights(fusion)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    # ------------------------------------------------------------------ pieces
    def presence(self, x: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
        """``present`` as (B, M) booleans on ``x``'s device; refuses an empty subset."""
        b, m = x.shape[:2]
        if m != self.modalities:
            raise ValueError(f"expected {self.modalities} sequences, got {m}")
        if present is None:
            return torch.ones(b, m, dtype=torch.bool, device=x.device)
        present = torch.as_tensor(present, device=x.device).bool()
        if present.ndim == 1:
            present = present[None].expand(b, m)
        if present.shape != (b, m):
            raise ValueError(f"present must be ({b}, {m}) or ({m},), not {tuple(present.shape)}")
        if not bool(present.any(dim=1).all()):
            raise ValueError("every sample needs at least one present sequence")
        return present

    def encode(self, x: torch.Tensor, present: torch.Tensor) -> list[list[torch.Tensor]]:
        """Per sequence, per level features; absent sequences' inputs and features are zeros."""
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        feats = []
        for i, encoder in enumerate(self.encoders):
            keep = present[:, i, None, None, None]
            levels = encoder(torch.where(keep, x[:, i : i + 1], zero))
            feats.append([torch.where(keep, f, zero) for f in levels])
        return feats

    @staticmethod
    def drop(feats: list[list[torch.Tensor]], present: torch.Tensor) -> list[list[torch.Tensor]]:
        """The features of a sub-input: the complete input's features with absent sequences zeroed.

        Encoders are per sequence, so a present sequence's features do not depend on the others: the
        student's features are the teacher's with the absent ones removed (one encoder pass per step).
        """
        out = []
        for i, levels in enumerate(feats):
            keep = present[:, i, None, None, None]
            out.append([torch.where(keep, f, torch.zeros((), dtype=f.dtype, device=f.device)) for f in levels])
        return out

    def fuse(self, feats: list[list[torch.Tensor]], present: torch.Tensor) -> FusionOutput:
        fused, atts = [], []
        for level, fusion in enumerate(self.fusions):
            f, a = fusion([feats[m][level] for m in range(self.modalities)], present)
            fused.append(f)
            atts.append(a)
        logits, deep = self.fusion_decoder(fused)
        return FusionOutput(logits, deep, fused, atts)

    def unimodal(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The shared decoder on one sequence's features."""
        return self.shared_decoder(feats)[0]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return pad_to_multiple(x, self.stride_multiple, self.min_side)

    # ------------------------------------------------------------------ inference
    def forward_fusion(self, x: torch.Tensor, present: torch.Tensor | None = None) -> FusionOutput:
        """Fused logits (cropped to the input size) with the attention maps and fusion weights."""
        present = self.presence(x, present)
        h, w = x.shape[-2:]
        x = torch.where(present[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        out = self.fuse(self.encode(self.pad(x), present), present)
        out.logits = out.logits[..., :h, :w]
        return out

    def forward(self, x: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_fusion(x, present).logits


@register(
    ModelCard(
        name="dmafnet",
        title="DMAF-Net (dynamic modality-aware fusion for incomplete multi-sequence MRI)",
        task="2-D segmentation from any non-empty subset of co-registered sequences",
        paper="Lan, Li, Xia, Zhang, 'DMAF-Net: An Effective Modality Rebalancing Framework for Incomplete "
        "Multi-Modal Medical Image Segmentation', arXiv:2506.11691 (2025)",
        input_channels=(1, 2, 3, 4),
        notes="Input channels are sequences; forward(x, present) takes a (B, M) availability mask. full: base width 16, "
        "4 MMHA layers per fusion; small: base width 8, 1 MMHA layer. 2-D reading of the paper's 3-D design.",
    )
)
def build_dmafnet(in_channels: int = 3, num_classes: int = 6, config: str = "small", **overrides) -> DMAFNet:
    return DMAFNet(in_channels, num_classes, **{**CONFIGS[config], **overrides})


__all__ = [
    "CONFIGS",
    "DMAF",
    "DMAFNet",
    "Decoder",
    "FusionOutput",
    "MaskedAttentionLayer",
    "RelationHead",
    "SequenceEncoder",
    "adaptive_mask_softmax",
    "as_tokens",
    "attention_alignment_loss",
    "build_dmafnet",
    "class_prototypes",
    "covariance_loss",
    "grid_adjacency",
    "prototype_loss",
    "soft_class_masks",
    "token_covariance",
]
