"""Reports as sentences and word ids, and the small report encoder trained with the images (spec §8.2, §8.3).

Bio_ClinicalBERT cannot be downloaded at run time, so the report encoder is trained here from the
reports themselves: a word vocabulary built from the training reports and a small transformer encoder
(2 layers, width 128 by default). Each word carries the index of its sentence, so sentence features
are means of the word vectors of one sentence, as in the spec.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
SPECIALS = (PAD, UNK, CLS, SEP)

_BULLET = re.compile(r"\d+\.(?!\d)")
_WORD = re.compile(r"[a-z0-9]+")


def split_sentences(text: str) -> list[list[str]]:
    """A report as sentences of lower-case ASCII alphanumeric words (spec §8.2).

    Split on numbered bullets ("1.") and then on periods; sentences of one word or none are dropped.
    Decimal numbers ("38.5") are not bullets and stay one sentence.
    """
    text = " ".join(str(text).split()).encode("ascii", "ignore").decode("ascii").lower()
    sentences = []
    for part in _BULLET.split(text):
        for piece in re.split(r"\.(?!\d)", part):
            words = _WORD.findall(piece)
            if len(words) > 1:
                sentences.append(words)
    return sentences


@dataclass(frozen=True)
class Vocabulary:
    """Word -> id; ids 0..3 are the special tokens [PAD], [UNK], [CLS], [SEP]."""

    words: tuple[str, ...]

    @classmethod
    def build(cls, reports: Iterable[str], max_size: int = 8000, min_count: int = 1) -> "Vocabulary":
        counts = Counter(w for text in reports for sentence in split_sentences(text) for w in sentence)
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(SPECIALS + tuple(ranked[: max(0, max_size - len(SPECIALS))]))

    def __len__(self) -> int:
        return len(self.words)

    def index(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


@dataclass
class EncodedReports:
    """Word ids and sentence indices of a batch of reports, padded to one length."""

    ids: torch.Tensor  # (B, L) int64, 0 = [PAD]
    sentence: torch.Tensor  # (B, L) int64: 1..S for the words of sentence s, 0 for [CLS], [SEP] and padding
    n_sentences: torch.Tensor  # (B,) int64

    def to(self, device: torch.device | str) -> "EncodedReports":
        return EncodedReports(self.ids.to(device), self.sentence.to(device), self.n_sentences.to(device))


def encode_reports(texts: Sequence[str], vocab: Vocabulary, max_words: int = 200, max_sentences: int = 24) -> EncodedReports:
    """Word ids with [CLS] ... [SEP], at most ``max_words`` words in at most ``max_sentences`` sentences.

    A report without any sentence of two words gets one sentence of [UNK] so that it still has a
    sentence feature (callers drop such reports from training).
    """
    lookup = vocab.index()
    unk = lookup[UNK]
    rows, sents, counts = [], [], []
    for text in texts:
        ids, sidx = [lookup[CLS]], [0]
        sentences = split_sentences(text)[:max_sentences] or [[UNK, UNK]]
        n = 0
        for s, words in enumerate(sentences, start=1):
            room = max_words - (len(ids) - 1)
            if room < 2:
                break
            words = words[:room]
            ids += [lookup.get(w, unk) for w in words]
            sidx += [s] * len(words)
            n = s
        ids.append(lookup[SEP])
        sidx.append(0)
        rows.append(ids)
        sents.append(sidx)
        counts.append(n)
    length = max(len(r) for r in rows)
    ids_t = torch.zeros(len(rows), length, dtype=torch.long)
    sent_t = torch.zeros(len(rows), length, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, sents)):
        ids_t[i, : len(r)] = torch.tensor(r)
        sent_t[i, : len(s)] = torch.tensor(s)
    return EncodedReports(ids_t, sent_t, torch.tensor(counts, dtype=torch.long))


def has_sentences(text: str, min_words: int = 3) -> bool:
    """Whether a report is usable for training: at least ``min_words`` words in sentences (spec §8.2)."""
    return sum(len(s) for s in split_sentences(text)) >= min_words


class TextEncoder(nn.Module):
    """Word embeddings + learned positions, a small transformer encoder, and a projection to ``dim``.

    Returns L2-normalised word vectors (B, L, dim) like the spec's ``Linear(768->768)`` + L2-norm on
    the last hidden state.
    """

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4, max_len: int = 202, dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.words = nn.Embedding(vocab_size, width, padding_idx=0)
        self.positions = nn.Parameter(torch.zeros(1, max_len, width))
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, dim)
        nn.init.trunc_normal_(self.positions, std=0.02)
        nn.init.normal_(self.words.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.positions.shape[1]:
            raise ValueError(f"reports of {length} tokens exceed the encoder's {self.positions.shape[1]}")
        x = self.words(ids) + self.positions[:, :length]
        x = self.encoder(x, src_key_padding_mask=ids == 0)
        return F.normalize(self.proj(self.norm(x)), dim=-1)


def sentence_features(words: torch.Tensor, sentence: torch.Tensor, max_sentences: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean word vector per sentence: (B, S, D) and the mask of sentences that exist (B, S)."""
    s = int(sentence.max()) if max_sentences is None else max_sentences
    s = max(s, 1)
    member = (sentence.unsqueeze(1) == torch.arange(1, s + 1, device=sentence.device).view(1, -1, 1)).to(words.dtype)  # (B, S, L)
    count = member.sum(-1)
    feats = member @ words / count.clamp_min(1).unsqueeze(-1)
    return feats, count > 0


__all__ = [
    "EncodedReports",
    "TextEncoder",
    "Vocabulary",
    "encode_reports",
    "has_sentences",
    "sentence_features",
    "split_sentences",
]
