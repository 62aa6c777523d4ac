"""Read DICOM files (single- and multi-frame) with pydicom: pixels as numpy, pixel spacing in mm.

A multi-frame file (an ultrasound cine loop, ``NumberOfFrames > 1``) becomes a stack ``(T, H, W)``
or ``(T, H, W, 3)``. The pixel size comes from ``PixelSpacing`` (row, col mm); ultrasound files that
only describe it in their calibrated regions (``SequenceOfUltrasoundRegions``, physical deltas in cm)
are read from the first region with a spatial (cm) calibration. Nothing identifying the patient is
copied into the metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC_OFFSET = 128


def is_dicom(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 preamble magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(_MAGIC_OFFSET)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


# Header fields worth showing a person; none of them identifies the patient.
_INFO_FIELDS = ("Modality", "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation", "NumberOfFrames", "FrameTime",
                "CineRate", "RecommendedDisplayFrameRate", "BitsStored", "TransferSyntaxUID")


def read_dicom(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float] | None, dict[str, Any]]:
    """``(array, spacing (row, col) mm or None, metadata)`` of a DICOM file.

    Colour data (RGB, YBR) comes back as RGB; monochrome as grey with MONOCHROME1 inverted so that
    bright is high; a non-trivial rescale (slope/intercept) is applied.
    """
    path = Path(path)
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError as exc:
        raise InputError(f"Reading the DICOM file '{path.name}' needs pydicom: pip install pydicom.") from exc
    try:
        ds = pydicom.dcmread(str(path), force=path.suffix.lower() in DICOM_SUFFIXES)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise InputError(f"'{path.name}' is not a DICOM file pydicom can read ({exc}): check that the file is complete.") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise InputError(f"'{path.name}' is a DICOM file without pixel data (a report or a directory?): open the image series instead.")
    try:
        array = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing decoder plugins, corrupt frames
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
        raise InputError(
            f"'{path.name}' has DICOM pixel data medseg cannot decode (transfer syntax {name}: {exc}); "
            "compressed DICOM needs a decoder plugin (pip install pylibjpeg pylibjpeg-libjpeg), or convert it to uncompressed DICOM."
        ) from exc
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if frames == 1 and array.ndim == (4 if samples > 1 else 3):  # a one-frame file stored as a stack
        array = array[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "")).upper()
    if samples == 1:
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if (slope, intercept) != (1.0, 0.0):
            array = array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        if photometric == "MONOCHROME1":  # 0 is white: invert within the stored bit range
            if np.issubdtype(array.dtype, np.unsignedinteger):
                top = (1 << int(getattr(ds, "BitsStored", 8 * array.dtype.itemsize))) - 1
                array = (top - array.astype(np.int64)).clip(0, top).astype(array.dtype)
            else:
                array = array.max() - array + array.min()
    spacing, source = _spacing(ds)
    meta: dict[str, Any] = {"format": "DICOM", "frames": frames}
    for key in _INFO_FIELDS:
        value = ds.file_meta.get(key) if key == "TransferSyntaxUID" and hasattr(ds, "file_meta") else ds.get(key)
        if value is not None and value != "":
            meta[key] = _plain(value)
    if spacing is not None:
        meta["spacing_source"] = source
    fps = _frame_rate(ds)
    if fps:
        meta["fps"] = fps
    return array, spacing, meta


def _plain(value: Any) -> Any:
    """A header value as a JSON-friendly Python value."""
    for kind in (int, float, str):
        if isinstance(value, kind):
            return kind(value)
    try:
        return float(value) if "." in str(value) else int(value)
    except (TypeError, ValueError):
        return str(value)


def _spacing(ds) -> tuple[tuple[float, float] | None, str | None]:
    """(row, col) mm from PixelSpacing, else ImagerPixelSpacing, else the ultrasound regions' calibration."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and not isinstance(value, (str, bytes)) and len(value) >= 2:
            row, col = (float(v) for v in list(value)[:2])
            if row > 0 and col > 0:
                return (row, col), key
    for region in ds.get("SequenceOfUltrasoundRegions", None) or []:
        units_x, units_y = region.get("PhysicalUnitsXDirection"), region.get("PhysicalUnitsYDirection")
        dx, dy = region.get("PhysicalDeltaX"), region.get("PhysicalDeltaY")
        if None in (units_x, units_y, dx, dy):
            continue
        if int(units_x) == 3 and int(units_y) == 3:  # 3 = cm (DICOM PS3.3 C.8.5.5.1.15)
            row, col = abs(float(dy)) * 10.0, abs(float(dx)) * 10.0
            if row > 0 and col > 0:
                return (row, col), "SequenceOfUltrasoundRegions"
    return None, None


def _frame_rate(ds) -> float | None:
    for key in ("RecommendedDisplayFrameRate", "CineRate"):
        value = ds.get(key)
        if value not in (None, ""):
            try:
                fps = float(value)
            except (TypeError, ValueError):
                continue
            if fps > 0:
                return fps
    frame_time = ds.get("FrameTime")  # ms between frames
    if frame_time not in (None, ""):
        try:
            ms = float(frame_time)
        except (TypeError, ValueError):
            return None
        if ms > 0:
            return 1000.0 / ms
    return None


__all__ = ["DICOM_SUFFIXES", "is_dicom", "read_dicom"]
