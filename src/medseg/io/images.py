"""Read 2-D images, frame stacks, MetaImage, DICOM and video files; write label masks atomically.

Everything returns numpy arrays with a small description (:class:`ImageData`): grey ``(H, W)``,
RGB ``(H, W, 3)``, a stack ``(T, H, W)`` or an RGB stack ``(T, H, W, 3)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_path
from medseg.io.dicom import DICOM_SUFFIXES, is_dicom, read_dicom
from medseg.io.video import VIDEO_SUFFIXES, read_video

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".mha", ".mhd") + DICOM_SUFFIXES + VIDEO_SUFFIXES


@dataclass
class ImageData:
    """An image as numpy plus what is known about it."""

    array: np.ndarray
    rgb: bool
    is_stack: bool
    spacing: tuple[float, float] | None = None  # (row, col) in mm, when the file says so
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.stem if self.path is not None else "image"


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".nii.gz"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def stem_of(path: str | os.PathLike) -> str:
    """File name without its (possibly double) extension."""
    return _stem(Path(path))


def read_image(path: str | os.PathLike) -> ImageData:
    """Read a 2-D image, a stack (multi-page TIFF), a MetaImage, a DICOM (also without suffix) or a video file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"'{path}' does not exist: check the path.")
    if path.is_dir():
        raise InputError(f"'{path}' is a folder, not an image: give the image files inside it.")
    suffix = path.suffix.lower()
    try:
        if suffix in (".mha", ".mhd"):
            array, spacing, meta = _read_metaimage(path)
        elif suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and is_dicom(path)):
            array, spacing, meta = read_dicom(path)
        elif suffix in VIDEO_SUFFIXES:
            array, meta = read_video(path)
            spacing = None
        elif suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
            spacing, meta = None, {}
        else:
            import imageio.v3 as iio

            array = iio.imread(path)
            spacing, meta = None, {}
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is an unreadable image
        raise InputError(
            f"'{path.name}' is not an image medseg can read (the file is corrupt or not in a supported format): "
            "use PNG, JPEG, TIFF, MetaImage (.mha), DICOM or a video (AVI, MP4, MOV)."
        ) from exc
    data = describe_array(np.asarray(array), source=path.name)
    data.path = path
    data.spacing = spacing
    data.metadata.update(meta)
    return data


def _read_metaimage(path: Path) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, Any]]:
    import SimpleITK as sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"'{path.name}' is not a MetaImage file SimpleITK can read: check that the file is complete.") from exc
    array = sitk.GetArrayFromImage(img)
    sp = img.GetSpacing()  # x, y[, z]
    spacing = (float(sp[1]), float(sp[0])) if len(sp) >= 2 else None
    meta = {"metaimage_spacing": tuple(float(s) for s in sp)}
    if img.GetNumberOfComponentsPerPixel() == 1 and array.ndim == 3 and array.shape[0] == 3 and np.array_equal(array[0], array[1]) and np.array_equal(array[0], array[2]):
        # PSFHS stores a grey frame as three identical planes: keep one.
        array = array[0]
        meta["identical_planes_collapsed"] = 3
    if spacing == (1.0, 1.0):
        spacing = None  # the MetaImage default: a placeholder, not a measurement
    return array, spacing, meta


def describe_array(array: np.ndarray, rgb: bool | None = None, source: str = "the image") -> ImageData:
    """Validate an array and say whether it is RGB and/or a stack.

    ``rgb=None`` guesses: a last axis of 3 or 4 is colour (alpha is dropped).
    """
    if array.size == 0:
        raise InputError(f"{source} is empty (shape {array.shape}): give an image with pixels.")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InputError(f"{source} has pixel type {array.dtype}, which is not numeric: give a grey or RGB image.")
    if rgb is None:
        rgb = array.ndim in (3, 4) and array.shape[-1] in (3, 4)
    if not rgb and array.ndim == 3 and array.shape[-1] <= 8 < min(array.shape[:2]):
        raise InputError(
            f"{source} looks like a {array.shape[-1]}-channel image (shape {tuple(array.shape)}): medseg takes grey or RGB "
            "images; choose one channel or convert to RGB."
        )
    if rgb and array.shape[-1] == 4:
        array = array[..., :3]
    spatial_ndim = array.ndim - (1 if rgb else 0)
    if rgb and array.shape[-1] != 3:
        raise InputError(f"{source} has {array.shape[-1]} channels: medseg takes grey or RGB images; choose one channel or convert to RGB.")
    if spatial_ndim not in (2, 3):
        raise InputError(
            f"{source} has shape {tuple(array.shape)} ({array.ndim}-D): medseg segments 2-D images and stacks of "
            "2-D frames (T, H, W[, 3]); select one volume, channel or time point first."
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{source} contains NaN or infinite values: fix or mask them before segmenting.")
    return ImageData(array=array, rgb=bool(rgb), is_stack=spatial_ndim == 3)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write a label image atomically: PNG for 2-D uint8, TIFF otherwise (stacks, uint16/32)."""
    path = Path(path)
    if labels.ndim == 2 and labels.dtype == np.uint8 and path.suffix.lower() == ".png":
        import imageio.v3 as iio

        with atomic_path(path) as tmp:
            iio.imwrite(tmp, labels, extension=".png")
    else:
        import tifffile

        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, labels, compression="zlib")
    return path


def label_path(outdir: str | os.PathLike, source: str | os.PathLike, labels: np.ndarray) -> Path:
    """``OUTDIR/<stem>.png`` for a 2-D uint8 mask, ``OUTDIR/<stem>.tif`` for stacks or wide label types."""
    suffix = ".png" if labels.ndim == 2 and labels.dtype == np.uint8 else ".tif"
    return Path(outdir) / f"{stem_of(source)}{suffix}"


def read_labels(path: str | os.PathLike) -> np.ndarray:
    """Read a label/mask image as an integer array (no RGB guessing)."""
    data = read_image(path)
    arr = data.array
    if data.rgb:
        raise InputError(f"'{Path(path).name}' is a colour image, not a label mask: give a single-channel mask.")
    return arr
