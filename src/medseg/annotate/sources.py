"""Where a correction session's image and predicted objects come from: an image file or a region of a
whole slide, and an instance mask from a model pack (with each object's mean foreground probability as
its confidence), from a mask file, or from QuPath GeoJSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

from medseg import metrics
from medseg.annotate.session import CorrectionSession, as_instances, is_session
from medseg.engine.progress import CancelToken, Job, Progress
from medseg.errors import InputError, UsageError
from medseg.io import read_image, stem_of

Region = tuple[int, int, int, int]  # x, y, width, height in level-0 pixels


def parse_region(text: str | Sequence[int] | None) -> Region | None:
    """``"x,y,w,h"`` (level-0 pixels) as a tuple; None for None."""
    if text is None:
        return None
    try:
        vals = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError as exc:
        raise UsageError(f"Region '{text}' is not four whole numbers: give it as x,y,width,height in level-0 pixels.") from exc
    if len(vals) != 4 or vals[2] <= 0 or vals[3] <= 0 or vals[0] < 0 or vals[1] < 0:
        raise UsageError(f"Region '{text}' must be x,y,width,height with x, y >= 0 and a positive width and height.")
    return tuple(vals)  # type: ignore[return-value]


def default_folder(image: str | os.PathLike, region: Region | None = None) -> Path:
    """``<image folder>/<stem>.correct`` (``<stem>.x<X>y<Y>w<W>h<H>.correct`` for a slide region)."""
    image = Path(image)
    tag = "" if region is None else ".x{}y{}w{}h{}".format(*region)
    return image.parent / f"{stem_of(image)}{tag}.correct"


def load_image(path: str | os.PathLike, region: Region | None = None, mpp: float | None = None) -> tuple[np.ndarray, float | None]:
    """The 2-D image (grey or RGB) of a file, or a level-0 region of a whole slide, and its µm/px when known."""
    from medseg.io.slides import is_slide, open_slide

    path = Path(path)
    if is_slide(path):
        if region is None:
            raise UsageError(f"'{path.name}' is a whole slide: choose a region to correct with --region x,y,width,height (level-0 pixels).")
        with open_slide(path, mpp) as slide:
            x, y, w, h = region
            H, W = slide.shape
            if x + w > W or y + h > H:
                raise UsageError(f"Region {region} reaches beyond the slide ({W}x{H}): choose a region inside it.")
            return slide.read_region(0, y, x, h, w), slide.mpp
    data = read_image(path)
    if data.is_stack:
        raise InputError(f"'{path.name}' is a stack of frames: correct one 2-D image at a time.")
    arr = data.array
    if region is not None:
        x, y, w, h = region
        if x + w > arr.shape[1] or y + h > arr.shape[0]:
            raise UsageError(f"Region {region} reaches beyond the image ({arr.shape[1]}x{arr.shape[0]}): choose a region inside it.")
        arr = arr[y : y + h, x : x + w]
    return arr, mpp if mpp is not None else data.metadata.get("mpp")


def read_source_image(info: dict[str, Any]) -> np.ndarray:
    """The image a session was created on (from its ``session.json`` fields)."""
    if not info.get("image"):
        raise InputError("This correction session records no image: it was created from a mask alone.")
    return load_image(info["image"], parse_region(info.get("region")), info.get("mpp"))[0]


# --------------------------------------------------------------------------- the predicted objects
def mask_from_file(path: str | os.PathLike, shape: tuple[int, int] | None = None, region: Region | None = None) -> np.ndarray:
    """Instance ids from a mask file: a mask with one foreground value is split into its 8-connected
    objects; a mask with several values is taken as instance ids."""
    from medseg.io.images import read_labels

    arr = np.asarray(read_labels(path))
    if region is not None and shape is not None and arr.shape != tuple(shape):
        x, y, w, h = region
        arr = arr[y : y + h, x : x + w]
    if shape is not None and arr.shape != tuple(shape):
        raise InputError(f"Mask '{Path(path).name}' is {arr.shape[1]}x{arr.shape[0]} but the image is {shape[1]}x{shape[0]}: give the mask of this image.")
    return objects_of(arr)


def objects_of(mask: np.ndarray) -> np.ndarray:
    """Instance ids of a mask array: one foreground value -> its 8-connected objects; several values -> taken as ids."""
    mask = np.asarray(mask)
    if np.unique(mask).size <= 2:
        return metrics.instances(mask > 0).astype(np.uint32)
    return as_instances(mask)


def mask_from_geojson(path: str | os.PathLike, shape: tuple[int, int], region: Region | None = None) -> tuple[np.ndarray, dict[int, float]]:
    """Instance ids rasterised from QuPath GeoJSON polygons (level-0 px; shifted by the region's corner),
    and each object's ``Confidence`` measurement when present. Features outside the image are skipped."""
    from medseg.io.geojson import read_geojson
    from medseg.measure.objects import rasterise_polygons

    features, _ = read_geojson(path)
    ox, oy = (region[0], region[1]) if region else (0, 0)
    h, w = shape
    labels = np.zeros(shape, np.uint32)
    confidence: dict[int, float] = {}
    oid = 0
    for f in features:
        pts = np.array([p for poly in f.polygons for ring in poly for p in ring], float)
        if pts.size == 0:
            continue
        x0, y0 = int(np.floor(pts[:, 0].min())) - ox, int(np.floor(pts[:, 1].min())) - oy
        x1, y1 = int(np.ceil(pts[:, 0].max())) - ox + 1, int(np.ceil(pts[:, 1].max())) - oy + 1
        bx0, by0, bx1, by1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
        if bx0 >= bx1 or by0 >= by1:
            continue
        shifted = [[[(px - ox - bx0, py - oy - by0) for px, py in ring] for ring in poly] for poly in f.polygons]
        inside = rasterise_polygons(shifted, (by1 - by0, bx1 - bx0))
        if not inside.any():
            continue
        oid += 1
        patch = labels[by0:by1, bx0:bx1]
        patch[inside & (patch == 0)] = oid
        if "Confidence" in f.measurements:
            confidence[oid] = float(f.measurements["Confidence"])
    return labels, confidence


def instances_with_confidence(labels: np.ndarray, foreground_probability: np.ndarray | None, min_area_px: int = 0) -> tuple[np.ndarray, dict[int, float]]:
    """8-connected objects of a class-label image and each one's mean foreground probability (1 when unknown)."""
    inst = metrics.instances(labels > 0, min_area=min_area_px).astype(np.uint32)
    n = int(inst.max())
    if n == 0:
        return inst, {}
    if foreground_probability is None:
        return inst, {i: 1.0 for i in range(1, n + 1)}
    means = ndimage.mean(foreground_probability.astype(np.float32), inst, index=np.arange(1, n + 1))
    return inst, {i: float(m) for i, m in enumerate(np.atleast_1d(means), start=1)}


def predict_objects_iter(image: np.ndarray, pack: Any, mpp: float | None = None, cancel: CancelToken | None = None,
                         config: Any = None) -> Job[tuple[np.ndarray, dict[int, float]]]:
    """Run a pack on the image; return its objects (instance ids) and their mean foreground probability.

    Objects smaller than the pack's recorded minimum area (``postprocess.min_object_area_um2``) are
    dropped when the image's µm/px is known.
    """
    from dataclasses import replace

    from medseg.engine import PredictConfig, Predictor
    from medseg.train.packs import resolve

    pack = resolve(pack)
    cfg = replace(config, probabilities=True) if config is not None else PredictConfig(tile=pack.tile, overlap=pack.overlap, probabilities=True)
    prediction = yield from Predictor(pack, cfg).predict_iter(image, cancel=cancel, mpp=mpp)
    probs = prediction.probabilities
    fg = None if probs is None else 1.0 - probs[0].astype(np.float32)
    min_um2 = (pack.manifest.get("postprocess") or {}).get("min_object_area_um2")
    min_px = int(np.ceil(min_um2 / (mpp * mpp))) if (min_um2 and mpp) else 0
    return instances_with_confidence(prediction.labels, fg, min_px)


def open_session_iter(
    image: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
    geojson: str | os.PathLike | None = None,
    pack: Any = None,
    region: Region | None = None,
    mpp: float | None = None,
    cancel: CancelToken | None = None,
    config: Any = None,
    **kwargs: Any,
) -> Job[CorrectionSession]:
    """Reopen the session of an image (or of ``folder``) when there is one; otherwise start it from a mask
    file, a GeoJSON or a pack's prediction. Yields :class:`Progress` while predicting."""
    if image is None and folder is None:
        raise UsageError("Give the image to correct (or the folder of an existing correction session).")
    folder = Path(folder) if folder is not None else default_folder(image, region)  # type: ignore[arg-type]
    if is_session(folder):
        yield Progress(0, 0, f"reopening {folder.name}")
        return CorrectionSession.open(folder, **kwargs)
    if image is None:
        raise InputError(f"'{folder}' holds no correction session: give the image and its mask (--mask, --geojson or --pack) to start one.")
    sources = [s for s in (mask, geojson, pack) if s is not None]
    if len(sources) != 1:
        raise UsageError("Say where the objects to correct come from: exactly one of a mask file (--mask), a QuPath GeoJSON (--geojson) or a model pack (--pack).")
    yield Progress(0, 0, f"reading {Path(image).name}")
    array, image_mpp = load_image(image, region, mpp)
    shape = array.shape[:2]
    confidence: dict[int, float] | None = None
    if mask is not None:
        labels, source = mask_from_file(mask, shape, region), {"kind": "mask", "path": str(Path(mask).resolve())}
    elif geojson is not None:
        labels, confidence = mask_from_geojson(geojson, shape, region)
        source = {"kind": "geojson", "path": str(Path(geojson).resolve())}
    else:
        labels, confidence = yield from predict_objects_iter(array, pack, image_mpp, cancel, config)
        source = {"kind": "pack", "pack": str(getattr(pack, "id", pack))}
    info = {"image": str(Path(image).resolve()), "region": list(region) if region else None, "mpp": image_mpp, "source": source}
    return CorrectionSession.create(folder, labels, confidence, info, **kwargs)


__all__ = ["default_folder", "objects_of", "instances_with_confidence", "load_image", "mask_from_file", "mask_from_geojson", "open_session_iter", "parse_region", "predict_objects_iter", "read_source_image"]
