"""TCSAFormer (Xia, Li, Lan, arXiv:2508.04058): compressed attention + dual-branch FFN in a U-shape (spec §2).

What this implements (from the official code ``XiaZunhui/TCSAFormer``, ``cam.py`` / ``TCSAFormer.py``):
a conv stem and conv patch merging, four encoder stages of TCSAFormer blocks (2, 2, 8, 2 blocks at 64,
128, 256, 512 channels), three decoder steps (``U x2`` + Conv1x1 + BN, add the skip, channel-then-spatial
skip fusion, 8 / 2 / 2 blocks) and a ``U x4`` + Conv1x1 head (§2.1). Each block is CPE -> Compressed
Attention -> DBFFN (§2.2, §2.4). Compressed Attention (§2.3) keeps the tokens most relevant to a
global token (TCP pruning; pruned tokens skip attention through a shortcut), merges redundant kept
tokens by bipartite soft matching in score order, runs row-top-k sparse attention on the merged set
(the k keys/values are gathered; no masked dense soft-max) and restores every token before the output
projection (TDP). ``W_g`` / ``W_k`` (``attn.global_token`` / ``attn.k``) are used only through sort
indices and the no-grad merge metric, so -- as in the official code -- they never receive gradients.

Choices where the spec leaves room ([CHOICE]) or the official code would break:
* Token budgets are pure functions of the runtime token count (:func:`tcsa_budgets`), clamped to
  ``[1, N]``; ``k = max(1, n_m // 8)`` (the official code hard-codes the map side and gives NaN for
  ``n_m < 8``).
* The compression plan (sort, matching) is computed under ``torch.no_grad``; this is the same function
  and the same (absent) gradients as the official code, without building a graph for ``W_g``/``W_k``.
  Tokens are ranked by the logits ``g . K0`` rather than by their soft-max (same order; the float32
  soft-max turns near-equal scores into ties whose order then depends on round-off).
* The merge metric is L2-normalised with ``F.normalize`` (eps 1e-12) instead of a bare division, so an
  all-zero key gives similarity 0 instead of NaN.
* ``small`` config: a quarter of the channels (16, 32, 64, 128), one block per encoder and decoder
  stage, the published head counts (2, 4, 8, 16) hence head dim 8; all modules (TCP, merging, TKSA,
  TDP, DBFFN, skip fusion) kept, same ratios and drop-path schedule.
* Parameter names follow the official model where they are ours to choose (``downsample_layers``,
  ``stages``, ``stages_de``, ``upsample_layers``, ``skip_layers``, ``attn.qkv/k/global_token/proj``,
  the DBFFN layers); :func:`convert_official_state_dict` maps the remaining official keys (e.g. of the
  unpublished ImageNet encoder checkpoint) onto this module for :func:`load_matching_state_dict`.

The U-shaped skeleton (:class:`UShapedTransformer`) is generic and re-used by DCAU-Net (§1.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.blocks import (
    ConvMerge,
    ConvStem,
    PreNormBlock,
    SegHeadUp4,
    SegmentationNet,
    SkipFusion,
    UpBlock,
    drop_path_rates,
    init_transformer_weights,
    topk_sparse_attention,
)
from medseg.models.registry import ModelCard, register

CONFIGS: dict[str, dict[str, Any]] = {
    # §2.7, official constructor: depths (2,2,8,2), dims = qk dims (64,128,256,512), head_dim 32.
    "full": dict(
        dims=(64, 128, 256, 512),
        depths=(2, 2, 8, 2),
        head_dim=32,
        keep_ratios=(0.5, 0.6, 0.7, 0.9),
        merge_ratios=(0.3, 0.2, 0.1, 0.1),
        ffn_expansion=2,
        drop_path_rate=0.2,
    ),
    # §11.4: a quarter of the channels, one block per stage, every module kept.
    "small": dict(
        dims=(16, 32, 64, 128),
        depths=(1, 1, 1, 1),
        head_dim=8,
        keep_ratios=(0.5, 0.6, 0.7, 0.9),
        merge_ratios=(0.3, 0.2, 0.1, 0.1),
        ffn_expansion=2,
        drop_path_rate=0.2,
    ),
}


# --------------------------------------------------------------------------- token budgets (§2.3)
class TokenBudgets(NamedTuple):
    n_keep: int  # tokens kept by pruning
    n_m: int  # tokens left after merging
    r: int  # tokens merged away
    k: int  # keys per query in TKSA


def tcsa_budgets(n: int, keep_ratio: float, merge_ratio: float) -> TokenBudgets:
    """Token budgets of Compressed Attention for ``n`` tokens (§2.3), as Python float64 arithmetic.

    ``n_keep = floor(n * keep_ratio)``, ``M = floor((1 - merge_ratio) * n_keep)``,
    ``r = min(n_keep - M, n_keep // 2)``, ``n_m = n_keep - r``, ``k = floor(n_m / 8)``; every count is
    clamped to ``[1, n]`` (§11.1) -- the floor of 1 on ``k`` is our [CHOICE] for tiny maps.
    """
    if n < 1:
        raise ValueError(f"need at least one token, got {n}")
    n_keep = min(max(int(n * keep_ratio), 1), n)
    m = int((1 - merge_ratio) * n_keep)
    r = max(0, min(n_keep - m, n_keep // 2))
    n_m = n_keep - r
    k = min(max(n_m // 8, 1), n_m)
    return TokenBudgets(n_keep, n_m, r, k)


# --------------------------------------------------------------------------- compressed attention (§2.3)
def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, C), ``idx`` (B, n) -> (B, n, C) with ``out[b, i] = x[b, idx[b, i]]``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


@dataclass
class CompressionPlan:
    """Per-sample indices of TCP pruning and bipartite merging (all ``long``, computed without gradient).

    ``keep_idx`` (B, n_keep): kept token positions in descending score order. In that kept order, set
    A = even positions, set B = odd positions. ``unmerged`` (B, |A| - r): A positions left alone, in
    ranked order; ``merged_src`` (B, r): A positions merged away; ``merged_dst`` (B, r): the B position
    each is averaged into. ``unmerge_index`` (B, n_keep): for each kept position, the row of the merged
    sequence whose attention output it receives (TDP un-merge as one gather).
    """

    budgets: TokenBudgets
    keep_idx: torch.Tensor
    unmerged: torch.Tensor
    merged_src: torch.Tensor
    merged_dst: torch.Tensor
    unmerge_index: torch.Tensor

    @property
    def merging(self) -> bool:
        return self.budgets.r > 0


class CompressedAttention(nn.Module):
    """Compressed Attention (CA, §2.3): TCP pruning + bipartite merging -> TKSA -> TDP -> projection.

    Input and output are channels-last ``(B, H, W, C)``; token budgets follow the runtime ``H * W``.
    """

    def __init__(self, dim: int, num_heads: int, keep_ratio: float, merge_ratio: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.keep_ratio = keep_ratio
        self.merge_ratio = merge_ratio
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        # W_k and W_g of TCP. [QUIRK] used only through sort indices and the no-grad merge metric:
        # they never receive gradients (kept as parameters: they count and are in checkpoints).
        self.k = nn.Linear(dim, dim, bias=False)
        self.global_token = nn.Linear(dim, dim, bias=False)

    def budgets(self, n: int) -> TokenBudgets:
        return tcsa_budgets(n, self.keep_ratio, self.merge_ratio)

    @torch.no_grad()
    def plan(self, tokens: torch.Tensor) -> CompressionPlan:
        """TCP (a)+(b): kept tokens in score order and the bipartite matching, per sample. ``tokens`` (B, N, C)."""
        # Ranking and matching in float32 even under autocast: bf16 scores would be mostly ties.
        with torch.autocast(tokens.device.type, enabled=False):
            return self._plan(tokens.float())

    def _plan(self, tokens: torch.Tensor) -> CompressionPlan:
        b, n, _ = tokens.shape
        budgets = self.budgets(n)
        n_keep, _, r, _ = budgets
        g = F.linear(tokens.mean(dim=1), self.global_token.weight.float())  # (B, C)
        k0 = F.linear(tokens, self.k.weight.float())  # (B, N, C)
        # The official code sorts soft-max(tau * g.K0); soft-max and tau are monotone, so we sort the logits
        # g.K0 themselves: same order, without the float32 ties the soft-max creates for near-equal scores.
        score = torch.einsum("bc,bnc->bn", g, k0)
        keep_idx = torch.sort(score, dim=-1, descending=True).indices[:, :n_keep]
        arange = torch.arange(n_keep, device=tokens.device).expand(b, -1)
        if r == 0:  # no merging: identity (the official matching returns identity functions)
            empty = keep_idx.new_empty(b, 0)
            return CompressionPlan(budgets, keep_idx, arange, empty, empty, arange)

        metric = F.normalize(_take(k0, keep_idx), dim=-1)
        sim = metric[:, 0::2] @ metric[:, 1::2].transpose(1, 2)  # (B, |A|, |B|) cosine similarity
        best, dst = sim.max(dim=-1)
        rank = torch.argsort(best, dim=-1, descending=True)
        merged_src, unmerged = rank[:, :r], rank[:, r:]
        merged_dst = dst.gather(1, merged_src)

        n_unm, n_b = unmerged.shape[1], n_keep // 2
        # Merged sequence = [unmerged A in ranked order ; all B]; map each kept position to its row.
        unmerge_index = torch.empty_like(keep_idx)
        unmerge_index[:, 1::2] = n_unm + torch.arange(n_b, device=tokens.device)
        unmerge_index.scatter_(1, 2 * unmerged, arange[:, :n_unm])
        unmerge_index.scatter_(1, 2 * merged_src, n_unm + merged_dst)  # merged A copies its destination
        return CompressionPlan(budgets, keep_idx, unmerged, merged_src, merged_dst, unmerge_index)

    @staticmethod
    def merge(kept: torch.Tensor, plan: CompressionPlan) -> torch.Tensor:
        """TCP (b) step 4-5 on features (with gradient): (B, n_keep, C) -> (B, n_m, C)."""
        if not plan.merging:
            return kept
        a, dst = kept[:, 0::2], kept[:, 1::2]
        src = _take(a, plan.merged_src)
        index = plan.merged_dst.unsqueeze(-1).expand(-1, -1, kept.shape[-1])
        # mean over the destination and every source averaged into it (include_self=True)
        dst = dst.scatter_reduce(1, index, src, reduce="mean", include_self=True)
        return torch.cat([_take(a, plan.unmerged), dst], dim=1)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, return_indices: bool = True):
        """TKSA core: every query attends its ``topk`` largest-logit keys; values are gathered.

        ``q, k, v`` (B, h, n, d) -> output (B, h, n, d) and, with ``return_indices``, the selected key
        indices (B, h, n, topk). The indices are as large as the logits kept (k grows with n), so
        they are only kept when asked for.
        """
        if return_indices:
            return topk_sparse_attention(q, k, v, topk, self.scale, return_indices=True)
        return topk_sparse_attention(q, k, v, topk, self.scale), None

    def forward(
        self, x: torch.Tensor, plan: CompressionPlan | None = None, return_info: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        """``x`` (B, H, W, C) -> (B, H, W, C). Pass ``plan`` to hold the pruning/merging indices fixed."""
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        if plan is None:
            plan = self.plan(tokens)
        n_m, topk = plan.budgets.n_m, plan.budgets.k

        merged = self.merge(_take(tokens, plan.keep_idx), plan)  # (B, n_m, C)
        q, k, v = self.qkv(merged).reshape(b, n_m, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attended, topk_idx = self.attend(q, k, v, topk, return_indices=return_info)
        attended = attended.transpose(1, 2).reshape(b, n_m, c)

        # TDP: un-merge (merged A tokens copy their destination's output), scatter back to the kept
        # positions; pruned positions keep their (LN-ed) input -- the shortcut X_p.
        restored_kept = _take(attended, plan.unmerge_index)
        keep_index = plan.keep_idx.unsqueeze(-1).expand(-1, -1, c)
        restored = tokens.to(restored_kept.dtype).scatter(1, keep_index, restored_kept)
        out = self.proj(restored).reshape(b, h, w, c)
        if return_info:
            return out, {"plan": plan, "budgets": plan.budgets, "topk_idx": topk_idx}
        return out


# --------------------------------------------------------------------------- DBFFN (§2.4)
class DBFFN(nn.Module):
    """Dual-branch FFN (§2.4) on channels-last tokens: BN, 1x1 to 2C, DW3x3 / DW7x7 branches, cross-concat,
    grouped 3x3 / 7x7 back to C each, 1x1 to C. No biases. Layer names as in the official code."""

    def __init__(self, dim: int, expansion: float = 2) -> None:
        super().__init__()
        hidden = int(dim * expansion)
        self.norm_in = nn.BatchNorm2d(dim)
        self.project_in = nn.Conv2d(dim, hidden, 1, bias=False)
        self.norm_proj = nn.BatchNorm2d(hidden)
        self.dwconv3x3 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.dwconv7x7 = nn.Conv2d(hidden, hidden, 7, padding=3, groups=hidden, bias=False)
        self.act3 = nn.GELU()
        self.act7 = nn.GELU()
        # grouped 2C -> C, groups = C: each output channel sees two adjacent channels of [P_i; R_i]
        self.dwconv3x3_1 = nn.Conv2d(hidden, dim, 3, padding=1, groups=dim, bias=False)
        self.dwconv7x7_1 = nn.Conv2d(hidden, dim, 7, padding=3, groups=dim, bias=False)
        self.norm1 = nn.BatchNorm2d(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.project_out = nn.Conv2d(2 * dim, dim, 1, bias=False)
        self.norm_out = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.norm_proj(self.project_in(self.norm_in(x.permute(0, 3, 1, 2))))
        p1, p2 = self.act3(self.dwconv3x3(z)).chunk(2, dim=1)
        r1, r2 = self.act7(self.dwconv7x7(z)).chunk(2, dim=1)
        y1 = self.norm1(self.dwconv3x3_1(torch.cat([p1, r1], dim=1)))
        y2 = self.norm2(self.dwconv7x7_1(torch.cat([p2, r2], dim=1)))
        return self.norm_out(self.project_out(torch.cat([y1, y2], dim=1))).permute(0, 2, 3, 1)


# --------------------------------------------------------------------------- U-shaped skeleton (§2.1, §1.1)
class UShapedTransformer(SegmentationNet):
    """Conv stem, 4 encoder stages with conv merging, 3 decoder steps, ``U x4`` head (§2.1; DCAU-Net §1.1).

    Decoder step ``i`` (``i = 0, 1, 2`` at H/16, H/8, H/4): ``U x2`` + Conv1x1 + BN, add the encoder
    output of that resolution, skip fusion (§2.5), then the decoder blocks. ``make_block(stage, j, decoder)``
    builds block ``j`` of resolution index ``stage`` (0 = H/4 ... 3 = H/32).
    """

    stride_multiple = 32
    min_side = 32

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        dims: Sequence[int],
        depths: Sequence[int],
        decoder_depths: Sequence[int],
        make_block: Callable[[int, int, bool], nn.Module],
    ) -> None:
        super().__init__(in_channels, num_classes)
        if len(dims) != 4 or len(depths) != 4 or len(decoder_depths) != 3:
            raise ValueError("expected 4 stage widths, 4 encoder depths and 3 decoder depths")
        self.downsample_layers = nn.ModuleList(
            [ConvStem(3, dims[0])] + [ConvMerge(dims[i], dims[i + 1]) for i in range(3)]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*[make_block(s, j, False) for j in range(depths[s])]) for s in range(4)
        )
        self.upsample_layers = nn.ModuleList(UpBlock(dims[3 - i], dims[2 - i]) for i in range(3))
        self.skip_layers = nn.ModuleList(SkipFusion(dims[2 - i]) for i in range(3))
        self.stages_de = nn.ModuleList(
            nn.Sequential(*[make_block(2 - i, j, True) for j in range(decoder_depths[i])]) for i in range(3)
        )
        self.head = SegHeadUp4(dims[0], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            skips.append(x)
        for i, (up, fuse, stage) in enumerate(zip(self.upsample_layers, self.skip_layers, self.stages_de)):
            x = stage(fuse(skips[2 - i] + up(x)))
        return self.head(x)


# --------------------------------------------------------------------------- the network
class TCSAFormer(UShapedTransformer):
    """TCSAFormer (§2): U-shaped network of Compressed-Attention + DBFFN blocks."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        dims: Sequence[int] = CONFIGS["full"]["dims"],
        depths: Sequence[int] = CONFIGS["full"]["depths"],
        head_dim: int = 32,
        keep_ratios: Sequence[float] = CONFIGS["full"]["keep_ratios"],
        merge_ratios: Sequence[float] = CONFIGS["full"]["merge_ratios"],
        ffn_expansion: float = 2,
        drop_path_rate: float = 0.2,
    ) -> None:
        heads = [d // head_dim for d in dims]
        if any(h < 1 or d % head_dim for h, d in zip(heads, dims)):
            raise ValueError(f"stage widths {tuple(dims)} must be multiples of head_dim {head_dim}")
        # §2.2: linspace(0, rate, #encoder blocks) in order. [QUIRK] decoder step i (resolution 2 - i)
        # re-uses the encoder rates from the cumulative depth before encoder stage i.
        rates = drop_path_rates(drop_path_rate, sum(depths))
        offsets = [sum(depths[:s]) for s in range(4)]

        def make_block(stage: int, j: int, decoder: bool) -> nn.Module:
            start = offsets[2 - stage] if decoder else offsets[stage]
            mixer = CompressedAttention(dims[stage], heads[stage], keep_ratios[stage], merge_ratios[stage])
            rate = rates[min(start + j, len(rates) - 1)]  # clamp: only unusual depth tuples run past the end
            return PreNormBlock(dims[stage], mixer, DBFFN(dims[stage], ffn_expansion), drop_path=rate)

        super().__init__(in_channels, num_classes, dims, depths, tuple(depths[2::-1]), make_block)
        init_transformer_weights(self)  # §2.6


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys of an official ``TCSAFormer`` / ``TCSA_Former`` state dict to this module's keys.

    Use with :func:`medseg.models.blocks.load_matching_state_dict` (copies what matches, reports the rest).
    """
    rules = [
        (r"^(module\.)?(TCSAFormer\.)?", ""),
        (r"\.mlp\.", ".ffn."),
        # the official up block is (Conv, BN); ours is (Upsample, Conv, BN): shift the index by one
        (r"^upsample_layers\.(\d+)\.([01])\.", lambda m: f"upsample_layers.{m[1]}.{int(m[2]) + 1}."),
        (r"^skip_layers\.(\d+)\.channel_attention\.", r"skip_layers.\1.channel."),
        (r"^skip_layers\.(\d+)\.spatial_attention\.", r"skip_layers.\1.spatial."),
        (r"^output\.", "head.1."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@register(
    ModelCard(
        name="tcsaformer",
        title="TCSAFormer",
        task="2-D semantic segmentation",
        paper=(
            "Xia, Li, Lan, 'TCSAFormer: Efficient Vision Transformer with Token Compression and Sparse "
            "Attention for Medical Image Segmentation', arXiv:2508.04058 (2025)"
        ),
        notes="Compressed attention (pruning, merging, top-k sparse attention) + dual-branch FFN; spec §2.",
        extra={
            "params_full_1class": 21_969_472,
            "params_full_9class": 21_969_984,
            "official_code": "XiaZunhui/TCSAFormer",
        },
    )
)
def build_tcsaformer(in_channels: int = 3, num_classes: int = 2, config: str = "small", **overrides: Any) -> TCSAFormer:
    """TCSAFormer in config ``full`` (§2.7) or ``small`` (§11.4); ``overrides`` replace config entries."""
    return TCSAFormer(in_channels, num_classes, **{**CONFIGS[config], **overrides})


__all__ = [
    "CONFIGS",
    "TokenBudgets",
    "tcsa_budgets",
    "CompressionPlan",
    "CompressedAttention",
    "DBFFN",
    "UShapedTransformer",
    "TCSAFormer",
    "convert_official_state_dict",
    "build_tcsaformer",
]
