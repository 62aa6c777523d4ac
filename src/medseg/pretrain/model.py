"""The CM-CGNS network (spec §8.3, §8.6) around an image encoder that a segmentation network can reuse.

Image encoder: the encoder of medseg's U-Net (its ``downs`` blocks of double 3x3 conv + BN + ReLU with
max-pool between them), so ``medseg train --arch unet --encoder-init`` loads it key for key. The
bottom feature map (stride 16; 256 channels in the small config) gives the local tokens (row-major
spatial order) and, by attention pooling, the global feature. The report encoder is
:class:`~medseg.pretrain.text.TextEncoder`. Cross-modal attention runs both ways with sigmoid weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medseg.pretrain.losses import Centroids
from medseg.pretrain.text import EncodedReports, TextEncoder, sentence_features

ENCODER_PREFIX = "image_encoder."  # keys of the image encoder inside CMCGNS; what follows is the U-Net's own key


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a CM-CGNS network (recorded in the encoder pack's manifest)."""

    arch: str = "unet"
    config: str = "small"
    image_size: int = 96
    dim: int = 128
    heads: int = 8
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_words: int = 200
    max_sentences: int = 24
    vocab_size: int = 8000
    clusters: int = 16

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class ImageEncoder(nn.Module):
    """The encoder half of medseg's U-Net: 3-channel input (grey is repeated), bottom map at stride 16."""

    def __init__(self, arch: str = "unet", config: str = "small") -> None:
        super().__init__()
        from medseg import models

        if arch != "unet":
            raise ValueError(f"CM-CGNS pretrains the U-Net encoder; '{arch}' is not supported")
        unet = models.build(arch, in_channels=3, num_classes=1, config=config)
        self.downs = unet.downs
        self.pool = nn.MaxPool2d(2)
        self.channels = unet.downs[-1][-2].num_features
        self.stride = 2 ** (len(self.downs) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        for i, block in enumerate(self.downs):
            x = block(x if i == 0 else self.pool(x))
        return x


class AttentionPool2d(nn.Module):
    """Global image feature: attention over the tokens with a learned position embedding, query = mean token (spec §8.3)."""

    def __init__(self, tokens: int, channels: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(tokens + 1, channels) / math.sqrt(channels))
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.proj = nn.Linear(channels, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        if x.shape[1] != self.position.shape[0]:
            raise ValueError(f"{x.shape[1] - 1} tokens, but the encoder was built for {self.position.shape[0] - 1}")
        x = x + self.position
        out, _ = self.attn(x[:, :1], x, x, need_weights=False)
        return self.proj(out[:, 0])


class SentencePool(nn.Module):
    """Global report feature: attention over sentences, query = mean sentence, no positions (spec §8.3)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, sentences: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        w = valid.to(sentences.dtype).unsqueeze(-1)
        query = (sentences * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        out, _ = self.attn(query, sentences, sentences, key_padding_mask=~valid, need_weights=False)
        return out[:, 0]


class CrossModalAttention(nn.Module):
    """Local cross-attention both ways with sigmoid weights scaled by 1/sqrt(D), no softmax (spec §8.3).

    ``f^{R->I} = sigma(Q_I K_R^T / sqrt D) V_R`` (image tokens query the sentences) and
    ``f^{I->R} = sigma(Q_R K_I^T / sqrt D) V_I`` (sentences query the image). Batched, with absent
    sentences masked out; identical to running each sample alone.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_image, self.k_image, self.v_image = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.q_text, self.k_text, self.v_text = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, image: torch.Tensor, sentences: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keep = valid.to(image.dtype)
        w_ti = torch.sigmoid(self.q_image(image) @ self.k_text(sentences).transpose(1, 2) * self.scale) * keep.unsqueeze(1)
        text_to_image = w_ti @ self.v_text(sentences)  # (B, T, D)
        w_it = torch.sigmoid(self.q_text(sentences) @ self.k_image(image).transpose(1, 2) * self.scale)
        image_to_text = (w_it @ self.v_image(image)) * keep.unsqueeze(-1)  # (B, S, D)
        return text_to_image, image_to_text


class ReconstructionDecoder(nn.Module):
    """Stages of ``Conv3x3 -> ReLU -> bilinear x2`` from the token grid to the image, then Tanh; no ReLU before the Tanh (spec §8.6)."""

    def __init__(self, in_channels: int, stride: int, out_channels: int = 3) -> None:
        super().__init__()
        stages = int(round(math.log2(stride)))
        widths = [in_channels] + [max(16, in_channels // 2 ** (i + 1)) for i in range(stages - 1)] + [out_channels]
        layers: list[nn.Module] = []
        for i in range(stages):
            layers.append(nn.Conv2d(widths[i], widths[i + 1], 3, padding=1))
            if i < stages - 1:
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x))


@dataclass
class ImageFeatures:
    tokens: torch.Tensor  # (B, T, D) L2-normalised local tokens, row-major
    global_: torch.Tensor  # (B, D) L2-normalised
    pooled: torch.Tensor  # (B, C) mean of the bottom map: what a linear probe reads
    grid: tuple[int, int]


@dataclass
class ReportFeatures:
    words: torch.Tensor  # (B, L, D)
    sentences: torch.Tensor  # (B, S, D) mean word vectors
    valid: torch.Tensor  # (B, S) bool
    global_: torch.Tensor  # (B, D) L2-normalised


class CMCGNS(nn.Module):
    """Image encoder, report encoder, projections, cross-modal attention, SimSiam predictor, decoder and centroids."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = ImageEncoder(spec.arch, spec.config)
        stride, channels = self.image_encoder.stride, self.image_encoder.channels
        if spec.image_size % stride:
            raise ValueError(f"image size {spec.image_size} is not a multiple of the encoder stride {stride}")
        side = spec.image_size // stride
        d = spec.dim
        self.local_image = nn.Linear(channels, d)
        self.global_image = AttentionPool2d(side * side, channels, spec.heads, d)
        self.text_encoder = TextEncoder(spec.vocab_size, spec.text_width, spec.text_layers, spec.text_heads, spec.max_words + 2, d)
        self.report_pool = SentencePool(d, spec.heads)
        self.cross = CrossModalAttention(d)
        self.predictor = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(inplace=True), nn.Linear(d // 2, d))
        self.decoder = ReconstructionDecoder(2 * d, stride)
        self.clusters = Centroids(spec.clusters, d)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.1)))

    def encode_image(self, x: torch.Tensor) -> ImageFeatures:
        fmap = self.image_encoder(x)
        b, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # flatten then transpose: spatial tokens (spec §8.9 defect 1)
        return ImageFeatures(
            tokens=F.normalize(self.local_image(tokens), dim=-1),
            global_=F.normalize(self.global_image(tokens), dim=-1),
            pooled=fmap.mean((2, 3)),
            grid=(h, w),
        )

    def encode_reports(self, reports: EncodedReports) -> ReportFeatures:
        words = self.text_encoder(reports.ids)
        sentences, valid = sentence_features(words, reports.sentence, self.spec.max_sentences)
        # keep only as many sentence slots as the longest report of the batch uses
        s = max(1, int(valid.sum(1).max()))
        sentences, valid = sentences[:, :s], valid[:, :s]
        return ReportFeatures(words, sentences, valid, F.normalize(self.report_pool(sentences, valid), dim=-1))

    def reconstruct(self, tokens: torch.Tensor, text_to_image: torch.Tensor, token_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Decode ``[masked tokens ; text-to-image features]`` to an image in [-1, 1]: (B, 3, H, W)."""
        b = tokens.shape[0]
        keep = (~token_mask).reshape(b, -1, 1).to(tokens.dtype)
        fused = torch.cat([tokens * keep, text_to_image], dim=-1)  # (B, T, 2D)
        return self.decoder(fused.transpose(1, 2).reshape(b, -1, *grid))


__all__ = ["CMCGNS", "ENCODER_PREFIX", "ImageEncoder", "ModelSpec"]
