"""Whole-slide images: one :class:`Slide` over OpenSlide (vendor formats, generic tiled TIFF) and
tifffile (pyramidal TIFFs OpenSlide does not see as pyramids, e.g. OME-TIFF SubIFD pyramids).

A slide has levels (level 0 = full resolution), each with a shape ``(height, width)`` and a
downsample relative to level 0; a pixel size in µm/px when the file records one; associated images
(label, macro, thumbnail) where the format has them; and lazy per-level arrays for napari (dask,
read tile by tile, so only what is on screen is decoded).

Regions are addressed in the coordinates of the level they are read from, rows first:
``read_region(level, y, x, h, w)`` returns ``(h, w, 3)`` uint8 RGB; pixels outside the slide (and
transparent ones) are white, like glass.

Choice of backend: OpenSlide when it recognises the file, unless tifffile finds more pyramid levels
in it (OpenSlide sees only level 0 of an OME-TIFF whose reductions sit in SubIFDs); tifffile for
tiled or multi-level TIFFs OpenSlide refuses. Note: OpenSlide resamples reads at levels whose
downsample is not an integer by a sub-pixel offset (its level-0 ``location`` cannot address a
fractional level pixel); integer downsamples (2, 4, ...) and level 0 read exact pixels.
"""

from __future__ import annotations

import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medseg.errors import InputError

#: Suffixes that are slides (vendor formats OpenSlide reads, plus pyramidal TIFF).
VENDOR_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
SLIDE_SUFFIXES = VENDOR_SUFFIXES
TIFF_SUFFIXES = (".tif", ".tiff")

_MPP_RANGE = (0.01, 1000.0)  # a recorded pixel size outside this is a placeholder, not a measurement


@dataclass(frozen=True)
class Level:
    """One pyramid level: its index, shape ``(height, width)`` and downsample from level 0."""

    index: int
    shape: tuple[int, int]
    downsample: float

    @property
    def height(self) -> int:
        return self.shape[0]

    @property
    def width(self) -> int:
        return self.shape[1]


@dataclass
class Slide:
    """An open whole-slide image. Use :func:`open_slide`; close it (or use ``with``) when done."""

    path: Path
    backend: str  # "openslide" or "tifffile"
    vendor: str
    levels: list[Level]
    mpp_xy: tuple[float, float] | None  # (x, y) µm per level-0 pixel
    properties: dict[str, Any] = field(default_factory=dict)
    _handle: Any = None
    _arrays: list[Any] = field(default_factory=list)  # tifffile: one zarr array per level
    _associated: dict[str, Any] = field(default_factory=dict)  # tifffile: name -> series
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        name = self.path.name
        for suffix in (".ome.tiff", ".ome.tif", ".pyramid.tif"):
            if name.lower().endswith(suffix):
                return name[: -len(suffix)]
        return self.path.stem

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 ``(height, width)``."""
        return self.levels[0].shape

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def mpp(self) -> float | None:
        """µm per level-0 pixel (mean of x and y), or ``None`` when the file does not say."""
        return None if self.mpp_xy is None else float(sum(self.mpp_xy) / 2.0)

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.levels[level].downsample

    def level_scale(self, level: int) -> tuple[float, float]:
        """Level-0 pixels per pixel of ``level`` along (y, x) (exact ratio of the shapes)."""
        h0, w0 = self.shape
        h, w = self.levels[level].shape
        return h0 / h, w0 / w

    def best_level(self, target_mpp: float | None) -> int:
        """The level whose µm/px is closest (in ratio) to ``target_mpp``; ties go to the finer level.

        Without a target or without a slide pixel size, level 0.
        """
        if target_mpp is None or self.mpp is None or target_mpp <= 0:
            return 0
        errors = [abs(math.log(self.level_mpp(i) / target_mpp)) for i in range(self.level_count)]
        best = min(errors)
        return next(i for i, e in enumerate(errors) if e <= best + 1e-9)

    def describe(self) -> str:
        dims = ", ".join(f"{lv.width}x{lv.height}" for lv in self.levels)
        mpp = f"{self.mpp:.3f} µm/px" if self.mpp else "pixel size unknown"
        return f"{self.path.name}: {self.vendor} via {self.backend}, levels {dims}, {mpp}"

    # ------------------------------------------------------------------ pixels
    def read_region(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of ``level`` starting at row ``y``, column ``x`` of that level."""
        if not 0 <= level < self.level_count:
            raise InputError(f"Level {level} does not exist in '{self.path.name}': choose a level from 0 to {self.level_count - 1}.")
        if h <= 0 or w <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        if self.backend == "openslide":
            return self._read_openslide(level, y, x, h, w)
        return self._read_tifffile(level, y, x, h, w)

    def _read_openslide(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        sy, sx = self.level_scale(level) if level else (1.0, 1.0)
        location = (int(round(x * sx)), int(round(y * sy)))
        try:
            rgba = np.asarray(self._handle.read_region(location, level, (int(w), int(h))))
        except Exception as exc:  # noqa: BLE001 - OpenSlide raises its own error types for damaged files
            raise InputError(f"'{self.path.name}' could not be read at level {level} ({type(exc).__name__}: {exc}): the file is damaged or incomplete.") from exc
        return _rgba_on_white(rgba)

    def _read_tifffile(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        lh, lw = self.levels[level].shape
        out = np.full((h, w, 3), 255, np.uint8)
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, lh), min(x + w, lw)
        if y1 <= y0 or x1 <= x0:
            return out
        try:
            block = np.asarray(self._arrays[level][y0:y1, x0:x1])
        except Exception as exc:  # noqa: BLE001 - codec or file errors
            raise InputError(f"'{self.path.name}' could not be read at level {level} ({type(exc).__name__}: {exc}): {_codec_hint(exc)}") from exc
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _as_rgb(block)
        return out

    def read_level(self, level: int) -> np.ndarray:
        """A whole level in memory (small levels, thumbnails, tests)."""
        h, w = self.levels[level].shape
        return self.read_region(level, 0, 0, h, w)

    def read_downsampled(self, max_side: int = 2048) -> tuple[np.ndarray, tuple[float, float]]:
        """An RGB overview whose longer side is at most ``max_side``, and its level-0 px per pixel (y, x).

        Reads the finest level that is small enough after an integer block-mean, band by band, so
        memory stays bounded even for a single-level slide.
        """
        h0, w0 = self.shape
        target = max(h0, w0) / max_side
        level = max([i for i, lv in enumerate(self.levels) if lv.downsample <= max(target, 1.0)] or [0])
        lh, lw = self.levels[level].shape
        k = max(1, math.ceil(max(lh, lw) / max_side))
        oh, ow = lh // k or 1, lw // k or 1
        out = np.empty((oh, ow, 3), np.uint8)
        band = max(1, (1 << 24) // max(1, lw * 3 * k)) * k  # about 16 MB of pixels per read
        for r in range(0, oh * k, band):
            rows = min(band, oh * k - r)
            block = self.read_region(level, r, 0, rows, ow * k).reshape(rows // k, k, ow, k, 3)
            out[r // k : (r + rows) // k] = block.mean(axis=(1, 3)).round().astype(np.uint8)
        sy, sx = self.level_scale(level)
        return out, (sy * k, sx * k)

    # ------------------------------------------------------------------ associated images
    @property
    def associated_names(self) -> list[str]:
        if self.backend == "openslide":
            return sorted(self._handle.associated_images.keys())
        return sorted(self._associated)

    def associated_image(self, name: str) -> np.ndarray:
        """An associated image (``label``, ``macro``, ``thumbnail``, ...) as RGB uint8."""
        if name not in self.associated_names:
            have = ", ".join(self.associated_names) or "none"
            raise InputError(f"'{self.path.name}' has no associated image '{name}': it has {have}.")
        if self.backend == "openslide":
            return _rgba_on_white(np.asarray(self._handle.associated_images[name]))
        return _as_rgb(np.asarray(self._associated[name].asarray()))

    # ------------------------------------------------------------------ lazy arrays for viewers
    def level_array(self, level: int, chunk: int = 512):
        """A lazy dask array ``(h, w, 3)`` of one level, read chunk by chunk on demand."""
        import dask.array as da

        return da.from_array(_LevelArray(self, level), chunks=(chunk, chunk, 3), asarray=True, fancy=False, name=f"slide-{id(self)}-{level}", meta=np.empty((0, 0, 0), np.uint8))

    def pyramid(self, chunk: int = 512) -> list[Any]:
        """Lazy arrays of every level, finest first (a napari multiscale image)."""
        return [self.level_array(i, chunk) for i in range(self.level_count)]

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> "Slide":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


class _LevelArray:
    """Array-like view of one level for ``dask.array.from_array`` (only ``shape``, ``dtype``, slicing)."""

    def __init__(self, slide: Slide, level: int) -> None:
        self.slide, self.level = slide, level
        self.shape = (*slide.levels[level].shape, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ys, xs, cs = (k.indices(n) if isinstance(k, slice) else (k, k + 1, 1) for k, n in zip(key, self.shape))
        region = self.slide.read_region(self.level, ys[0], xs[0], max(ys[1] - ys[0], 0), max(xs[1] - xs[0], 0))
        region = region[:: ys[2], :: xs[2], cs[0] : cs[1] : cs[2]]
        squeeze = tuple(i for i, k in enumerate(key) if not isinstance(k, slice))
        return region.squeeze(axis=squeeze) if squeeze else region


# --------------------------------------------------------------------------- opening
def open_slide(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open a whole-slide image; ``mpp`` overrides (or supplies) the level-0 pixel size in µm.

    Raises :class:`InputError` with a sentence to act on for a missing, corrupt or unsupported file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"'{path}' does not exist: check the path.")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder, not a slide: give the slide file (for MIRAX give the .mrxs file beside its folder).")
    osr = _try_openslide(path)
    tiff_levels = _tifffile_level_count(path) if path.suffix.lower() in TIFF_SUFFIXES or osr is None else 0
    if osr is not None and (tiff_levels <= osr.level_count or osr.properties.get("openslide.vendor") not in (None, "generic-tiff")):
        slide = _from_openslide(path, osr)
    elif tiff_levels:
        if osr is not None:
            osr.close()
        slide = _from_tifffile(path)
    else:
        if osr is not None:
            osr.close()
        raise InputError(
            f"'{path.name}' is not a slide medseg can read: OpenSlide does not recognise it and it is not a tiled or pyramidal TIFF "
            "(the file is corrupt or in an unsupported format). Use SVS, NDPI, MRXS, SCN, BIF or a tiled pyramidal TIFF/OME-TIFF; "
            "open plain images with the 2-D reader."
        )
    if mpp is not None:
        if not mpp > 0:
            raise InputError(f"Pixel size {mpp} µm/px must be positive.")
        slide.mpp_xy = (float(mpp), float(mpp))
        slide.properties["medseg.mpp-source"] = "given"
    return slide


def is_slide(path: str | os.PathLike) -> bool:
    """Cheap test for readers: a vendor slide OpenSlide detects, or a TIFF that is tiled or has reduced levels.

    Plain (striped, single-level) TIFFs are not slides: the 2-D image reader handles them.
    """
    path = Path(path)
    if not path.is_file() or not path.name.lower().endswith(SLIDE_SUFFIXES):
        return False
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return _openslide_vendor(path) is not None
    return _tifffile_level_count(path) > 0


def _try_openslide(path: Path):
    try:
        import openslide
    except Exception:  # noqa: BLE001 - OpenSlide missing: tifffile may still read the file
        return None
    try:
        if openslide.OpenSlide.detect_format(str(path)) is None:
            return None
        return openslide.OpenSlide(str(path))
    except Exception:  # noqa: BLE001 - unsupported or corrupt: let tifffile try, then say so
        return None


def _openslide_vendor(path: Path) -> str | None:
    try:
        import openslide

        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # noqa: BLE001
        return None


def _tifffile_level_count(path: Path) -> int:
    """Levels of the first series if the file is a tiled or multi-level TIFF, else 0."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                return 0
            series = tif.series[0]
            levels = len(series.levels)
            tiled = bool(series.keyframe.is_tiled)
            return levels if levels > 1 or tiled else 0
    except Exception:  # noqa: BLE001 - not a TIFF or damaged
        return 0


def _from_openslide(path: Path, osr) -> Slide:
    props = dict(osr.properties)
    levels = [Level(i, (int(h), int(w)), float(ds)) for i, ((w, h), ds) in enumerate(zip(osr.level_dimensions, osr.level_downsamples))]
    mpp_xy = None
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        if all(_MPP_RANGE[0] < v < _MPP_RANGE[1] for v in (mx, my)):
            mpp_xy = (mx, my)
    except (KeyError, ValueError):
        pass
    props["medseg.mpp-source"] = "openslide" if mpp_xy else "none"
    return Slide(path=path, backend="openslide", vendor=props.get("openslide.vendor", "unknown"), levels=levels, mpp_xy=mpp_xy, properties=props, _handle=osr)


def _from_tifffile(path: Path) -> Slide:
    import tifffile
    import zarr

    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        store = tif.aszarr(series=0)
        group = zarr.open(store, mode="r")
        arrays = [group[str(i)] for i in range(len(series.levels))] if len(series.levels) > 1 else [group]
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"'{path.name}' is a TIFF that tifffile cannot open as a slide ({type(exc).__name__}: {exc}): the file is damaged or incomplete.") from exc
    axes = series.axes
    if axes not in ("YXS", "YX"):
        tif.close()
        raise InputError(f"'{path.name}' has axes {axes}: medseg reads 2-D grey or RGB slides (axes YX or YXS); export one plane as RGB.")
    if series.dtype != np.uint8:
        tif.close()
        raise InputError(f"'{path.name}' stores {series.dtype} pixels: medseg reads 8-bit slides; convert it to 8-bit RGB.")
    shapes = [tuple(int(n) for n in lv.shape[:2]) for lv in series.levels]
    h0, w0 = shapes[0]
    levels = [Level(i, s, float((h0 / s[0] + w0 / s[1]) / 2.0)) for i, s in enumerate(shapes)]
    props: dict[str, Any] = {"tifffile.axes": axes, "tifffile.compression": str(series.keyframe.compression)}
    mpp_xy, source = _tiff_mpp(tif, series)
    props["medseg.mpp-source"] = source
    vendor = "ome-tiff" if tif.is_ome else ("aperio" if tif.is_svs else "generic-tiff")
    associated = {s.name.lower(): s for s in tif.series[1:] if s.name and len(s.levels) == 1 and s.name.lower() in ("label", "macro", "thumbnail", "overview")}
    slide = Slide(path=path, backend="tifffile", vendor=vendor, levels=levels, mpp_xy=mpp_xy, properties=props, _arrays=arrays, _associated=associated)
    slide._handle = _TiffHandle(tif)
    return slide


class _TiffHandle:
    def __init__(self, tif) -> None:
        self.tif = tif

    def close(self) -> None:
        self.tif.close()


def _tiff_mpp(tif, series) -> tuple[tuple[float, float] | None, str]:
    """Pixel size from OME PhysicalSize, an Aperio description, or the resolution tags (in that order)."""
    if tif.is_ome and tif.ome_metadata:
        px = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
        py = re.search(r'PhysicalSizeY="([0-9.eE+-]+)"', tif.ome_metadata)
        ux = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
        if px and py:
            factor = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}.get(ux.group(1) if ux else "µm", 1.0)
            mx, my = float(px.group(1)) * factor, float(py.group(1)) * factor
            if all(_MPP_RANGE[0] < v < _MPP_RANGE[1] for v in (mx, my)):
                return (mx, my), "ome"
    page = series.keyframe
    desc = page.description or ""
    m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
    if m and _MPP_RANGE[0] < float(m.group(1)) < _MPP_RANGE[1]:
        return (float(m.group(1)),) * 2, "aperio"
    tags = page.tags
    unit = tags.valueof("ResolutionUnit")
    xr, yr = tags.valueof("XResolution"), tags.valueof("YResolution")
    per_unit = {2: 25400.0, 3: 10000.0}.get(int(unit) if unit is not None else 1)
    if per_unit and xr and yr:
        fx, fy = (v[0] / v[1] if isinstance(v, tuple) else float(v) for v in (xr, yr))
        if fx > 0 and fy > 0:
            mx, my = per_unit / fx, per_unit / fy
            if all(_MPP_RANGE[0] < v < 100.0 for v in (mx, my)):
                return (mx, my), "tiff-resolution"
    return None, "none"


# --------------------------------------------------------------------------- pixel helpers
def _rgba_on_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's RGBA (transparent outside the scanned area) composited onto white glass."""
    rgb = rgba[..., :3]
    if rgba.shape[-1] < 4:
        return np.ascontiguousarray(rgb)
    alpha = rgba[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[..., None].astype(np.float32) / 255.0
    return (rgb.astype(np.float32) * a + 255.0 * (1.0 - a)).round().astype(np.uint8)


def _as_rgb(block: np.ndarray) -> np.ndarray:
    if block.ndim == 2:
        return np.repeat(block[..., None], 3, axis=-1)
    if block.shape[-1] == 4:
        return _rgba_on_white(block)
    if block.shape[-1] == 1:
        return np.repeat(block, 3, axis=-1)
    return block[..., :3]


def _codec_hint(exc: Exception) -> str:
    text = str(exc).lower()
    if "imagecodecs" in text or "jpeg" in text or "compression" in text:
        return "its tiles use a compression tifffile decodes only with the imagecodecs package (pip install imagecodecs)."
    return "the file is damaged or incomplete."


def write_pyramid(
    path: str | os.PathLike,
    image: np.ndarray | Sequence[np.ndarray],
    mpp: float | None = None,
    levels: int = 3,
    tile: int = 256,
    compression: str = "zlib",
    subifds: bool = False,
) -> Path:
    """Write an RGB (or grey) image as a tiled pyramidal TIFF that OpenSlide and tifffile both read.

    Reduced levels are consecutive top-level pages flagged as reduced-resolution (OpenSlide's generic
    TIFF), or SubIFDs (OME-TIFF style, tifffile only) with ``subifds=True``; each level halves the
    previous by 2x2 block mean (or ``image`` is a list of ready levels, each half the previous).
    ``mpp`` goes into the resolution tags in pixels per centimetre. Written atomically.
    """
    import tifffile

    from medseg.io.atomic import atomic_path

    given = isinstance(image, (list, tuple))
    pyramid = [np.asarray(a) for a in image] if given else [np.asarray(image)]
    for _ in range(len(pyramid), 1 if given else levels):
        prev = pyramid[-1]
        h, w = prev.shape[0] // 2, prev.shape[1] // 2
        if min(h, w) < 1:
            break
        block = prev[: h * 2, : w * 2].reshape(h, 2, w, 2, *prev.shape[2:]).mean(axis=(1, 3))
        pyramid.append(block.round().astype(prev.dtype))
    photometric = "rgb" if pyramid[0].ndim == 3 else "minisblack"
    target = Path(path)
    with atomic_path(target) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=pyramid[0].nbytes > 2**31) as tw:
            for i, arr in enumerate(pyramid):
                kw: dict[str, Any] = {"tile": (tile, tile), "compression": compression, "photometric": photometric}
                if mpp:
                    res = 1e4 / (mpp * 2**i)
                    kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
                if subifds:
                    if i == 0:
                        tw.write(arr, subifds=len(pyramid) - 1, **kw)
                    else:
                        tw.write(arr, subfiletype=1, **kw)
                else:
                    tw.write(arr, subfiletype=0 if i == 0 else 1, **kw)
    return target


__all__ = ["Level", "SLIDE_SUFFIXES", "Slide", "is_slide", "open_slide", "write_pyramid"]
