"""Read video files (AVI, MP4, MOV) as a time stack with imageio's ffmpeg plugin (imageio-ffmpeg).

Every frame is decoded into memory: ``(T, H, W, 3)``, or ``(T, H, W)`` when the video is grey (all three
channels equal within the codec's rounding, as ultrasound cine exports usually are), which takes a
third of the memory and suits 1-channel models. Frame rate and codec go into the metadata.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError

VIDEO_SUFFIXES = (".avi", ".mp4", ".mov")
GREY_TOLERANCE = 2  # largest channel difference (8-bit) still counted as grey after lossy YUV -> RGB


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """``(frames, metadata)``: all frames (or the first ``max_frames``) of a video as uint8 numpy."""
    import imageio.v3 as iio

    path = Path(path)
    try:
        import imageio_ffmpeg  # noqa: F401 - imageio's FFMPEG plugin runs the ffmpeg binary this package ships
    except ImportError as exc:
        raise InputError(f"Reading the video '{path.name}' needs imageio-ffmpeg: pip install imageio-ffmpeg.") from exc
    meta: dict[str, Any] = {"format": "video"}
    try:
        info = iio.immeta(path, plugin="FFMPEG")
    except Exception as exc:  # noqa: BLE001 - ffmpeg's reasons vary: missing codec, truncated file, not a video
        raise InputError(f"'{path.name}' is not a video ffmpeg can read ({_first_line(exc)}): check that the file is complete, or export it as MP4/AVI.") from exc
    fps = info.get("fps")
    if isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0:
        meta["fps"] = float(fps)
    for key in ("codec", "duration", "pix_fmt"):
        if info.get(key) not in (None, ""):
            meta[key] = info[key]
    frames: list[np.ndarray] = []
    grey = True
    try:
        for frame in iio.imiter(path, plugin="FFMPEG"):
            frame = np.asarray(frame)
            if frame.ndim == 3 and frame.shape[-1] == 4:
                frame = frame[..., :3]
            if grey and frame.ndim == 3:
                grey = _is_grey(frame)
            frames.append(frame)
            if max_frames is not None and len(frames) >= max_frames:
                break
    except Exception as exc:  # noqa: BLE001
        if not frames:
            raise InputError(f"'{path.name}' is not a video ffmpeg can decode ({_first_line(exc)}): check that the file is complete.") from exc
        meta["truncated"] = f"decoding stopped after {len(frames)} frames: {_first_line(exc)}"
    if not frames:
        raise InputError(f"'{path.name}' holds no video frames: check that the file is complete.")
    stack = np.stack(frames)
    if grey and stack.ndim == 4:
        stack = np.ascontiguousarray(stack[..., 1])  # G carries most of the luma; equal to R and B within the tolerance
        meta["grey"] = True
    meta["frames"] = int(stack.shape[0])
    return stack, meta


def _is_grey(frame: np.ndarray) -> bool:
    f = frame.astype(np.int16)
    return int(np.abs(f[..., 0] - f[..., 1]).max()) <= GREY_TOLERANCE and int(np.abs(f[..., 2] - f[..., 1]).max()) <= GREY_TOLERANCE


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


__all__ = ["VIDEO_SUFFIXES", "read_video"]
