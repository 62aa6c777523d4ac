"""Similar-case retrieval: index an archive of image-report pairs with a pretrained encoder, then find the
k archived cases most similar to an image or to a region of it.

An index is a folder, complete in itself::

    index.json            the cases (image path, report, group, every CSV column), the encoder's sha256
    image_embeddings.npy  (N, D) float32, L2-normalised global image features
    report_embeddings.npy (N, D) float32, L2-normalised global report features
    thumbnails.npy        (N, T, T) uint8 grey thumbnails (what a viewer shows without the archive)
    encoder/              a copy of the encoder pack used

Similarity is the cosine of global features: image to archived image (``by="image"``) or image to
archived report (``by="report"``, cross-modal).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from medseg.engine.progress import CancelToken, Job, Progress, check_cancel
from medseg.errors import InputError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.pretrain.data import PairRecord, centre_crop, iter_chunks, load_size, load_square, square_image, to_tensor
from medseg.pretrain.pack import EncoderPack, load_encoder_pack
from medseg.pretrain.text import encode_reports
from medseg.train.packs import MANIFEST, WEIGHTS

INDEX = "index.json"
ENCODER = "encoder"
THUMBNAIL = 96
BY = ("image", "report")


@dataclass
class SimilarCase:
    """One retrieved archive case."""

    rank: int
    score: float
    index: int
    image: str
    text: str
    group: str
    finding: str | None
    thumbnail: np.ndarray
    fields: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(self.score, 5), "image": self.image, "text": self.text, "group": self.group, "finding": self.finding, "fields": self.fields}


@dataclass
class SimilarIndex:
    """A loaded index; the encoder is loaded on first use."""

    path: Path
    cases: list[dict[str, Any]]
    image_embeddings: np.ndarray
    report_embeddings: np.ndarray
    thumbnails: np.ndarray
    meta: dict[str, Any]
    _encoder: EncoderPack | None = None

    def __len__(self) -> int:
        return len(self.cases)

    @property
    def encoder(self) -> EncoderPack:
        if self._encoder is None:
            self._encoder = load_encoder_pack(self.path / ENCODER)
            if self._encoder.sha256 != self.meta.get("encoder_sha256"):
                raise UsageError(f"The encoder inside index '{self.path}' is not the one its cases were indexed with: rebuild the index with 'medseg similar --build'.")
        return self._encoder


@torch.no_grad()
def embed_images(encoder: EncoderPack, squares: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Global image features (N, D) of load-size grey squares (centre-cropped to the encoder's size)."""
    model = encoder.model
    out = []
    for sl in iter_chunks(len(squares), batch_size):
        x = to_tensor(centre_crop(squares[sl], encoder.image_size))
        out.append(model.encode_image(x).global_.numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.spec.dim), np.float32)


@torch.no_grad()
def embed_reports(encoder: EncoderPack, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """Global report features (N, D)."""
    model = encoder.model
    out = []
    for sl in iter_chunks(len(texts), batch_size):
        reports = encode_reports(list(texts[sl]), encoder.vocab, model.spec.max_words, model.spec.max_sentences)
        out.append(model.encode_reports(reports).global_.numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, model.spec.dim), np.float32)


def build_index_iter(encoder_dir: str | Path, records: Sequence[PairRecord], out: str | Path, finding_col: str | None = "finding",
                     cancel: CancelToken | None = None) -> Job[Path]:
    """Embed every archived pair and write the index folder ``out`` (files replaced atomically)."""
    if not records:
        raise InputError("There are no image-report pairs to index: give a CSV with at least one row.")
    encoder = load_encoder_pack(encoder_dir)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"'{out}' is a file: give a folder for the index.")
    if (Path(encoder_dir).resolve() == (out / ENCODER).resolve()):
        raise UsageError(f"The index folder '{out}' already holds this encoder as its own copy: give another folder for the new index.")
    big = load_size(encoder.image_size)
    squares = np.zeros((len(records), big, big), np.uint8)
    for i, r in enumerate(records):
        check_cancel(cancel)
        squares[i] = load_square(r.image, big)
        yield Progress(i + 1, 2 * len(records), f"reading {r.image.name}")
    image_emb = []
    for sl in iter_chunks(len(records), 16):
        check_cancel(cancel)
        image_emb.append(embed_images(encoder, squares[sl]))
        yield Progress(len(records) + sl.stop, 2 * len(records), "embedding images")
    report_emb = embed_reports(encoder, [r.text for r in records])
    thumbs = np.stack([centre_crop(s[None], encoder.image_size)[0] for s in squares])
    if thumbs.shape[-1] != THUMBNAIL:
        from medseg.resample import resample_image

        thumbs = np.stack([resample_image(t, (THUMBNAIL, THUMBNAIL)) for t in thumbs])
    out.mkdir(parents=True, exist_ok=True)
    enc_copy = out / ENCODER
    enc_copy.mkdir(exist_ok=True)
    for name in (WEIGHTS, MANIFEST):  # weights first: the manifest names their sha256
        with atomic_path(enc_copy / name) as tmp:
            shutil.copyfile(Path(encoder_dir) / name, tmp)
    for name, array in (("image_embeddings.npy", np.concatenate(image_emb)), ("report_embeddings.npy", report_emb), ("thumbnails.npy", thumbs)):
        with atomic_path(out / name) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array)
    cases = [
        {"image": str(r.image.resolve()), "text": r.text, "group": r.group, "finding": (r.fields.get(finding_col) if finding_col else None), "fields": r.fields}
        for r in records
    ]
    meta = {
        "format": 1,
        "cases": len(cases),
        "encoder": encoder.manifest.get("id"),
        "encoder_sha256": encoder.sha256,
        "image_size": encoder.image_size,
        "finding_col": finding_col,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    atomic_write_text(out / INDEX, json.dumps({"meta": meta, "cases": cases}, indent=1) + "\n")
    return out


def load_index(folder: str | Path) -> SimilarIndex:
    folder = Path(folder)
    if not (folder / INDEX).is_file():
        raise UsageError(f"'{folder}' is not a similar-case index (no {INDEX}): build one with 'medseg similar --build --pairs FILE.csv --encoder DIR --index {folder}'.")
    try:
        data = json.loads((folder / INDEX).read_text(encoding="utf-8"))
        arrays = [np.load(folder / n) for n in ("image_embeddings.npy", "report_embeddings.npy", "thumbnails.npy")]
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(f"The index in '{folder}' is incomplete or damaged ({type(exc).__name__}): rebuild it with 'medseg similar --build'.") from exc
    cases = data.get("cases", [])
    if any(len(a) != len(cases) for a in arrays):
        raise InputError(f"The index in '{folder}' is inconsistent (its files list different numbers of cases): rebuild it with 'medseg similar --build'.")
    return SimilarIndex(folder, cases, arrays[0], arrays[1], arrays[2], data.get("meta", {}))


def query_embedding(index: SimilarIndex, array: np.ndarray, rgb: bool, region: tuple[int, int, int, int] | None = None, source: str = "the image") -> np.ndarray:
    """The global image feature (D,) of an image or of a region (y0, x0, y1, x1) of it."""
    encoder = index.encoder
    square = square_image(array, rgb, load_size(encoder.image_size), region, source)
    return embed_images(encoder, square[None])[0]


def nearest(index: SimilarIndex, query: np.ndarray, k: int = 5, by: str = "image", exclude: Sequence[int] = ()) -> list[SimilarCase]:
    """The ``k`` cases whose image (or report) features have the highest cosine with ``query``."""
    if by not in BY:
        raise UsageError(f"Search by '{by}' is not known: choose image or report.")
    if k < 1:
        raise UsageError(f"k must be at least 1, not {k}.")
    bank = index.image_embeddings if by == "image" else index.report_embeddings
    scores = bank @ query.astype(np.float32)
    if len(exclude):
        scores[np.asarray(exclude, dtype=np.int64)] = -np.inf
    order = np.argsort(-scores, kind="stable")[: min(k, int(np.isfinite(scores).sum()))]
    out = []
    for rank, i in enumerate(order, start=1):
        c = index.cases[i]
        out.append(SimilarCase(rank, float(scores[i]), int(i), c["image"], c["text"], c["group"], c.get("finding"), index.thumbnails[i], c.get("fields", {})))
    return out


def similar_iter(index: SimilarIndex | str | Path, array: np.ndarray, rgb: bool = False, k: int = 5, region: tuple[int, int, int, int] | None = None,
                 by: str = "image", source: str = "the image", cancel: CancelToken | None = None) -> Job[list[SimilarCase]]:
    """Generator: the ``k`` archived cases most similar to ``array`` (or to its ``region``)."""
    yield Progress(0, 2, "loading the index")
    if not isinstance(index, SimilarIndex):
        index = load_index(index)
    check_cancel(cancel)
    yield Progress(1, 2, "encoding the image")
    query = query_embedding(index, array, rgb, region, source)
    check_cancel(cancel)
    found = nearest(index, query, k, by)
    yield Progress(2, 2, f"{len(found)} similar cases")
    return found


__all__ = ["SimilarCase", "SimilarIndex", "build_index_iter", "embed_images", "embed_reports", "load_index", "nearest", "query_embedding", "similar_iter"]
