"""The CM-CGNS losses and its clustering of sentence features (spec §8.4-§8.6), as plain functions.

- :func:`global_infonce`: CLIP-style image-report loss with a learnable logit scale.
- :func:`local_image_loss`: SimSiam between local image tokens and their text-to-image features.
- :func:`local_report_loss`: sentence vs cross-modal sentence contrast; with centroids, the
  second-nearest centroid of each sentence is appended as its hard negative (weight 3) and
  same-cluster pairs get the false-negative margin term.
- :class:`Centroids`: the k-means centroids (farthest-first start, momentum update; no gradient).
- :func:`masked_reconstruction_loss`: L1 on the pixels of masked tokens only.

Choice (documented in the README): the false-negative term is summed over same-cluster pairs only
and divided by N²; the official code also adds ``alpha`` for every other pair, a constant without
gradient, so that the term is zero exactly when every same-cluster gap lies in the band.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def global_infonce(image: torch.Tensor, report: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """``(CE(s I R^T, diag) + CE(s R I^T, diag)) / 2`` on L2-normalised (B, D) features."""
    scale = logit_scale.exp() if isinstance(logit_scale, torch.Tensor) else math.exp(logit_scale)
    logits = scale * image @ report.t()
    target = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def local_image_loss(tokens: torch.Tensor, text_to_image: torch.Tensor, predictor: nn.Module) -> torch.Tensor:
    """``-1/2 [cos(h(f^I), sg f^{R->I}) + cos(h(f^{R->I}), sg f^I)]`` averaged over tokens and samples."""
    a = F.cosine_similarity(predictor(tokens), text_to_image.detach(), dim=-1).mean()
    b = F.cosine_similarity(predictor(text_to_image), tokens.detach(), dim=-1).mean()
    return -0.5 * (a + b)


class Centroids(nn.Module):
    """k centroids of the image-attended sentence features ``z2``, moved by momentum, never by gradient."""

    def __init__(self, k: int, dim: int, momentum: float = 0.001, update: str = "sum") -> None:
        super().__init__()
        if update not in ("sum", "mean"):
            raise ValueError(f"update must be 'sum' or 'mean', not {update!r}")
        self.k, self.momentum, self.update_rule = int(k), float(momentum), update
        self.register_buffer("centroids", torch.zeros(self.k, dim))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))

    @property
    def active(self) -> bool:
        return bool(self.started)

    @torch.no_grad()
    def start(self, z2: torch.Tensor, first: int) -> None:
        """Farthest-first start from ``z2`` (N >= k): begin at row ``first``, then repeatedly add the point least
        similar (cosine) to the centroid added last, never picking a point twice."""
        n = z2.shape[0]
        if n < self.k:
            raise ValueError(f"{n} sentences cannot start {self.k} centroids")
        z = F.normalize(z2.detach().float(), dim=-1)
        sim = z @ z.t()
        picked = [int(first)]
        taken = torch.zeros(n, dtype=torch.bool, device=z.device)
        taken[first] = True
        while len(picked) < self.k:
            row = sim[picked[-1]].masked_fill(taken, math.inf)
            nxt = int(torch.argmin(row))
            picked.append(nxt)
            taken[nxt] = True
        self.centroids.copy_(z2.detach()[picked])
        self.started.fill_(True)

    def similarity(self, z: torch.Tensor) -> torch.Tensor:
        """Cosine of each row of ``z`` with each centroid: (N, k)."""
        return F.normalize(z, dim=-1) @ F.normalize(self.centroids, dim=-1).t()

    @torch.no_grad()
    def update(self, z2: torch.Tensor) -> torch.Tensor:
        """Assign each ``z2`` row to its most similar centroid; ``c <- (1-m) c + m * sum`` (or mean) for non-empty clusters.

        Returns the assignment."""
        z2 = z2.detach()
        assign = self.similarity(z2).argmax(-1)
        onehot = F.one_hot(assign, self.k).to(z2.dtype)  # (N, k)
        total = onehot.t() @ z2
        count = onehot.sum(0)
        if self.update_rule == "mean":
            total = total / count.clamp_min(1).unsqueeze(-1)
        filled = (count > 0).unsqueeze(-1)
        moved = (1 - self.momentum) * self.centroids + self.momentum * total
        self.centroids.copy_(torch.where(filled, moved, self.centroids))
        return assign


def hard_negatives(z1: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each sentence: its own cluster (nearest centroid), its hard negative (second-nearest) and that centroid (detached)."""
    sim = F.normalize(z1, dim=-1) @ F.normalize(centroids, dim=-1).t()
    top = sim.topk(2, dim=-1).indices
    own, hard = top[:, 0], top[:, 1]
    return own, hard, centroids[hard].detach()


def false_negative_mask(own: torch.Tensor) -> torch.Tensor:
    """``F_ab = 1`` where sentences a != b share their nearest centroid (symmetric, zero diagonal)."""
    same = own.unsqueeze(0) == own.unsqueeze(1)
    return same & ~torch.eye(own.shape[0], dtype=torch.bool, device=own.device)


def false_negative_loss(sim: torch.Tensor, mask: torch.Tensor, alpha: float = 0.2, beta: float = 0.5) -> torch.Tensor:
    """``sum_{F_ab} [ReLU(D_ab + alpha) + ReLU(-D_ab - beta)] / N^2`` with ``D_ab = S_ab - S_aa``.

    Zero when every same-cluster pair sits in the band ``S_aa - beta <= S_ab <= S_aa - alpha``."""
    delta = sim - sim.diagonal().unsqueeze(1)
    band = F.relu(delta + alpha) + F.relu(-delta - beta)
    return (band * mask.to(sim.dtype)).sum() / sim.numel()


def local_report_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    centroids: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    hard_weight: float = 3.0,
    exclude_other_hard: bool = False,
    alpha: float = 0.2,
    beta: float = 0.5,
    fn_weight: float = 1e-4,
) -> dict[str, torch.Tensor]:
    """The local report loss for N sentences: ``z1`` sentence features, ``z2`` their image-attended versions.

    Without centroids: ``CE(S, diag)`` with ``S_ab = cos(z1_a, z2_b) / temperature``. With centroids:
    logits ``[S | H] * W`` where ``H_ab = cos(z1_a, h_b)``, ``h_b`` the second-nearest centroid of
    sentence b, and ``W = [1 | hard_weight * I]`` (other rows' hard negatives get logit 0, or are
    left out with ``exclude_other_hard``); plus ``fn_weight`` times the false-negative term.
    Returns ``{"loss", "contrast", "false_negative", "sim"}``.
    """
    z1n, z2n = F.normalize(z1, dim=-1), F.normalize(z2, dim=-1)
    sim = z1n @ z2n.t() / temperature
    target = torch.arange(sim.shape[0], device=sim.device)
    zero = sim.new_zeros(())
    if centroids is None:
        contrast = F.cross_entropy(sim, target)
        return {"loss": contrast, "contrast": contrast, "false_negative": zero, "sim": sim}
    own, _, h = hard_negatives(z1n, centroids)
    hard = z1n @ F.normalize(h, dim=-1).t()
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if exclude_other_hard:
        hard = torch.where(eye, hard * hard_weight, torch.full_like(hard, -math.inf))
    else:
        hard = hard * (eye.to(hard.dtype) * hard_weight)
    contrast = F.cross_entropy(torch.cat([sim, hard], dim=1), target)
    fn = false_negative_loss(sim, false_negative_mask(own), alpha, beta)
    return {"loss": contrast + fn_weight * fn, "contrast": contrast, "false_negative": fn, "sim": sim}


def random_token_mask(batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, h, w) bool, True where a token is masked: exactly ``round(ratio * h * w)`` (at least 1) per sample."""
    h, w = grid
    n = h * w
    k = min(n, max(1, int(round(ratio * n))))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(batch, h, w)


def masked_reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, token_mask: torch.Tensor, weight: float = 10.0) -> torch.Tensor:
    """``weight * mean |x^ - x|`` over the pixels (and channels) of masked tokens only.

    ``token_mask`` is (B, h, w); each token covers an ``H/h x W/w`` block of pixels."""
    b, c, height, width = pred.shape
    h, w = token_mask.shape[-2:]
    if height % h or width % w:
        raise ValueError(f"an image of {height}x{width} is not a whole number of {h}x{w} tokens")
    pixels = token_mask.to(pred.dtype).repeat_interleave(height // h, dim=1).repeat_interleave(width // w, dim=2).unsqueeze(1)
    count = pixels.sum() * c
    if count == 0:
        return pred.sum() * 0.0
    return weight * ((pred - target).abs() * pixels).sum() / count


def clusters_for(n_sentences: int, cap: int = 128) -> int:
    """Number of centroids scaled to the data: ``sqrt(n_sentences) / 2``, between 2 and ``cap``.

    The published 128 is for about 200k reports (over a million sentences, which this rule caps at
    128); a thousand sentences give 16."""
    return int(min(cap, max(2, round(math.sqrt(max(n_sentences, 0)) / 2))))


__all__ = [
    "Centroids",
    "clusters_for",
    "false_negative_loss",
    "false_negative_mask",
    "global_infonce",
    "hard_negatives",
    "local_image_loss",
    "local_report_loss",
    "masked_reconstruction_loss",
    "random_token_mask",
]
