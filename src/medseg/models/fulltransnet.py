"""FullTransNet: encoder-decoder transformer with local-global sparse attention for key-frame summaries (spec §7).

Lan, Jiang, Yu, Liu, He, "FullTransNet: Full Transformer with Local-Global Attention for Video
Summarization", arXiv:2501.00882 (2025). Input: per-frame feature vectors of a loop ``(B, T, F)``
(here: pooled encoder features of the ultrasound segmentation pack, :mod:`medseg.measure.keyframes`);
output: for each decoder step a distribution over the ``T`` input positions (a pointer), read as frame
scores and a key-frame summary.

- **Embedding** ``E(x) = LN(Dropout(ReLU(Linear(F -> d))))``, shared by encoder and decoder inputs,
  plus one sinusoidal position encoding (encoder positions 0..L_max-1, decoder 0..K-1).
- **Encoder** (post-norm): ``H = LN(H + W_O LGAttn(H))``, ``H = LN(H + FFN(H))``, FFN without bias.
  :class:`LocalGlobalAttention` is sparse, computed by gathering (spec §11.3), never a dense T x T
  matrix: a non-global query attends to the non-global, non-padding keys within ``|i - j| <= w`` plus
  every global token (local projections); a global query attends to all non-padding keys with its
  own global projections; padding keys are never attended and padding queries output 0.
  Global tokens are the first, middle and last frame of each segment (shot) of the loop.
- **Decoder** (post-norm, dense): causal self-attention, cross-attention to the encoder output
  (padding masked), FFN. Inputs are right-shifted (a learned BOS, then the embedded features of
  the previous target frames); the **generator** ``Linear(d -> L_max, no bias)`` keeps the first ``T``
  logits and applies softmax over ``T``.
- **Decoding** (:meth:`FullTransNet.decode`): greedy and monotone for ``K = ceil(ratio * T)`` steps
  (positions at or before the previous pick are masked); **frame scores**
  (:func:`frame_scores`): a picked frame gets the largest probability any step gave it, the others
  the smallest.

The official code's defects (spec §7.9: attention re-initialised per call, no positional
information, off-by-padding masks, unshifted decoder inputs fed the ground truth at test time) are
not reproduced.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medseg.models.registry import ModelCard, register

CONFIGS = {
    "full": dict(max_len=1536, dim=64, heads=8, ffn=2048, enc_layers=6, dec_layers=6, window=16),
    "small": dict(max_len=128, dim=32, heads=4, ffn=128, enc_layers=2, dec_layers=2, window=4),
}


def sinusoidal(n: int, dim: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float32)
    angle = pos / torch.pow(10000.0, i / dim)
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


def segment_global_mask(length: int, segment: int, max_len: int | None = None) -> torch.Tensor:
    """Global tokens: the first, middle and last frame of every ``segment``-frame shot of a ``length``-frame loop."""
    mask = torch.zeros(max_len or length, dtype=torch.bool)
    for a in range(0, length, segment):
        b = min(length, a + segment) - 1
        mask[[a, (a + b) // 2, b]] = True
    return mask


# --------------------------------------------------------------------------- sparse attention
class LocalGlobalAttention(nn.Module):
    """Longformer-style attention: band of half-width ``window`` plus global tokens (spec §7.4), computed by gathering."""

    def __init__(self, dim: int, heads: int, window: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads, self.window, self.dh = heads, int(window), dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.qg, self.kg, self.vg = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.dh).transpose(1, 2)  # (B, h, N, dh)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, is_global: torch.Tensor, return_weights: bool = False):
        """``x`` (B, L, d); ``valid`` (B, L) non-padding; ``is_global`` (B, L). Returns (B, L, d) [and dense (B, h, L, L) weights for inspection]."""
        b, n, d = x.shape
        w = self.window
        is_global = is_global & valid
        scale = 1.0 / math.sqrt(self.dh)
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        # band keys: positions i-w..i+w, gathered (B, h, L, 2w+1, dh)
        offsets = torch.arange(-w, w + 1, device=x.device)
        idx = torch.arange(n, device=x.device)[:, None] + offsets[None, :]  # (L, 2w+1)
        in_range = (idx >= 0) & (idx < n)
        idx_c = idx.clamp(0, n - 1)
        band_ok = in_range[None] & valid[:, idx_c] & ~is_global[:, idx_c]  # (B, L, 2w+1): globals come through the global set
        k_band, v_band = k[:, :, idx_c], v[:, :, idx_c]
        s_band = torch.einsum("bhid,bhijd->bhij", q, k_band) * scale
        # global keys (local projections), padded to the largest global count in the batch
        g_count = int(is_global.sum(1).max()) if is_global.any() else 0
        g_idx = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :g_count]  # global positions first, in order
        g_ok = torch.gather(is_global, 1, g_idx)  # (B, G)
        gi = g_idx[:, None, :, None].expand(-1, self.heads, -1, self.dh)
        k_g, v_g = torch.gather(k, 2, gi), torch.gather(v, 2, gi)  # (B, h, G, dh)
        s_g = torch.einsum("bhid,bhgd->bhig", q, k_g) * scale
        scores = torch.cat([s_band, s_g], dim=-1)
        ok = torch.cat([band_ok, g_ok[:, None, :].expand(-1, n, -1)], dim=-1)[:, None]  # (B, 1, L, 2w+1+G)
        attn = torch.softmax(scores.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
        attn = self.drop(attn)
        out = torch.einsum("bhij,bhijd->bhid", attn[..., : 2 * w + 1], v_band) + torch.einsum("bhig,bhgd->bhid", attn[..., 2 * w + 1 :], v_g)
        # global queries: dense over the non-padding keys with the global projections
        dense_g = None
        if g_count:
            xg = torch.gather(x, 1, g_idx[..., None].expand(-1, -1, d))
            qg = self._split(self.qg(xg))
            kg, vg = self._split(self.kg(x)), self._split(self.vg(x))
            sg = torch.einsum("bhgd,bhjd->bhgj", qg, kg) * scale
            ag = torch.softmax(sg.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1).nan_to_num(0.0)
            ag = self.drop(ag)
            og = torch.einsum("bhgj,bhjd->bhgd", ag, vg)
            keep = g_ok[:, None, :, None]
            out = out.scatter(2, gi, torch.where(keep, og, torch.gather(out, 2, gi)))
            dense_g = ag
        out = out.transpose(1, 2).reshape(b, n, d) * (valid & True)[..., None]
        if not return_weights:
            return out
        dense = x.new_zeros(b, self.heads, n, n)
        dense.scatter_add_(3, idx_c[None, None].expand(b, self.heads, -1, -1), attn[..., : 2 * w + 1] * band_ok[:, None])
        dense.scatter_add_(3, g_idx[:, None, None, :].expand(-1, self.heads, n, -1), attn[..., 2 * w + 1 :] * g_ok[:, None, None, :])
        if dense_g is not None:
            for bi in range(b):
                rows = g_idx[bi][g_ok[bi]]
                dense[bi, :, rows] = dense_g[bi, :, : len(rows)]
        dense = dense * valid[:, None, :, None]
        return out, dense


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, window: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.attn = LocalGlobalAttention(dim, heads, window, dropout)
        self.out = nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.ReLU(), nn.Linear(ffn, dim, bias=False))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, valid: torch.Tensor, is_global: torch.Tensor) -> torch.Tensor:
        h = self.norm1(h + self.drop(self.out(self.attn(h, valid, is_global))))
        return self.norm2(h + self.drop(self.ffn(h)))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn, bias=False), nn.ReLU(), nn.Linear(ffn, dim, bias=False))
        self.drop = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        k = y.shape[1]
        causal = torch.triu(torch.ones(k, k, dtype=torch.bool, device=y.device), 1)
        y = self.norm1(y + self.drop(self.self_attn(y, y, y, attn_mask=causal, need_weights=False)[0]))
        y = self.norm2(y + self.drop(self.cross_attn(y, memory, memory, key_padding_mask=~valid, need_weights=False)[0]))
        return self.norm3(y + self.drop(self.ffn(y)))


# --------------------------------------------------------------------------- the network
class FullTransNet(nn.Module):
    """Pointer-style encoder-decoder over a loop of frame features (see the module docstring)."""

    def __init__(self, in_features: int, max_len: int = 128, dim: int = 32, heads: int = 4, ffn: int = 128, enc_layers: int = 2,
                 dec_layers: int = 2, window: int = 4, dropout: float = 0.1, segment: int = 8) -> None:
        super().__init__()
        self.in_features, self.max_len, self.dim, self.segment = in_features, max_len, dim, segment
        self.embed = nn.Sequential(nn.Linear(in_features, dim), nn.ReLU(), nn.Dropout(dropout), nn.LayerNorm(dim))
        self.register_buffer("pe", sinusoidal(max_len, dim), persistent=False)
        # feature standardisation, set from the training features (stored with the weights)
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_std", torch.ones(in_features))
        self.bos = nn.Parameter(torch.randn(dim) * 0.02)
        self.encoder = nn.ModuleList([EncoderLayer(dim, heads, ffn, window, dropout) for _ in range(enc_layers)])
        self.decoder = nn.ModuleList([DecoderLayer(dim, heads, ffn, dropout) for _ in range(dec_layers)])
        self.generator = nn.Linear(dim, max_len, bias=False)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"expected (B, T, {self.in_features}) frame features, got {tuple(x.shape)}")
        if x.shape[1] > self.max_len:
            raise ValueError(f"a loop of {x.shape[1]} frames exceeds this network's {self.max_len}: summarise it in windows")

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed((x - self.feature_mean) / self.feature_std)

    def encode(self, x: torch.Tensor, lengths: torch.Tensor | None = None, is_global: torch.Tensor | None = None):
        """Encoder output (B, L_max, d), the valid mask (B, L_max) and the global mask used."""
        self._check(x)
        b, t, _ = x.shape
        lengths = torch.full((b,), t, device=x.device) if lengths is None else lengths
        valid = torch.arange(self.max_len, device=x.device)[None] < lengths[:, None]
        if is_global is None:
            is_global = torch.stack([segment_global_mask(int(n), self.segment, self.max_len) for n in lengths]).to(x.device)
        elif is_global.shape[1] < self.max_len:
            is_global = F.pad(is_global, (0, self.max_len - is_global.shape[1]))
        xp = F.pad(x, (0, 0, 0, self.max_len - t))
        h = self._embed(xp) + self.pe[None]
        h = h * valid[..., None]
        for layer in self.encoder:
            h = layer(h, valid, is_global)
        return h, valid, is_global

    def _decode_inputs(self, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """Right-shifted decoder input: BOS, then the embedded features at the previous targets ``prev`` (B, K-1)."""
        b = x.shape[0]
        gathered = torch.gather(x, 1, prev.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
        y = torch.cat([self.bos.expand(b, 1, -1), self._embed(gathered)], dim=1)
        return y + self.pe[: y.shape[1]][None]

    def _pointer(self, y: torch.Tensor, memory: torch.Tensor, valid: torch.Tensor, t: int) -> torch.Tensor:
        for layer in self.decoder:
            y = layer(y, memory, valid)
        logits = self.generator(y)[..., :t]
        return logits.masked_fill(~valid[:, None, :t], float("-inf"))

    def forward(self, x: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor | None = None, is_global: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``targets`` (B, K) frame indices in temporal order; returns pointer logits (B, K, T)."""
        memory, valid, _ = self.encode(x, lengths, is_global)
        return self._pointer(self._decode_inputs(x, targets[:, :-1]), memory, valid, x.shape[1])

    @torch.no_grad()
    def decode(self, x: torch.Tensor, k: int, lengths: torch.Tensor | None = None, is_global: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy monotone decoding of ``k`` picks: (picks (B, k) with -1 once no frame is left, probabilities (B, k, T))."""
        memory, valid, _ = self.encode(x, lengths, is_global)
        b, t = x.shape[:2]
        picks = torch.full((b, 0), -1, dtype=torch.long, device=x.device)
        probs = []
        last = torch.full((b,), -1, device=x.device)
        for _ in range(k):
            logits = self._pointer(self._decode_inputs(x, picks), memory, valid, t)[:, -1]
            logits = logits.masked_fill(torch.arange(t, device=x.device)[None] <= last[:, None], float("-inf"))
            p = torch.softmax(logits, -1).nan_to_num(0.0)
            exhausted = ~torch.isfinite(logits).any(-1)
            nxt = torch.where(exhausted, torch.full_like(last, -1), p.argmax(-1))
            picks = torch.cat([picks, nxt[:, None]], dim=1)
            probs.append(p)
            last = torch.where(exhausted, torch.full_like(last, t), nxt)
        return picks, torch.stack(probs, 1) if probs else x.new_zeros(b, 0, t)


def frame_scores(probs: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Spec §7.6 rule on one loop: ``probs`` (K, T), ``picks`` (K,) -> (T,) scores (picked: max over steps, others: min)."""
    t = probs.shape[-1]
    if probs.shape[0] == 0:
        return probs.new_zeros(t)
    scores = probs.min(0).values.clone()
    best = probs.max(0).values
    chosen = picks[picks >= 0]
    scores[chosen] = best[chosen]
    return scores


def pointer_loss(logits: torch.Tensor, targets: torch.Tensor, t: int) -> torch.Tensor:
    """BCE between the stacked pointer distributions (B, K, T) and the one-hot targets, mean over valid K x T entries (targets -1 = padding)."""
    ok = targets >= 0
    p = torch.softmax(logits, -1).nan_to_num(0.0).clamp(1e-6, 1 - 1e-6)
    y = F.one_hot(targets.clamp(min=0), t).float()
    bce = -(y * p.log() + (1 - y) * (1 - p).log())
    return (bce * ok[..., None]).sum() / (ok.sum() * t).clamp(min=1)


@register(
    ModelCard(
        name="fulltransnet",
        title="FullTransNet (encoder-decoder with local-global sparse attention, key-frame summaries)",
        task="key-frame summary of a frame sequence",
        paper="Lan, Jiang, Yu, Liu, He, 'FullTransNet: Full Transformer with Local-Global Attention for Video Summarization', arXiv:2501.00882 (2025)",
        notes="Input: per-frame features (in_channels = feature width). full: L_max 1536, d 64, 8 heads, 6+6 layers, window 16; "
        "small: L_max 128, d 32, 4 heads, 2+2 layers, window 4.",
        input_channels=(),
        kind="sequence",
    )
)
def build_fulltransnet(in_channels: int = 1024, num_classes: int = 1, config: str = "small", **overrides) -> FullTransNet:
    return FullTransNet(in_channels, **{**CONFIGS[config], **overrides})


__all__ = ["CONFIGS", "DecoderLayer", "EncoderLayer", "FullTransNet", "LocalGlobalAttention", "build_fulltransnet", "frame_scores",
           "pointer_loss", "segment_global_mask", "sinusoidal"]
