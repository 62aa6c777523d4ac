"""Reader contribution for NIfTI volumes (.nii, .nii.gz): one layer per file, voxel spacing as scale.

A file named as a label map (``gd``, ``gt``, ``label(s)``, ``seg``, ``mask``, ``manual``, alone or as
the last word of the name, e.g. ``subject_101_gd.nii.gz``) holding integers opens as a Labels layer;
every other file as an image layer.

A volume ``(X, Y, Z)`` becomes a layer ``(Z, X, Y)``: the slider runs across the slices (for short-axis
cardiac MRI, the short-axis stack) and each slice is shown as stored. Several files of one study, or a
folder of them, open as aligned layers (same scale and position). The affine and the original axis
order travel in ``metadata["medseg"]`` so that results can be written back on the input's grid.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medseg.io.images import stem_of
from medseg.io.nifti import NiftiVolume, is_nifti, read_nifti

LayerData = tuple[Any, dict[str, Any], str]
AXES = "ZXY"  # layer axis order: slices first, then the file's voxel axes 0 and 1
LABEL_NAMES = {"gd", "gt", "label", "labels", "seg", "mask", "manual"}


def get_nifti_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """Return :func:`read_nifti_layers` for NIfTI files or a folder holding some, else ``None``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    for p in paths:
        if Path(p).is_dir():
            if not _folder_files(Path(p)):
                return None
        elif not is_nifti(p):
            return None
    return read_nifti_layers


def _folder_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and is_nifti(f))


def to_layer_array(array: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, X, Y)."""
    return np.moveaxis(array, 2, 0)


def from_layer_array(array: np.ndarray) -> np.ndarray:
    """(Z, X, Y) -> (X, Y, Z); a 2-D layer is one slice."""
    array = np.asarray(array)
    return array[..., None] if array.ndim == 2 else np.moveaxis(array, 0, 2)


def is_label_volume(volume: NiftiVolume, name: str) -> bool:
    """A label map: named as one (last word of the name) and holding integers."""
    word = name.rsplit("/", 1)[-1].lower().replace("-", "_").rsplit("_", 1)[-1]
    return word in LABEL_NAMES and np.issubdtype(volume.array.dtype, np.integer)


def nifti_layer_data(volume: NiftiVolume, name: str | None = None) -> LayerData:
    sx, sy, sz = volume.spacing
    kwargs = {
        "name": name or (stem_of(volume.path) if volume.path else "volume"),
        "scale": (sz, sx, sy),
        "metadata": {"medseg": {"path": str(volume.path) if volume.path else None, "affine": volume.affine.tolist(),
                                "spacing_mm": [sx, sy, sz], "axes": AXES, "axis_codes": volume.metadata.get("axis_codes")}},
    }
    if is_label_volume(volume, kwargs["name"]):
        kwargs["opacity"] = 0.5
        return to_layer_array(volume.array), kwargs, "labels"
    return to_layer_array(volume.array), kwargs, "image"


def read_nifti_layers(path: str | list[str]) -> list[LayerData]:
    """One layer per NIfTI file (files of a folder in name order): label maps as Labels, the rest as images."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    files: list[Path] = []
    for p in paths:
        files.extend(_folder_files(Path(p)) if Path(p).is_dir() else [Path(p)])
    layers = []
    for f in files:
        name = stem_of(f)
        if Path(paths[0]).is_dir() or len({stem_of(g) for g in files}) < len(files):
            name = f"{f.parent.name}/{name}"
        layers.append(nifti_layer_data(read_nifti(f), name))
    return layers


__all__ = ["AXES", "LABEL_NAMES", "from_layer_array", "get_nifti_reader", "is_label_volume", "nifti_layer_data", "read_nifti_layers", "to_layer_array"]
