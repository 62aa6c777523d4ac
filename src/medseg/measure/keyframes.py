"""Key frames of an ultrasound cine loop: frame features from the segmentation pack, a FullTransNet summary.

:func:`summarise_loop_iter` is the one path behind the Ultrasound dock's "Summarise loop" button:

1. every frame is resized to the segmentation pack's tile (256 x 256 for ``ultrasound-fhps``),
   normalised as the pack says and run through the pack once; the **features** are the global
   average of each encoder stage's output, concatenated (:func:`frame_features_iter`; 32 + 64 + 128 + 256 = 480
   values for the shipped ``ultrasound-fhps``), and the same pass gives the frame's **quality**
   (:func:`frame_quality`: 0 unless both structures are present, else the mean winning-class
   probability over the predicted PS and FH pixels);
2. the summariser pack (a :class:`~medseg.models.fulltransnet.FullTransNet`, default
   ``ultrasound-keyframes``) decodes ``ceil(ratio * T)`` picks per window of at most its ``max_len``
   frames and turns them into **frame scores** (:func:`~medseg.models.fulltransnet.frame_scores`);
3. the **key frames** are the ``ceil(ratio * T)`` highest-scored frames (:func:`select_key_frames`),
   in temporal order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from medseg.engine.progress import CancelToken, Job, Progress, check_cancel, run_sync
from medseg.errors import InputError, ModelError
from medseg.resample import resample_image

DEFAULT_SUMMARISER = "ultrasound-keyframes"
DEFAULT_RATIO = 0.15
MIN_AREA = {"ps": 0.0005, "fh": 0.005}  # share of the frame a structure must cover to count as present


@dataclass
class LoopSummary:
    """Frame scores, the key frames (ascending) and each frame's segmentation quality."""

    scores: np.ndarray
    key_frames: list[int]
    quality: np.ndarray
    summariser: str = ""

    def next_key(self, frame: int) -> int | None:
        """The first key frame after ``frame`` (wrapping round to the first); ``previous_key`` likewise backwards."""
        later = [k for k in self.key_frames if k > frame]
        return later[0] if later else (self.key_frames[0] if self.key_frames else None)

    def previous_key(self, frame: int) -> int | None:
        earlier = [k for k in self.key_frames if k < frame]
        return earlier[-1] if earlier else (self.key_frames[-1] if self.key_frames else None)


def select_key_frames(scores: Sequence[float], ratio: float = DEFAULT_RATIO) -> list[int]:
    """The ``ceil(ratio * T)`` highest-scored frames (earlier first on ties), in temporal order."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        return []
    k = min(len(s), max(1, math.ceil(ratio * len(s))))
    order = np.argsort(-s, kind="stable")[:k]
    return sorted(int(i) for i in order)


def frame_quality(probs: np.ndarray, ps_value: int = 1, fh_value: int = 2) -> float:
    """0 unless PS and FH are both present in the argmax (at least :data:`MIN_AREA` of the frame), else the
    mean winning probability over their predicted pixels. ``probs`` (K, H, W) softmax."""
    labels = probs.argmax(0)
    n = labels.size
    ps, fh = labels == ps_value, labels == fh_value
    if ps.sum() < MIN_AREA["ps"] * n or fh.sum() < MIN_AREA["fh"] * n:
        return 0.0
    return float(probs.max(0)[ps | fh].mean())


def _prepare(frame: np.ndarray, pack, size: int) -> torch.Tensor:
    from medseg.normalise import adapt_channels

    frame = np.asarray(frame)
    rgb = frame.ndim == 3 and frame.shape[-1] in (3, 4)
    if rgb:
        frame = frame[..., :3]
    frame = resample_image(frame, (size, size))
    frame = adapt_channels(frame, rgb, pack.in_channels, "the frame")
    return torch.from_numpy(pack.normaliser.apply(frame, pack.normaliser.frame_stats(frame)))


@torch.no_grad()
def features_and_probs(pack, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a segmentation pack on a normalised batch (N, C, H, W): (pooled encoder features (N, F), softmax (N, K, H, W))."""
    net = pack.model
    encoder = getattr(net, "encoder", None)
    if encoder is None:
        raise ModelError(f"Pack '{pack.id}' has no encoder to take frame features from: use a pack such as 'ultrasound-fhps'.")
    captured: list = []
    handle = encoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = net(x)
    finally:
        handle.remove()
    stages = captured[0] if isinstance(captured[0], (list, tuple)) else [captured[0]]
    feats = torch.cat([s.float().mean(dim=(2, 3)) for s in stages], dim=1)
    return feats, torch.softmax(logits.float(), dim=1)


def frame_features_iter(stack: np.ndarray, pack, cancel: CancelToken | None = None, batch: int = 4) -> Job[tuple[np.ndarray, np.ndarray]]:
    """Features (T, F) and qualities (T,) of a ``(T, H, W[, C])`` stack, one :class:`Progress` per batch."""
    from medseg.measure.ultrasound import structure_values

    frames = np.asarray(stack)
    ps, fh = structure_values(pack.classes)
    size = int(pack.tile)
    feats, quality = [], []
    yield Progress(0, len(frames), "frame features")
    for start in range(0, len(frames), batch):
        check_cancel(cancel)
        x = torch.stack([_prepare(f, pack, size) for f in frames[start : start + batch]])
        f, p = features_and_probs(pack, x)
        feats.append(f.numpy())
        quality.extend(frame_quality(pi, ps, fh) for pi in p.numpy())
        yield Progress(min(len(frames), start + batch), len(frames), "frame features")
    return np.concatenate(feats), np.asarray(quality, dtype=np.float32)


@torch.no_grad()
def score_loop(model, features: np.ndarray, ratio: float = DEFAULT_RATIO) -> np.ndarray:
    """FullTransNet frame scores (T,) of one loop's features, in windows of at most ``model.max_len`` frames."""
    from medseg.models.fulltransnet import frame_scores

    model.eval()
    t = len(features)
    scores = np.zeros(t, np.float32)
    for a in range(0, t, model.max_len):
        x = torch.from_numpy(np.ascontiguousarray(features[a : a + model.max_len], dtype=np.float32))[None]
        picks, probs = model.decode(x, max(1, math.ceil(ratio * x.shape[1])))
        scores[a : a + x.shape[1]] = frame_scores(probs[0], picks[0]).numpy()
    return scores


def summarise_loop_iter(stack: np.ndarray, seg_pack="ultrasound-fhps", summariser=DEFAULT_SUMMARISER, ratio: float = DEFAULT_RATIO,
                        cancel: CancelToken | None = None) -> Job[LoopSummary]:
    """Generator: features of every frame of ``stack`` (T, H, W[, C]), then the FullTransNet key frames."""
    from medseg.train.packs import resolve

    frames = np.asarray(stack)
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (3, 4)) or len(frames) < 2:
        raise InputError(f"A loop must be a stack of at least 2 frames (T, H, W) or (T, H, W, RGB), not shape {frames.shape}: open a cine loop.")
    if not 0 < ratio <= 1:
        raise InputError(f"The key-frame share must be in (0, 1], not {ratio}.")
    if isinstance(seg_pack, (str, os.PathLike)):
        yield Progress(0, 0, f"loading {seg_pack}")
        seg_pack = resolve(seg_pack)
    if isinstance(summariser, (str, os.PathLike)):
        summariser = resolve(summariser)
    model = summariser.model
    expected = getattr(model, "in_features", None)
    features, quality = yield from frame_features_iter(frames, seg_pack, cancel)
    if expected != features.shape[1]:
        raise ModelError(f"Summariser '{summariser.id}' expects {expected} features per frame but '{seg_pack.id}' gives {features.shape[1]}: "
                         f"use the segmentation pack it was trained on ({summariser.manifest.get('features_from', 'see its manifest')}).")
    check_cancel(cancel)
    scores = score_loop(model, features, ratio)
    return LoopSummary(scores, select_key_frames(scores, ratio), quality, summariser.id)


def summarise_loop(stack: np.ndarray, seg_pack="ultrasound-fhps", summariser=DEFAULT_SUMMARISER, ratio: float = DEFAULT_RATIO) -> LoopSummary:
    return run_sync(summarise_loop_iter(stack, seg_pack, summariser, ratio))


__all__ = ["DEFAULT_RATIO", "DEFAULT_SUMMARISER", "LoopSummary", "features_and_probs", "frame_features_iter", "frame_quality", "score_loop",
           "select_key_frames", "summarise_loop", "summarise_loop_iter"]
